"""Firewall: ipchains-style chains, their evaluation, and the HOWTO's rule language.

Placeholder interface (policy only) until the rule language lands; the engine
calls only what is defined here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from masqd.config import Config

ACCEPT, DENY, REJECT, MASQ = 0, 1, 2, 3
VERDICT_NAMES = {ACCEPT: "ACCEPT", DENY: "DENY", REJECT: "REJECT", MASQ: "MASQ"}
_BY_NAME = {v: k for k, v in VERDICT_NAMES.items()}

FLAG_SYN = 1  # TCP SYN set and ACK clear (ipchains -y)
FLAG_FRAG = 2  # a non-first fragment (ipchains -f)


class Decision(NamedTuple):
    verdict: int
    rules: tuple = ()  # rules whose counters this packet bumps
    logged: tuple = ()  # rules with -l that matched


class Ruleset:
    """Chains compiled from the config. ``trivial`` means only policies apply."""

    def __init__(self, cfg: Config) -> None:
        fw = cfg.firewall
        self.generation = 0
        self.trivial = True
        self.policy = {
            "input": _BY_NAME[fw.input_policy],
            "forward": _BY_NAME[fw.forward_policy],
            "output": _BY_NAME[fw.output_policy],
        }

    def evaluate(
        self, chain: str, iface: str, proto: int, src: int, dst: int, sport: int, dport: int, flags: int
    ) -> Decision:
        return Decision(self.policy[chain])


def build_ruleset(cfg: Config) -> Ruleset:
    return Ruleset(cfg)


def validate_config_rules(cfg: Config) -> list[str]:
    return []
