"""Firewall: ipchains-style chains, their evaluation, and the HOWTO's rule language.

Its job: turn rule lines (ipchains, ipfwadm, ipmasqadm portfw, ipportfw,
ipfwd) and a router configuration into a compiled ``Ruleset`` that decides,
per packet, ACCEPT / DENY / REJECT / MASQ, and list it like ``ipchains -L``.
It may import ``masqd.wire`` and its own modules only: never the
configuration (it reads one through the Protocols of ``settings``), the
engine, the data plane or ops, and no I/O library (asyncio, sockets, pytun,
prometheus_client, structlog, pyroute2). Files are read only to load a
config's ``rules_file`` and the host's ``/etc/services``.

The engine calls ``build_ruleset(cfg)`` once per (re)load and then, per
packet, ``ruleset.evaluate(chain, iface, proto, src, dst, sport, dport,
flags)``; the config loader calls ``check_config_rules(cfg)`` (errors, warnings,
masquerade timeouts).

Modules, from the words up: ``lexer`` (lines and words), ``services``
(service names; the built-in table is ``services.txt``), ``values``
(addresses, ports, protocols, ICMP types, TOS masks), ``model`` (Rule,
Chain, Decision, forwards, constants), ``spec`` (a rule as written ->
Rules), ``builder`` (the rule set as lines build it, the operations every
tool shares), ``dialects`` (one module per tool), ``parse`` (runs text
through the dialects), ``ruleset`` (compilation and evaluation), ``format``
(listing), ``settings`` (what is read from a config), ``load`` (config ->
Ruleset).

May import: ``masqd.wire`` and the standard library; not ``masqd.config`` (the
config imports the firewall to validate rules) nor anything above it; no
asyncio, socket, uvloop, pytun, pyroute2, prometheus_client or structlog.
"""

from __future__ import annotations

from masqd.firewall.format import format_rules
from masqd.firewall.load import (
    RulesCheck,
    RulesError,
    build_ruleset,
    check_config_rules,
    compile_text,
    env_from_config,
    validate_config_rules,
)
from masqd.firewall.model import (
    ACCEPT,
    DENY,
    FLAG_ACK,
    FLAG_FRAG,
    FLAG_SYN,
    ICMP_PORT_UNREACH,
    ICMP_UNREACH,
    MASQ,
    REJECT,
    VERDICT_NAMES,
    Chain,
    Decision,
    PortForward,
    ProtoForward,
    Rule,
)
from masqd.firewall.ruleset import Ruleset

__all__ = [
    "ACCEPT", "DENY", "REJECT", "MASQ", "VERDICT_NAMES", "FLAG_SYN", "FLAG_FRAG", "FLAG_ACK", "ICMP_UNREACH",
    "ICMP_PORT_UNREACH", "Decision", "Rule", "Chain", "Ruleset", "RulesError", "build_ruleset",
    "validate_config_rules", "compile_text", "format_rules", "env_from_config", "PortForward",
    "ProtoForward", "RulesCheck", "check_config_rules",
]
