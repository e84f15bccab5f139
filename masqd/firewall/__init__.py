"""Firewall: ipchains-style chains, their evaluation, and the HOWTO's rule language.

The engine calls ``build_ruleset(cfg)`` once per (re)load and then, per
packet, ``ruleset.evaluate(chain, iface, proto, src, dst, sport, dport,
flags)``; the config loader calls ``validate_config_rules(cfg)`` so that a
config with any bad rule line is refused whole. Rules come, in this order,
from the built-in policies in ``[firewall]``, ``firewall.rules_file``,
``firewall.rules`` (text) and ``[[firewall.rule]]`` (structured).

Modules: ``model`` (Rule, Chain, Decision, constants), ``parse`` (the rule
language), ``ruleset`` (compilation and evaluation), ``format`` (listing like
``ipchains -L``), ``cli`` (``masqd rules check``).

May import: ``masqd.wire`` and the standard library; not ``masqd.config`` (the
config imports the firewall to validate rules) nor anything above it; no
asyncio, socket, uvloop, pytun, pyroute2, prometheus_client or structlog.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from masqd.firewall.format import format_rules
from masqd.firewall.model import (
    ACCEPT,
    DENY,
    FLAG_FRAG,
    FLAG_SYN,
    ICMP_PORT_UNREACH,
    ICMP_UNREACH,
    MASQ,
    REJECT,
    VERDICT_BY_NAME,
    VERDICT_NAMES,
    Chain,
    Decision,
    Rule,
)
from masqd.firewall.parse import Bad, Env, Program
from masqd.firewall.ruleset import Ruleset

if TYPE_CHECKING:
    from masqd.config import Config, FirewallRule

__all__ = [
    "ACCEPT", "DENY", "REJECT", "MASQ", "VERDICT_NAMES", "FLAG_SYN", "FLAG_FRAG", "ICMP_UNREACH",
    "ICMP_PORT_UNREACH", "Decision", "Rule", "Chain", "Ruleset", "RulesError", "build_ruleset",
    "validate_config_rules", "compile_text", "format_rules", "env_from_config",
]

_BY_NAME = VERDICT_BY_NAME
DEFAULT_ALIASES = {"eth0": "lan", "eth1": "wan", "ppp0": "wan"}


class RulesError(ValueError):
    """Rules that cannot be built; ``errors`` lists every ``SOURCE:LINE: reason``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


def env_from_config(cfg: Config) -> Env:
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


def _rules_file_path(cfg: Config) -> str | None:
    path = cfg.firewall.rules_file
    if path is None or os.path.isabs(path):
        return path
    src = cfg.source
    if src and not src.startswith("<"):
        return os.path.join(os.path.dirname(os.path.abspath(src)), path)
    return path


def _structured_argv(r: FirewallRule) -> list[str]:
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


def _program(cfg: Config) -> Program:
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


def compile_text(text: str, source: str = "<rules>", env: Env | None = None) -> tuple[Ruleset | None, list[str]]:
    """Rules text alone (no config): the Ruleset, or None and every error."""
    prog = Program(env)
    prog.feed_text(text, source)
    prog.finish()
    if prog.errors:
        return None, prog.errors
    return Ruleset(prog.chains, tuple(prog.portfw), tuple(prog.protofw)), []


def validate_config_rules(cfg: Config) -> list[str]:
    """Every error in the config's rules (``SOURCE:LINE: reason``); empty when all is well."""
    return _program(cfg).errors


def build_ruleset(cfg: Config) -> Ruleset:
    """Compile the config's rules. Raises RulesError (never for a config that validated)."""
    prog = _program(cfg)
    if prog.errors:
        raise RulesError(prog.errors)
    fwd = cfg.forwarding
    return Ruleset(prog.chains, tuple(fwd.portfw) + tuple(prog.portfw), tuple(fwd.protofw) + tuple(prog.protofw))
