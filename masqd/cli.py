"""The ``masqd`` command line: one argparse subcommand per job, each a small function.

To add a subcommand: write ``_add_NAME(sub)`` that registers its parser and
sets ``func``, and list it in ``_SUBCOMMANDS``. Every command returns the
process exit status; errors are messages on stderr, never tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def _load_config(path: str):  # type: ignore[no-untyped-def]
    """The validated config, or None after printing every error."""
    from masqd.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as exc:
        print(f"masqd: {exc.source}: invalid configuration ({len(exc.errors)} error(s))", file=sys.stderr)
        for err in exc.errors:
            print(f"  {exc.source}: {err}", file=sys.stderr)
        return None


def _setup_logging(cfg) -> None:  # type: ignore[no-untyped-def]
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    try:
        from masqd.ops.runtime import setup_logging
    except ImportError:
        logging.basicConfig(level=cfg.logging.level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return
    setup_logging(cfg)
    logging.basicConfig(level=cfg.logging.level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")


# ---------------------------------------------------------------------- run / check


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    if cfg is None:
        return EXIT_CONFIG
    _setup_logging(cfg)
    from masqd.daemon import run
    from masqd.ops.wanwatch import StartError, initial_config

    try:
        cfg = initial_config(cfg)  # wan.address_source = "interface:NAME": start from NAME's address
    except StartError as exc:
        print(f"masqd: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return run(cfg, config_path=args.config, state_file=args.state_file, ready_file=args.ready_file)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the router")
    p.add_argument("-c", "--config", required=True, help="TOML configuration file")
    p.add_argument("--state-file", help="on SIGUSR1 and at exit, write table+counters as JSON here")
    p.add_argument("--ready-file", help="write our PID here once the devices are up (removed at exit)")
    p.set_defaults(func=cmd_run)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    if cfg is None:
        return EXIT_CONFIG
    print(f"{args.config}: OK")
    return EXIT_OK


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate a configuration file (exit 0 valid, 2 invalid)")
    p.add_argument("-c", "--config", required=True, help="TOML configuration file")
    p.set_defaults(func=cmd_check)


# ---------------------------------------------------------------------- lab


def cmd_lab(args: argparse.Namespace) -> int:
    from masqd.lab import Lab, LabError

    try:
        ha = getattr(args, "ha", False)
        lab = Lab(args.prefix, mode="tap" if ha else args.mode, ha=ha)
        if args.action == "up":
            lab.up()
            print(lab.describe())
            if ha:
                from masqd.lab.ha import start_detached

                try:
                    print(start_detached(lab, preempt=not args.no_preempt).describe())
                except LabError:
                    lab.down()
                    raise
            return EXIT_OK
        if args.action == "down":
            removed = lab.down()
            print(f"removed: {' '.join(removed) if removed else 'nothing'}")
            return EXIT_OK
        if args.action == "status":
            print(lab.status())
            return EXIT_OK if lab.exists() else EXIT_FAIL
        if not args.rest:
            print("usage: masqd lab exec ROLE [--prefix P] -- CMD [ARGS...]", file=sys.stderr)
            return EXIT_CONFIG
        return lab.exec(args.role, args.rest, check=False, capture=False, timeout=None).returncode
    except LabError as exc:
        print(f"masqd lab: {exc}", file=sys.stderr)
        return EXIT_FAIL


def _add_lab(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prefix", default="mq", help="name prefix of the namespaces (default mq)")
    common.add_argument("--mode", choices=["tun", "tap"], default="tap", help="masqd's device mode (default tap)")
    p = sub.add_parser("lab", help="network-namespace lab: up | down | status | exec ROLE -- CMD")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser("up", parents=[common], help="build the lab")
    up.add_argument("--ha", action="store_true", help="an active/backup pair: two masqd and two keepalived "
                    "(TAP mode), started and left running")
    up.add_argument("--no-preempt", action="store_true", help="with --ha: the first active keeps the role")
    actions.add_parser("down", parents=[common], help="remove everything with this prefix")
    actions.add_parser("status", parents=[common], help="show the lab's namespaces and addresses")
    e = actions.add_parser("exec", parents=[common], help="run a command in a role's namespace: exec ROLE -- CMD")
    e.add_argument("role", help="lan2, lan3, isp, srv1, rem2, rem3, fw, sw (tun: lanedge, wanedge)")
    p.set_defaults(func=cmd_lab)


# ---------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from masqd.lab.demo import demo

    return demo(prefix=args.prefix, mode=args.mode, keep=args.keep)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the lab, run masqd in it, show it working, clean up")
    p.add_argument("--prefix", default="mqdemo", help="name prefix (default mqdemo)")
    p.add_argument("--mode", choices=["tun", "tap"], default="tap")
    p.add_argument("--keep", action="store_true", help="leave the lab and masqd running")
    p.set_defaults(func=cmd_demo)


# ---------------------------------------------------------------------- version


def cmd_version(args: argparse.Namespace) -> int:
    import json

    from masqd.version import build_info, describe

    info = build_info()
    print(json.dumps(info, indent=1) if args.json else describe(info))
    return EXIT_OK


def _add_version(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("version", help="version, Python, uvloop, native fast path, kernel TUN features")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_version)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_run, _add_check, _add_lab, _add_demo, _add_version]

# Operator commands over the control socket: table, events, stats, rules, flush, wan-address, reload, capture.
from masqd.ops.cli import OPS_SUBCOMMANDS  # noqa: E402

_SUBCOMMANDS += OPS_SUBCOMMANDS


def build_parser() -> argparse.ArgumentParser:
    from masqd.version import version

    parser = argparse.ArgumentParser(prog="masqd", description="userspace IPv4 masquerading router")
    parser.add_argument("--version", action="version", version=f"masqd {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["rules", "check"]:  # offline: masqd rules check FILE [--map ...] [--config CFG] [-v]
        from masqd.rulescheck import rules_check

        return rules_check(argv[2:])
    rest: list[str] = []
    if "--" in argv:  # everything after "--" is a command line for a subcommand (lab exec)
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    args.rest = rest
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
