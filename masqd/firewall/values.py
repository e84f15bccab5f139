"""Values inside rule lines: addresses with masks, ports and ranges, protocols, ICMP types.

Every function takes one word and returns plain ints, or raises ``Bad`` with
the reason; none knows which tool wrote the word. Port words may be service
names (``finger``, ``pop-3``), looked up per protocol in a ``Services``
database; ICMP type words are the names and aliases ``ipchains -h icmp``
listed, in any case, or an unambiguous beginning of one (``echo-req``).
"""

from __future__ import annotations

import re

from masqd.firewall import services as services_db
from masqd.firewall.lexer import Bad, printable
from masqd.firewall.model import PROTO_BY_NAME, Ports
from masqd.firewall.services import Services

ICMP, TCP, UDP = 1, 6, 17

# ICMP names as ipchains knew them (its table, lower case): name -> (type, code or None).
ICMP_TYPES: dict[str, tuple[int, int | None]] = {
    "echo-reply": (0, None), "pong": (0, None),
    "destination-unreachable": (3, None),
    "network-unreachable": (3, 0), "host-unreachable": (3, 1), "protocol-unreachable": (3, 2),
    "port-unreachable": (3, 3), "fragmentation-needed": (3, 4), "source-route-failed": (3, 5),
    "network-unknown": (3, 6), "host-unknown": (3, 7), "network-prohibited": (3, 9),
    "host-prohibited": (3, 10), "tos-network-unreachable": (3, 11), "tos-host-unreachable": (3, 12),
    "communication-prohibited": (3, 13), "host-precedence-violation": (3, 14),
    "precedence-cutoff": (3, 15),
    "source-quench": (4, None),
    "redirect": (5, None), "network-redirect": (5, 0), "host-redirect": (5, 1),
    "tos-network-redirect": (5, 2), "tos-host-redirect": (5, 3),
    "echo-request": (8, None), "ping": (8, None),
    "router-advertisement": (9, None), "router-solicitation": (10, None),
    "time-exceeded": (11, None), "ttl-exceeded": (11, None), "ttl-zero-during-transit": (11, 0), "ttl-zero-during-reassembly": (11, 1),
    "parameter-problem": (12, None), "ip-header-bad": (12, 0), "required-option-missing": (12, 1),
    "timestamp-request": (13, None), "timestamp-reply": (14, None),
    "address-mask-request": (17, None), "address-mask-reply": (18, None),
}

_PROTO_WORD = {TCP: "tcp", UDP: "udp"}

_ADDR = re.compile(r"\d{1,3}(\.\d{1,3}){3}\Z")


def parse_addr(tok: str) -> tuple[int, int]:
    """``a.b.c.d[/bits|/mask]`` or ``0/0`` -> (address, mask)."""
    if "/" in tok:
        a, m = tok.split("/", 1)
    else:
        a, m = tok, "32"
    if a == "0":
        a = "0.0.0.0"
    if not _ADDR.match(a):
        if re.match(r"[A-Za-z]", a):
            raise Bad(f"host name {printable(a)}: write an IPv4 address")
        raise Bad(f"bad address {printable(tok)}")
    octets = [int(x) for x in a.split(".")]
    if any(o > 255 for o in octets):
        raise Bad(f"bad address {printable(tok)}: octet above 255")
    addr = (octets[0] << 24) | (octets[1] << 16) | (octets[2] << 8) | octets[3]
    if m.isdigit() and len(m) <= 2:
        bits = int(m)
        if bits > 32:
            raise Bad(f"bad prefix length /{m} in {printable(tok)}")
        mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
    elif _ADDR.match(m) and all(int(x) <= 255 for x in m.split(".")):
        o = [int(x) for x in m.split(".")]
        mask = (o[0] << 24) | (o[1] << 16) | (o[2] << 8) | o[3]
    else:
        raise Bad(f"bad netmask {printable(m)} in {printable(tok)}")
    return addr & mask, mask


def parse_host(tok: str) -> int:
    """One address without a mask."""
    addr, mask = parse_addr(tok)
    if mask != 0xFFFFFFFF or "/" in tok:
        raise Bad(f"expected a host address, got {printable(tok)}")
    return addr


