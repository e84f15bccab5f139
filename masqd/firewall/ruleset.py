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

from masqd.firewall.model import (
    BUILTIN_CHAINS,
    FLAG_ACK,
    FLAG_SYN,
    TERMINAL,
    Chain,
    Decision,
    PortForward,
    ProtoForward,
    Rule,
)

_FULL = 0xFFFFFFFF
_SYN_ACK = FLAG_SYN | FLAG_ACK
_generation = itertools.count(1)

Evaluator = Callable[[str, int, int, int, int, int, int], Decision]
_ARGS = "iface, proto, src, dst, sport, dport, flags"


def _ports_expr(var: str, ports: tuple[tuple[int, int], ...], neg: bool) -> str:
    terms = [f"{var} == {int(lo)}" if lo == hi else f"{int(lo)} <= {var} <= {int(hi)}" for lo, hi in ports]
    expr = " or ".join(terms)
    if neg:
        return f"not ({expr})"
    return f"({expr})" if len(terms) > 1 else expr


def can_match(r: Rule, iface: str, proto: int | None) -> bool:
    """Whether ``r`` may match packets on ``iface`` with ``proto`` (None: a protocol no rule names)."""
    if r.ifaces is not None and (iface in r.ifaces) == r.iface_neg:
        return False
    if r.proto:
        return (proto == r.proto) != r.proto_neg
    return not r.proto_neg


def rule_condition(r: Rule, known_iface_proto: bool = False) -> str:
    """Python expression over the evaluate() arguments; ``True``/``False`` when constant.

    With ``known_iface_proto`` the interface and protocol tests are left out
    (the caller already dispatched on them, see ``can_match``).
    """
    c: list[str] = []
    if known_iface_proto:
        pass
    elif r.ifaces is not None:
        sides = sorted(s for s in r.ifaces if s in ("lan", "wan"))
        if len(sides) == 1:
            c.append(f"iface {'!=' if r.iface_neg else '=='} {sides[0]!r}")
        elif (len(sides) == 2) == r.iface_neg:  # "! any" or "none"
            return "False"
    if known_iface_proto:
        pass
    elif r.proto:
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
    if r.sports or r.dports or r.syn or r.ack:
        c.append("not flags & 2")  # non-first fragments carry no ports (nor TCP flags)
    if r.syn:
        c.append("flags & 1" if r.syn > 0 else "not flags & 1")
    if r.ack:
        c.append("flags & 4")
    if r.frag:
        c.append("flags & 2" if r.frag > 0 else "not flags & 2")
    return " and ".join(c) if c else "True"


def _compile(src: str, name: str, consts: dict[str, Any]) -> Callable[..., Any]:
    ns: dict[str, Any] = dict(consts)
    exec(compile(src, f"<firewall {name}>", "exec"), ns)  # noqa: S102 - source built from ints only
    fn: Callable[..., Any] = ns["_f"]
    return fn


def _decisions(ch: Chain) -> dict[str, Decision]:
    assert ch.policy is not None
    consts: dict[str, Decision] = {}
    for k, r in enumerate(ch.rules):
        logged = (r,) if r.log else ()
        tos = r.tos
        if r.target == "RETURN":
            consts[f"D{k}"] = Decision(ch.policy, (r, ch), logged, tos=tos, cache=tos is None)
        else:
            consts[f"D{k}"] = Decision(TERMINAL[r.target], (r,), logged, tos=tos, cache=tos is None)
    consts["DP"] = Decision(ch.policy, (ch,), ())
    return consts


def _decision_lines(ch: Chain, args: str, keep: Callable[[Rule], bool], known: bool) -> list[str]:
    lines = [f"def _f({args}):"]
    for k, r in enumerate(ch.rules):
        if not keep(r):
            continue
        cond = rule_condition(r, known)
        if cond == "False":
            continue
        if cond == "True":
            lines.append(f"    return D{k}")
            return lines
        lines.append(f"    if {cond}: return D{k}")
    lines.append("    return DP")
    return lines


Table = dict[str, list[Callable[..., Decision]]]
SPECIALISE_MAX = 2000  # longer chains keep only the generic function (bounded compile time)


def _simple_chain(ch: Chain) -> tuple[Evaluator, Table | None]:
    """A built-in chain where every rule ends the walk: functions returning prepared Decisions.

    Returns the generic function and a table ``{iface: [fn per protocol 0..255]}``
    whose functions hold only the rules that can match on that interface and
    protocol, in order, without those two tests.
    """
    consts: dict[str, Any] = dict(_decisions(ch))
    generic: Evaluator = _compile("\n".join(_decision_lines(ch, _ARGS, lambda r: True, False)), ch.name, consts)
    if len(ch.rules) > SPECIALISE_MAX:
        return generic, None
    sub = "src, dst, sport, dport, flags"
    protos = sorted({r.proto for r in ch.rules if r.proto})
    table: Table = {}
    for iface in ("lan", "wan"):
        src = _decision_lines(ch, sub, lambda r, i=iface: can_match(r, i, None), True)  # type: ignore[misc]
        other = _compile("\n".join(src), f"{ch.name} {iface} other", consts)
        row = [other] * 256
        for p in protos:
            src = _decision_lines(ch, sub, lambda r, i=iface, q=p: can_match(r, i, q), True)  # type: ignore[misc]
            row[p] = _compile("\n".join(src), f"{ch.name} {iface} {p}", consts)
        table[iface] = row
    return generic, table


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
        tos: tuple[int, int] | None = None
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
            if r.tos is not None:  # (t & a1 ^ x1) & a2 ^ x2 == t & (a1 & a2) ^ (x1 & a2 ^ x2)
                a, x = r.tos
                tos = (a, x) if tos is None else (tos[0] & a, (tos[1] & a) ^ x)
            if v >= 0:
                return Decision(v, tuple(hit), tuple(logged), tos=tos, cache=tos is None)
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
        return Decision(policy, tuple(hit), tuple(logged), tos=tos, cache=tos is None)

    return walk


