"""Compiled chains: ``Ruleset.evaluate`` walks input/forward/output for one packet.

Each chain is turned into Python source once per build: one ``if`` per rule
whose condition is a flat ``and`` of integer comparisons (``(src & mask) ==
net``, ``lo <= dport <= hi``...), compiled with ``compile``/``exec``. Only
ints and the interface names ``'lan'``/``'wan'`` ever reach the source text,
never a string from a rule line. A built-in chain that has no jumps and no
count-only rules returns a ``Decision`` built in advance, so the common case
costs one call and the comparisons; other chains use a small walker with a
jump stack (loops were refused when the rules were built).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from masqd.config import PortForward, ProtoForward
from masqd.firewall.model import BUILTIN_CHAINS, TERMINAL, Chain, Decision, Rule

_FULL = 0xFFFFFFFF
_generation = itertools.count(1)

Evaluator = Callable[[str, int, int, int, int, int, int], Decision]
_ARGS = "iface, proto, src, dst, sport, dport, flags"


def _ports_expr(var: str, ports: tuple[tuple[int, int], ...], neg: bool) -> str:
    terms = [f"{var} == {int(lo)}" if lo == hi else f"{int(lo)} <= {var} <= {int(hi)}" for lo, hi in ports]
    expr = " or ".join(terms)
    if neg:
        return f"not ({expr})"
    return f"({expr})" if len(terms) > 1 else expr


def rule_condition(r: Rule) -> str:
    """Python expression over the evaluate() arguments; ``True``/``False`` when constant."""
    c: list[str] = []
    if r.ifaces is not None:
        sides = sorted(s for s in r.ifaces if s in ("lan", "wan"))
        if len(sides) == 1:
            c.append(f"iface {'!=' if r.iface_neg else '=='} {sides[0]!r}")
        elif (len(sides) == 2) == r.iface_neg:  # "! any" or "none"
            return "False"
    if r.proto:
        c.append(f"proto {'!=' if r.proto_neg else '=='} {int(r.proto)}")
    elif r.proto_neg:
        return "False"
    for var, a, m, neg in (("src", r.src, r.smask, r.src_neg), ("dst", r.dst, r.dmask, r.dst_neg)):
        op = "!=" if neg else "=="
        if m == 0:
            if neg:
                return "False"
        elif m == _FULL:
            c.append(f"{var} {op} {int(a)}")
        else:
            c.append(f"({var} & {int(m)}) {op} {int(a)}")
    if r.sports:
        c.append(_ports_expr("sport", r.sports, r.sport_neg))
    if r.dports:
        c.append(_ports_expr("dport", r.dports, r.dport_neg))
    if r.sports or r.dports or r.syn:
        c.append("not flags & 2")  # non-first fragments carry no ports
    if r.syn:
        c.append("flags & 1" if r.syn > 0 else "not flags & 1")
    if r.frag:
        c.append("flags & 2" if r.frag > 0 else "not flags & 2")
    return " and ".join(c) if c else "True"


def _compile(src: str, name: str, consts: dict[str, Any]) -> Callable[..., Any]:
    ns: dict[str, Any] = dict(consts)
    exec(compile(src, f"<firewall {name}>", "exec"), ns)  # noqa: S102 - source built from ints only
    fn: Callable[..., Any] = ns["_f"]
    return fn


def _simple_chain(ch: Chain) -> Evaluator:
    """A built-in chain where every rule ends the walk: return prepared Decisions."""
    assert ch.policy is not None
    lines = [f"def _f({_ARGS}):"]
    consts: dict[str, Any] = {}
    for k, r in enumerate(ch.rules):
        logged = (r,) if r.log else ()
        if r.target == "RETURN":
            d = Decision(ch.policy, (r, ch), logged)
        else:
            d = Decision(TERMINAL[r.target], (r,), logged)
        consts[f"D{k}"] = d
        cond = rule_condition(r)
        if cond == "False":
            continue
        lines.append(f"    if {cond}: return D{k}")
        if cond == "True":
            break
    consts["DP"] = Decision(ch.policy, (ch,), ())
    lines.append("    return DP")
    fn: Evaluator = _compile("\n".join(lines), ch.name, consts)
    return fn


def _match_fn(ch: Chain) -> Callable[..., int]:
    """``m(start, ...)``: index of the first rule at or after ``start`` that matches, or -1."""
    lines = [f"def _f(start, {_ARGS}):"]
    # The walk resumes at j + 1 after a non-terminal rule j (jump, RETURN, count
    # only), so rule k needs a "start <= k" guard iff such a j >= k exists.
    last = max((j for j, r in enumerate(ch.rules) if r.target not in TERMINAL), default=-1)
    for k, r in enumerate(ch.rules):
        cond = rule_condition(r)
        if cond != "False":
            guard = f"start <= {k} and " if k <= last else ""
            lines.append(f"    if {guard}{cond}: return {k}")
    lines.append("    return -1")
    fn: Callable[..., int] = _compile("\n".join(lines), ch.name, {})
    return fn


def _walker(chains: dict[str, Chain], name: str) -> Evaluator:
    """General walk of a built-in chain with jumps, RETURN and count-only rules."""
    compiled: dict[str, tuple[Callable[..., int], list[tuple[Rule, int, str]]]] = {}
    for n, ch in chains.items():
        steps: list[tuple[Rule, int, str]] = []
        for r in ch.rules:
            v = TERMINAL.get(r.target, -1)
            steps.append((r, v, r.target))
        compiled[n] = (_match_fn(ch), steps)
    top = chains[name]
    policy = top.policy
    assert policy is not None

    def walk(iface: str, proto: int, src: int, dst: int, sport: int, dport: int, flags: int) -> Decision:
        hit: list[Any] = []
        logged: list[Rule] = []
        m, steps = compiled[name]
        pos = 0
        stack: list[tuple[Callable[..., int], list[tuple[Rule, int, str]], int]] = []
        while True:
            i = m(pos, iface, proto, src, dst, sport, dport, flags)
            if i < 0:
                if stack:
                    m, steps, pos = stack.pop()
                    continue
                break
            r, v, target = steps[i]
            hit.append(r)
            if r.log:
                logged.append(r)
            if v >= 0:
                return Decision(v, tuple(hit), tuple(logged))
            if target == "RETURN":
                if stack:
                    m, steps, pos = stack.pop()
                    continue
                break
            if target:
                stack.append((m, steps, i + 1))
                m, steps = compiled[target]
                pos = 0
            else:
                pos = i + 1
        hit.append(top)
        return Decision(policy, tuple(hit), tuple(logged))

    return walk


class Ruleset:
    """Chains compiled from the config; ``trivial`` means only policies apply.

    ``generation`` grows with every build, so the engine can tell a cached
    per-flow decision from a stale one. ``portfw``/``protofw`` hold every
    inbound forward: the config's ``[forwarding]`` entries first, then those
    from ipportfw / ipmasqadm / ipfwd lines.
    """

    def __init__(
        self,
        chains: dict[str, Chain],
        portfw: tuple[PortForward, ...] = (),
        protofw: tuple[ProtoForward, ...] = (),
    ) -> None:
        self.generation = next(_generation)
        self.chains = chains
        self.policy: dict[str, int] = {}
        for n in BUILTIN_CHAINS:
            p = chains[n].policy
            assert p is not None
            self.policy[n] = p
        self.trivial = all(not chains[n].rules for n in BUILTIN_CHAINS)
        self.portfw = portfw
        self.protofw = protofw
        self._eval: dict[str, Evaluator] = {}
        for n in BUILTIN_CHAINS:
            ch = chains[n]
            if all(r.target in TERMINAL or r.target == "RETURN" for r in ch.rules):
                self._eval[n] = _simple_chain(ch)
            else:
                self._eval[n] = _walker(chains, n)

    def evaluate(
        self, chain: str, iface: str, proto: int, src: int, dst: int, sport: int, dport: int, flags: int
    ) -> Decision:
        """Walk built-in ``chain`` for one packet (``iface``: incoming for input, outgoing otherwise)."""
        return self._eval[chain](iface, proto, src, dst, sport, dport, flags)

    def evaluator(self, chain: str) -> Evaluator:
        """The compiled function behind ``evaluate(chain, ...)``, to skip one lookup per packet."""
        return self._eval[chain]

    def rules(self) -> list[Rule]:
        """Every rule, chain by chain."""
        return [r for ch in self.chains.values() for r in ch.rules]

    def zero(self) -> None:
        """Reset every counter (``ipchains -Z``)."""
        for ch in self.chains.values():
            ch.pkts = ch.bytes = 0
            for r in ch.rules:
                r.pkts = r.bytes = 0
