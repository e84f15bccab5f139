"""From a router configuration to a compiled ``Ruleset``, and rule text alone to one.

Rules come, in this order, from the built-in policies in ``[firewall]``,
``firewall.rules_file`` (relative to the config file), ``firewall.rules``
(text) and ``[[firewall.rule]]`` (structured, turned into ipchains argument
vectors); the forwards of ``[forwarding]`` come before those written as rule
lines. ``validate_config_rules`` is what the configuration loader calls, so
that a config with any bad rule line is refused whole.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

from masqd.firewall.builder import DEFAULT_ALIASES, Env
from masqd.firewall.lexer import Bad
from masqd.firewall.model import VERDICT_BY_NAME, PortForward
from masqd.firewall.parse import Program
from masqd.firewall.ruleset import Ruleset
from masqd.firewall.settings import RouterConfig, StructuredRule

_BY_NAME = VERDICT_BY_NAME


class RulesError(ValueError):
    """Rules that cannot be built; ``errors`` lists every ``SOURCE:LINE: reason``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


def env_from_config(cfg: RouterConfig) -> Env:
    """Aliases (defaults, then the config's), addresses and policies of ``cfg``."""
    fw = cfg.firewall
    return Env(
        aliases={**DEFAULT_ALIASES, **fw.aliases},
        lan_ip=int(cfg.lan.address.ip),
        wan_ip=int(cfg.wan.address.ip),
        policies={
            "input": _BY_NAME[fw.input_policy],
            "forward": _BY_NAME[fw.forward_policy],
            "output": _BY_NAME[fw.output_policy],
        },
    )


def _rules_file_path(cfg: RouterConfig) -> str | None:
    path = cfg.firewall.rules_file
    if path is None or os.path.isabs(path):
        return path
    src = cfg.source
    if src and not src.startswith("<"):
        return os.path.join(os.path.dirname(os.path.abspath(src)), path)
    return path


def _structured_argv(r: StructuredRule) -> list[str]:
    def neg(v: str) -> list[str]:
        v = v.strip()
        if v.startswith("!"):
            return ["!", v[1:].strip()]
        return [v]

    argv = ["ipchains"] + (["-I", r.chain, str(r.position)] if r.position else ["-A", r.chain])
    if r.proto.strip() not in ("", "all"):
        argv += ["-p", *neg(r.proto)]
    if r.src.strip() not in ("", "0.0.0.0/0") or r.sport:
        argv += ["-s", *neg(r.src or "0.0.0.0/0")]
    if r.sport:
        argv += ["--sport", *neg(r.sport)]
    if r.dst.strip() not in ("", "0.0.0.0/0") or r.dport:
        argv += ["-d", *neg(r.dst or "0.0.0.0/0")]
    if r.dport:
        argv += ["--dport", *neg(r.dport)]
    if r.iface:
        argv += ["-i", *neg(r.iface)]
    if r.syn is not None:
        argv += ["-y"] if r.syn else ["!", "-y"]
    if r.fragment is not None:
        argv += ["-f"] if r.fragment else ["!", "-f"]
    if r.target:
        argv += ["-j", r.target]
    if r.log:
        argv.append("-l")
    if r.bidirectional:
        argv.append("-b")
    return argv


def _program(cfg: RouterConfig) -> Program:
    prog = Program(env_from_config(cfg))
    fw = cfg.firewall
    path = _rules_file_path(cfg)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            prog.errors.append(f"firewall.rules_file: cannot read {path}: {exc.strerror or exc}")
        except UnicodeDecodeError:
            prog.errors.append(f"firewall.rules_file: {path} is not UTF-8 text")
        else:
            prog.feed_text(text, fw.rules_file or path)
    if fw.rules:
        prog.feed_text(fw.rules, "firewall.rules")
    for i, r in enumerate(fw.rule):
        where = f"firewall.rule[{i}]"
        if r.chain not in prog.chains and r.chain not in ("input", "forward", "output"):
            try:
                prog.new_chain(r.chain)
            except Bad as exc:
                prog.errors.append(f"{where}: {exc}")
                continue
        prog.feed_argv(_structured_argv(r), where)
    prog.finish()
    return prog


def _config_portfw(prog: Program, cfg: RouterConfig) -> tuple[PortForward, ...]:
    """``[forwarding] portfw`` with each literal ``listen`` checked as a rule line's would be."""
    out = []
    for i, f in enumerate(cfg.forwarding.portfw):
        if f.listen not in ("wan", "$WAN", "${4}", ""):
            try:
                listen = prog.listen(f.listen)
            except Bad as exc:
                prog.errors.append(f"forwarding.portfw[{i}]: {exc}")
                continue
            f = dataclasses.replace(f, listen=listen)
        out.append(f)
    return tuple(out)


def _ruleset(prog: Program, portfw: tuple[PortForward, ...] = (), cfg: RouterConfig | None = None) -> Ruleset:
    protofw = tuple(cfg.forwarding.protofw) if cfg is not None else ()
    return Ruleset(prog.chains, portfw + tuple(prog.portfw), protofw + tuple(prog.protofw),
                   prog.timeouts, tuple(prog.warnings))


class RulesCheck(NamedTuple):
    """What loading a config's rules found: ``errors`` (refuse the config), ``warnings``
    (accepted; worth a word), ``timeouts`` (set by ``-M -S`` lines, ``Timeouts`` field names)."""

    errors: list[str]
    warnings: list[str]
    timeouts: dict[str, int]


def compile_text(text: str, source: str = "<rules>", env: Env | None = None) -> tuple[Ruleset | None, list[str]]:
    """Rules text alone (no config): the Ruleset, or None and every error."""
    prog = Program(env)
    prog.feed_text(text, source)
    prog.finish()
    if prog.errors:
        return None, prog.errors
    return _ruleset(prog), []


def check_config_rules(cfg: RouterConfig) -> RulesCheck:
    """Load the config's rules: every error (``SOURCE:LINE: reason``), warning and timeout."""
    prog = _program(cfg)
    _config_portfw(prog, cfg)
    return RulesCheck(prog.errors, prog.warnings, prog.timeouts)


def validate_config_rules(cfg: RouterConfig) -> list[str]:
    """Every error in the config's rules (``SOURCE:LINE: reason``); empty when all is well."""
    return check_config_rules(cfg).errors


def build_ruleset(cfg: RouterConfig) -> Ruleset:
    """Compile the config's rules. Raises RulesError (never for a config that validated)."""
    prog = _program(cfg)
    portfw = _config_portfw(prog, cfg)
    if prog.errors:
        raise RulesError(prog.errors)
    return _ruleset(prog, portfw, cfg)