class Ruleset:
    """Chains compiled from the config; ``trivial`` means only policies apply.

    ``generation`` grows with every build, so the engine can tell a cached
    per-flow decision from a stale one. ``portfw``/``protofw`` hold every
    inbound forward: the config's ``[forwarding]`` entries first, then those
    from ipportfw / ipmasqadm / ipfwd lines. ``timeouts``: masquerade timeouts
    set by ``ipchains -M -S`` / ``ipfwadm -M -s`` lines (names of
    ``masqd.config.Timeouts``; the config loader applies them). ``warnings``:
    what was accepted but deserves a word (loopback rules, TOS masks).
    """

    def __init__(
        self,
        chains: dict[str, Chain],
        portfw: tuple[PortForward, ...] = (),
        protofw: tuple[ProtoForward, ...] = (),
        timeouts: dict[str, int] | None = None,
        warnings: tuple[str, ...] = (),
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
        self.timeouts = dict(timeouts or {})
        self.warnings = warnings
        # -y/-k rules: a decision for a TCP packet that is not "ACK set, no SYN" is not reused
        self.flag_rules = any(r.syn or r.ack for ch in chains.values() for r in ch.rules)
        self._eval: dict[str, Evaluator] = {}
        self._tab: dict[str, Table | None] = {}
        for n in BUILTIN_CHAINS:
            ch = chains[n]
            if all(r.target in TERMINAL or r.target == "RETURN" for r in ch.rules):
                self._eval[n], self._tab[n] = _simple_chain(ch)
            else:
                self._eval[n], self._tab[n] = _walker(chains, n), None

    def evaluate(
        self, chain: str, iface: str, proto: int, src: int, dst: int, sport: int, dport: int, flags: int
    ) -> Decision:
        """Walk built-in ``chain`` for one packet.

        ``iface``: "lan"/"wan", incoming for input, outgoing for forward and
        output; ``proto`` 0..255; for ICMP ``sport``/``dport`` are type/code.
        """
        t = self._tab[chain]
        row = t.get(iface) if t is not None else None
        if row is not None:
            d = row[proto](src, dst, sport, dport, flags)
        else:
            d = self._eval[chain](iface, proto, src, dst, sport, dport, flags)
        if self.flag_rules and proto == 6 and flags & _SYN_ACK != FLAG_ACK and d.cache:
            return d._replace(cache=False)
        return d

    def evaluator(self, chain: str) -> Evaluator:
        """A function ``f(iface, proto, src, dst, sport, dport, flags)`` same as ``evaluate(chain, ...)``."""
        t = self._tab[chain]
        generic = self._eval[chain]
        if self.flag_rules:
            return lambda *a: self.evaluate(chain, *a)
        if t is None:
            return generic
        lan, wan = t["lan"], t["wan"]

        def f(iface: str, proto: int, src: int, dst: int, sport: int, dport: int, flags: int) -> Decision:
            if iface == "wan":
                return wan[proto](src, dst, sport, dport, flags)
            if iface == "lan":
                return lan[proto](src, dst, sport, dport, flags)
            return generic(iface, proto, src, dst, sport, dport, flags)

        return f

    def rules(self) -> list[Rule]:
        """Every rule, chain by chain."""
        return [r for ch in self.chains.values() for r in ch.rules]

    def carry_counters(self, old: Ruleset) -> int:
        """Take over the hit counters of ``old`` (the ruleset a reload replaces) for every rule
        that is still there, matched by chain and specification (the n-th equal rule of a
        chain takes the n-th one's counters), and for the chains' policies. Returns how
        many rules kept their counters."""
        kept = 0
        for name, ch in self.chains.items():
            prev = old.chains.get(name)
            if prev is None:
                continue
            ch.pkts, ch.bytes = prev.pkts, prev.bytes
            pool: dict[tuple, list[Rule]] = {}
            for r in prev.rules:
                pool.setdefault(r.key(), []).append(r)
            for r in ch.rules:
                same = pool.get(r.key())
                if same:
                    o = same.pop(0)
                    r.pkts, r.bytes = o.pkts, o.bytes
                    kept += 1
        return kept

    def zero(self) -> None:
        """Reset every counter (``ipchains -Z``)."""
        for ch in self.chains.values():
            ch.pkts = ch.bytes = 0
            for r in ch.rules:
                r.pkts = r.bytes = 0
