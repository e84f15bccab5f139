"""Values inside rule lines: addresses with masks, ports and ranges, protocols, ICMP types.

Every function takes one word and returns plain ints, or raises ``Bad`` with
the reason; none knows which tool wrote the word.
"""

from __future__ import annotations

import re

from masqd.firewall.lexer import Bad, printable
from masqd.firewall.model import PROTO_BY_NAME, Ports

ICMP, TCP, UDP = 1, 6, 17

# ICMP names as ipchains knew them: name -> (type, code or None).
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
    "time-exceeded": (11, None), "ttl-zero-during-transit": (11, 0), "ttl-zero-during-reassembly": (11, 1),
    "parameter-problem": (12, None), "ip-header-bad": (12, 0), "required-option-missing": (12, 1),
    "timestamp-request": (13, None), "timestamp-reply": (14, None),
    "address-mask-request": (17, None), "address-mask-reply": (18, None),
}

SERVICES = {
    "ftp-data": 20, "ftp": 21, "ssh": 22, "telnet": 23, "smtp": 25, "domain": 53, "bootps": 67,
    "bootpc": 68, "www": 80, "http": 80, "pop3": 110, "sunrpc": 111, "auth": 113, "ntp": 123,
    "imap": 143, "imap2": 143, "snmp": 161, "https": 443, "isakmp": 500, "pptp": 1723,
    "ipsec-nat-t": 4500,
}

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


def port_number(tok: str, proto: int) -> int:
    """A port (or service name) of ``proto``; for ICMP a type number."""
    top = 255 if proto == ICMP else 65535
    if tok.isdigit() and len(tok) <= 5:
        v = int(tok)
        if v > top:
            raise Bad(f"{'ICMP type' if proto == ICMP else 'port'} {tok} above {top}")
        return v
    if proto != ICMP and tok in SERVICES:
        return SERVICES[tok]
    if proto == ICMP:
        raise Bad(f"unknown ICMP type {printable(tok)}")
    raise Bad(f"bad port {printable(tok)}")


def parse_ports(tok: str, proto: int, allow_list: bool = False) -> tuple[Ports, int | None]:
    """A port, ``lo:hi``, ``:hi``, ``lo:`` (or an ICMP type name) -> (ranges, ICMP code or None)."""
    if proto == ICMP and tok.lower() in ICMP_TYPES:
        t, code = ICMP_TYPES[tok.lower()]
        return ((t, t),), code
    top = 255 if proto == ICMP else 65535
    out: list[tuple[int, int]] = []
    pieces = tok.split(",") if allow_list else [tok]
    for piece in pieces:
        if ":" in piece:
            lo_s, hi_s = piece.split(":", 1)
            lo = port_number(lo_s, proto) if lo_s else 0
            hi = port_number(hi_s, proto) if hi_s else top
            if lo > hi:
                raise Bad(f"empty port range {printable(piece)}")
        else:
            lo = hi = port_number(piece, proto)
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