def icmp_type(tok: str) -> tuple[int, int | None] | None:
    """An ICMP type name, alias or unambiguous beginning of one -> (type, code or None); None if none."""
    low = tok.lower()
    if low in ICMP_TYPES:
        return ICMP_TYPES[low]
    hits = [name for name in ICMP_TYPES if name.startswith(low)] if low else []
    if len(hits) > 1:
        raise Bad(f"ambiguous ICMP type {printable(tok)}: {', '.join(hits[:4])}{', ...' if len(hits) > 4 else ''}?")
    return ICMP_TYPES[hits[0]] if hits else None


def port_number(tok: str, proto: int, services: Services | None = None) -> int:
    """A port (or service name of ``proto``, tcp or udp); for ICMP a type number."""
    top = 255 if proto == ICMP else 65535
    if tok.isdigit() and len(tok) <= 5:
        v = int(tok)
        if v > top:
            raise Bad(f"{'ICMP type' if proto == ICMP else 'port'} {tok} above {top}")
        return v
    if proto == ICMP:
        raise Bad(f"unknown ICMP type {printable(tok)}")
    db = services if services is not None else services_db.system()
    word = _PROTO_WORD.get(proto)
    port = db.port(tok, word) if word is not None else None
    if port is not None:
        return port
    if tok and not tok[0].isdigit() and word is not None:
        raise Bad(f"unknown {word} service {printable(tok)} (not in {db.source})")
    raise Bad(f"bad port {printable(tok)}")


def parse_ports(
    tok: str, proto: int, allow_list: bool = False, services: Services | None = None
) -> tuple[Ports, int | None]:
    """A port, ``lo:hi``, ``:hi``, ``lo:`` (or an ICMP type name) -> (ranges, ICMP code or None)."""
    if proto == ICMP:
        named = icmp_type(tok)
        if named is not None:
            t, code = named
            return ((t, t),), code
    top = 255 if proto == ICMP else 65535
    out: list[tuple[int, int]] = []
    pieces = tok.split(",") if allow_list else [tok]
    for piece in pieces:
        if ":" in piece:
            lo_s, hi_s = piece.split(":", 1)
            lo = port_number(lo_s, proto, services) if lo_s else 0
            hi = port_number(hi_s, proto, services) if hi_s else top
            if lo > hi:
                raise Bad(f"empty port range {printable(piece)}")
        else:
            lo = hi = port_number(piece, proto, services)
        out.append((lo, hi))
    return tuple(out), None


def parse_proto(tok: str, numbers: bool = True) -> int:
    """``tcp``, ``udp``, ``icmp``, ``all``, a known name or (with ``numbers``) 0..255."""
    low = tok.lower()
    if low in PROTO_BY_NAME:
        return PROTO_BY_NAME[low]
    if numbers and tok.isdigit() and len(tok) <= 3 and int(tok) <= 255:
        return int(tok)
    raise Bad(f"unknown protocol {printable(tok)}")


# RFC 1349: the four TOS bits of the TOS byte (bit 0 must stay zero; the top three are precedence).
TOS_BITS = 0x1E
TOS_NAMES = {0x10: "Minimize-Delay", 0x08: "Maximize-Throughput", 0x04: "Maximize-Reliability",
             0x02: "Minimize-Cost", 0x00: "Normal-Service"}
_HEXBYTE = re.compile(r"(0[xX])?[0-9a-fA-F]{1,2}\Z")


def parse_tos(and_tok: str, xor_tok: str) -> tuple[int, int, list[str]]:
    """``-t ANDMASK XORMASK`` (hex bytes) -> (and, xor, warnings), with ipchains' checks.

    Refused, as ipchains refused them: masks that change bit 0, and masks that
    always set more than one TOS bit. Masks that set more than one TOS bit for
    some TOS values are accepted with a warning naming those values.
    """
    vals = []
    for tok in (and_tok, xor_tok):
        if not _HEXBYTE.match(tok):
            raise Bad(f"bad TOS mask {printable(tok)}: a hex byte such as 0x01 or 0x10")
        vals.append(int(tok, 16))
    a, x = vals
    if not a & 1 or x & 1:
        raise Bad(f"TOS masks {and_tok} {xor_tok} would change bit 0 (RFC 1349): the AND mask must "
                  "keep it (be odd) and the XOR mask leave it (be even)")
    if bin(~a & x & TOS_BITS).count("1") > 1:
        raise Bad(f"TOS masks {and_tok} {xor_tok} always set more than one TOS bit (RFC 1349 allows one)")
    warnings = [f"{name} (0x{v:02x})" for v, name in TOS_NAMES.items()
                if bin(((v & a) ^ x) & TOS_BITS).count("1") > 1]
    return a, x, warnings
