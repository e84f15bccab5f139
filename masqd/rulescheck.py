"""``masqd rules check FILE``: check a rules file (or a config) offline and list it like ``ipchains -L -n``.

It joins the configuration and the firewall, so it lives above both.

Exit 0 and the normalised listing on stdout when every line is good (with
``FILE:LINE: warning: ...`` on stderr for what is accepted but deserves a
word: rules on the loopback interface, TOS masks); exit 2 and one
``FILE:LINE: reason`` per bad line on stderr otherwise. Without
``--config``, ``-V ADDR`` is matched against the project's stand-in
addresses (LAN 10.0.0.1, WAN 203.0.113.200); ``--map`` adds aliases
(interface names or addresses -> lan/wan).
"""

from __future__ import annotations

import argparse
import sys

from masqd.config import ConfigError, load
from masqd.firewall import RulesError, Ruleset, build_ruleset, env_from_config, format_rules
from masqd.firewall.parse import Env, Program

EXIT_OK, EXIT_BAD = 0, 2
STANDIN_LAN = (10 << 24) | 1  # 10.0.0.1
STANDIN_WAN = (203 << 24) | (0 << 16) | (113 << 8) | 200  # 203.0.113.200


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise _Usage()


class _Usage(Exception):
    pass


def _parser() -> _Parser:
    p = _Parser(prog="masqd rules check", description="check a rules file and list the normalised rules")
    p.add_argument("file", help="rules file (ipchains/ipfwadm/... lines), a .toml config, or - for stdin")
    p.add_argument("--map", action="append", default=[], metavar="NAME=SIDE[,NAME=SIDE...]",
                   help="extra aliases, e.g. eth0=lan,ppp0=wan or 200.200.200.200=wan")
    p.add_argument("--config", help="take aliases, addresses and policies from this TOML config")
    p.add_argument("-v", "--verbose", action="store_true", help="show packet and byte counters")
    return p


def _parse_map(items: list[str]) -> tuple[dict[str, str], list[str]]:
    out: dict[str, str] = {}
    errors: list[str] = []
    for item in items:
        for pair in item.split(","):
            if not pair.strip():
                continue
            name, sep, side = pair.partition("=")
            side = side.strip().lower()
            if not sep or not name.strip() or side not in ("lan", "wan"):
                errors.append(f"--map: bad entry {pair!r} (expected NAME=lan or NAME=wan)")
                continue
            out[name.strip()] = side
    return out, errors


def _check_config(path: str, verbose: bool) -> int:
    try:
        cfg = load(path)
        rs = build_ruleset(cfg)
    except ConfigError as exc:
        for e in exc.errors:
            print(f"{exc.source}: {e}", file=sys.stderr)
        return EXIT_BAD
    except RulesError as exc:  # pragma: no cover - load() validated the rules already
        for e in exc.errors:
            print(f"{path}: {e}", file=sys.stderr)
        return EXIT_BAD
    _warn(rs.warnings)
    sys.stdout.write(format_rules(rs, verbose=verbose))
    return EXIT_OK


def _warn(warnings: tuple[str, ...] | list[str]) -> None:
    for w in warnings:
        where, _, what = w.partition(": ")
        print(f"{where}: warning: {what}", file=sys.stderr)


def rules_check(argv: list[str]) -> int:
    """Entry point of ``masqd rules check``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except _Usage:
        return EXIT_BAD
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if args.file.endswith(".toml"):
        return _check_config(args.file, args.verbose)
    extra, errors = _parse_map(args.map)
    env = Env(lan_ip=STANDIN_LAN, wan_ip=STANDIN_WAN)
    if args.config:
        try:
            env = env_from_config(load(args.config))
        except ConfigError as exc:
            for e in exc.errors:
                print(f"{exc.source}: {e}", file=sys.stderr)
            return EXIT_BAD
    env.aliases = {**env.aliases, **extra}
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        return EXIT_BAD
    name = "<stdin>" if args.file == "-" else args.file
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        print(f"{name}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD
    except UnicodeDecodeError:
        print(f"{name}: not UTF-8 text", file=sys.stderr)
        return EXIT_BAD
    prog = Program(env)
    prog.feed_text(text, name)
    prog.finish()
    if prog.errors:
        for e in prog.errors:
            print(e, file=sys.stderr)
        return EXIT_BAD
    rs = Ruleset(prog.chains, tuple(prog.portfw), tuple(prog.protofw), prog.timeouts, tuple(prog.warnings))
    _warn(rs.warnings)
    sys.stdout.write(format_rules(rs, verbose=args.verbose))
    return EXIT_OK


def rules_list(ruleset: Ruleset, verbose: bool = True) -> str:
    """The text ``masqd rules list`` shows (the control socket calls this)."""
    return format_rules(ruleset, verbose=verbose)


if __name__ == "__main__":
    sys.exit(rules_check(sys.argv[1:]))
