"""Listing of a Ruleset the way ``ipchains -L -n [-v]`` and ``ipmasqadm portfw -l`` showed it.

Differences from ipchains, on purpose: the interface column is always shown
(it holds masqd's side, ``lan``/``wan``, after alias mapping, or ``lo``), counters
are exact (as with ``-x``), TOS masks follow the ports as ``TOS and/xor``, and
the port and protocol forwards and masquerade timeouts follow the chains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from masqd.firewall.model import Rule, addr_str, policy_name, ports_str, proto_name

if TYPE_CHECKING:
    from masqd.firewall.ruleset import Ruleset


def _ports_col(r: Rule) -> str:
    tos = f"  TOS 0x{r.tos_and:02x}/0x{r.tos_xor:02x}" if r.tos is not None else ""
    if r.proto not in (1, 6, 17) or r.proto_neg:
        return "n/a" + tos
    s = ("!" if r.sport_neg else "") + ports_str(r.sports) if r.sports else "*"
    d = ("!" if r.dport_neg else "") + ports_str(r.dports) if r.dports else "*"
    return f"{s} ->   {d}{tos}"


def _rule_cols(r: Rule) -> list[str]:
    return [
        r.target or "-",
        ("!" if r.proto_neg else "") + proto_name(r.proto),
        r.opt_str(),
        r.iface_str(),
        addr_str(r.src, r.smask, r.src_neg, bare_host=True),
        addr_str(r.dst, r.dmask, r.dst_neg, bare_host=True),
        _ports_col(r),
    ]


_TIMEOUT_LABELS = (("tcp_established", "tcp"), ("tcp_fin", "tcpfin"), ("udp", "udp"))
_HEAD = ["target", "prot", "opt", "ifname", "source", "destination", "ports"]
_WIDTH = [10, 5, 6, 10, 21, 21, 0]


def _row(cols: list[str], counters: tuple[str, str] | None) -> str:
    out = ""
    if counters is not None:
        out = f"{counters[0]:>8} {counters[1]:>10} "
    for c, w in zip(cols, _WIDTH, strict=True):
        out += f"{c:<{w}} " if w else c
    return out.rstrip()


def format_rules(ruleset: Ruleset, verbose: bool = True) -> str:
    """Chains (policies, rules and, with ``verbose``, packet/byte counters), then forwards."""
    out: list[str] = []
    refs: dict[str, int] = {}
    for ch in ruleset.chains.values():
        for r in ch.rules:
            refs[r.target] = refs.get(r.target, 0) + 1
    for ch in ruleset.chains.values():
        if ch.builtin:
            pol = policy_name(ch.policy)
            if verbose:
                out.append(f"Chain {ch.name} (policy {pol}: {ch.pkts} packets, {ch.bytes} bytes):")
            else:
                out.append(f"Chain {ch.name} (policy {pol}):")
        else:
            out.append(f"Chain {ch.name} ({refs.get(ch.name, 0)} references):")
        out.append(_row(_HEAD, ("pkts", "bytes") if verbose else None))
        for r in ch.rules:
            out.append(_row(_rule_cols(r), (str(r.pkts), str(r.bytes)) if verbose else None))
        out.append("")
    if ruleset.portfw:
        out.append("Port forwards:")
        out.append(f"{'prot':<5} {'localaddr':<16} {'lport':>6}  {'rediraddr':<16} {'rport':>6} {'pref':>5}")
        for f in ruleset.portfw:
            out.append(f"{f.proto.upper():<5} {f.listen:<16} {f.port:>6}  {str(f.to):<16} {f.to_port:>6} {f.pref:>5}")
        out.append("")
    if ruleset.protofw:
        out.append("Protocol forwards:")
        out.append("prot  host")
        for p in ruleset.protofw:
            out.append(f"{proto_name(p.proto):<5} {p.to}")
        out.append("")
    if ruleset.timeouts:
        t = ruleset.timeouts
        shown = ", ".join(f"{label} {t[k]} s" for k, label in _TIMEOUT_LABELS if k in t)
        out.append(f"Masquerade timeouts (-M -S): {shown}")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"
