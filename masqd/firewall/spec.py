"""A rule as a dialect writes it (``Spec``), and the protocol checks that make it ``Rule``s.

Each dialect fills a ``Spec`` from its options (addresses parsed, ports still
words); ``make_rules`` checks what depends on the protocol (ports only with
tcp, udp or icmp; -y and -k only with tcp; what -f excludes), reads the port
words (service names per protocol, ICMP type names) and returns the Rule, or
two with -b (the second with source and destination swapped).

Deliberate choices: ports are allowed only with tcp, udp or icmp (as in both
tools); a non-first fragment never matches a rule with ports, ICMP type, -y
or -k.
"""

from __future__ import annotations

from dataclasses import dataclass

from masqd.firewall.lexer import Bad
from masqd.firewall.model import Ports, Rule
from masqd.firewall.services import Services
from masqd.firewall.values import ICMP, TCP, UDP, parse_ports


@dataclass
class Spec:
    """A rule as written, before the protocol-dependent checks."""

    proto: int = 0
    proto_neg: bool = False
    proto_set: bool = False
    src: tuple[int, int] = (0, 0)
    src_neg: bool = False
    dst: tuple[int, int] = (0, 0)
    dst_neg: bool = False
    sport: str | None = None
    sport_neg: bool = False
    dport: str | None = None
    dport_neg: bool = False
    icmp: str | None = None
    icmp_neg: bool = False
    ifaces: frozenset[str] | None = None
    iface_name: str = ""
    iface_neg: bool = False
    syn: int = 0
    frag: int = 0
    log: bool = False
    bidir: bool = False
    target: str = ""
    port_list: bool = False  # ipfwadm: several ports per side
    ack: int = 0  # ipfwadm -k
    tos: tuple[int, int] | None = None  # -t ANDMASK XORMASK


def make_rules(chain: str, sp: Spec, where: str, services: Services | None = None) -> list[Rule]:
    """Protocol-dependent checks, then one Rule (two with -b)."""
    p = sp.proto
    has_ports = sp.sport is not None or sp.dport is not None or sp.icmp is not None
    if has_ports and (sp.proto_neg or p not in (TCP, UDP, ICMP)):
        raise Bad("ports or ICMP types need -p tcp, udp or icmp")
    if sp.icmp is not None and p != ICMP:
        raise Bad("--icmp-type needs -p icmp")
    if sp.syn and (p != TCP or sp.proto_neg):
        raise Bad("-y (SYN) needs -p tcp")
    if sp.ack and (p != TCP or sp.proto_neg):
        raise Bad("-k (ACK) needs -P tcp")
    if sp.ack and sp.syn > 0:
        raise Bad("-y and -k together never match (-y is SYN without ACK)")
    if sp.frag > 0 and (has_ports or sp.syn or sp.ack):
        raise Bad("-f cannot be combined with ports, ICMP types or -y: non-first fragments have none")
    sports: Ports = ()
    dports: Ports = ()
    sneg, dneg = sp.sport_neg, sp.dport_neg
    if sp.sport is not None:
        sports, code = parse_ports(sp.sport, p, sp.port_list, services)
        if code is not None and sp.sport_neg:
            raise Bad(f"'! {sp.sport}' cannot be negated (it fixes type and code); negate the type number")
        if code is not None:
            if sp.dport is not None:
                raise Bad(f"ICMP type {sp.sport!r} fixes the code: no destination port allowed")
            dports, dneg = ((code, code),), sp.sport_neg
    if sp.icmp is not None:
        if sp.sport is not None:
            raise Bad("ICMP type given twice (source port and --icmp-type)")
        sports, code = parse_ports(sp.icmp, p, services=services)
        sneg = sp.icmp_neg
        if code is not None and sneg:
            raise Bad(f"'! {sp.icmp}' cannot be negated (it fixes type and code); negate the type number")
        if code is not None:
            if sp.dport is not None:
                raise Bad(f"ICMP type {sp.icmp!r} fixes the code: no destination port allowed")
            dports, dneg = ((code, code),), sp.icmp_neg
    if sp.dport is not None:
        dports, _ = parse_ports(sp.dport, p, sp.port_list, services)
    if sp.target == "MASQ" and chain in ("input", "output"):
        raise Bad(f"MASQ is only allowed in the forward chain, not in {chain}")
    tos_and, tos_xor = sp.tos if sp.tos is not None else (0xFF, 0)
    r = Rule(
        chain, sp.target, p, sp.proto_neg, sp.src[0], sp.src[1], sp.src_neg, sports, sneg,
        sp.dst[0], sp.dst[1], sp.dst_neg, dports, dneg, sp.ifaces, sp.iface_name, sp.iface_neg,
        sp.syn, sp.frag, sp.log, where, sp.ack, tos_and, tos_xor,
    )
    if not sp.bidir:
        return [r]
    back = Rule(
        chain, sp.target, p, sp.proto_neg, sp.dst[0], sp.dst[1], sp.dst_neg, dports, dneg,
        sp.src[0], sp.src[1], sp.src_neg, sports, sneg, sp.ifaces, sp.iface_name, sp.iface_neg,
        sp.syn, sp.frag, sp.log, where, sp.ack, tos_and, tos_xor,
    )
    return [r] if back.key() == r.key() else [r, back]
