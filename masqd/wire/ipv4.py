"""IPv4 and the transport headers masqd reads: offsets, validation and builders.

Validation happens once, at the edge (``check_ipv4``): it either returns the
header length or raises ``Malformed(reason)``. After it, the engine reads
fields with plain indexing and ``struct`` without further checks. The checks
are a router's input checks of RFC 1812 section 5.2.2: at least 20 bytes
received, version 4, IHL >= 5, the header checksum, total length >= IHL * 4 and
<= the bytes received (link padding beyond it is trimmed).
"""

from __future__ import annotations

import struct

from masqd.wire.checksum import checksum

# IP protocol numbers
ICMP, TCP, UDP, GRE, ESP, AH = 1, 6, 17, 47, 50, 51
PROTO_NAMES = {ICMP: "icmp", TCP: "tcp", UDP: "udp", GRE: "gre", ESP: "esp", AH: "ah"}

# Flags / fragment field
IP_DF = 0x4000
IP_MF = 0x2000
IP_OFFMASK = 0x1FFF

# TCP flags
TH_FIN, TH_SYN, TH_RST, TH_PSH, TH_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

# ICMP types
ICMP_ECHOREPLY = 0
ICMP_UNREACH = 3
ICMP_SOURCEQUENCH = 4
ICMP_REDIRECT = 5
ICMP_ECHO = 8
ICMP_TIMXCEED = 11
ICMP_PARAMPROB = 12
ICMP_TSTAMP, ICMP_TSTAMPREPLY = 13, 14
ICMP_ERRORS = frozenset({ICMP_UNREACH, ICMP_SOURCEQUENCH, ICMP_REDIRECT, ICMP_TIMXCEED, ICMP_PARAMPROB})
ICMP_QUERIES = {ICMP_ECHO: ICMP_ECHOREPLY, ICMP_TSTAMP: ICMP_TSTAMPREPLY}
ICMP_REPLIES = {v: k for k, v in ICMP_QUERIES.items()}

# ICMP unreachable codes
UNREACH_NET, UNREACH_HOST, UNREACH_PROTO, UNREACH_PORT, UNREACH_NEEDFRAG = 0, 1, 2, 3, 4
UNREACH_FILTER = 13

_HDR = struct.Struct("!BBHHHBBH4s4s")


class Malformed(Exception):
    """A packet that cannot be trusted; ``reason`` is a short counter-friendly code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_ipv4(pkt: bytearray) -> int:
    """Validate the IPv4 header and trim link padding. Returns the header length."""
    n = len(pkt)
    if n < 20:
        raise Malformed("truncated_ip")
    b0 = pkt[0]
    if b0 >> 4 != 4:
        raise Malformed("not_ipv4")
    ihl = (b0 & 15) << 2
    if ihl < 20:
        raise Malformed("bad_ihl")
    if ihl > n:
        raise Malformed("truncated_ip")
    tot = (pkt[2] << 8) | pkt[3]
    if tot < ihl:
        raise Malformed("bad_total_length")
    if tot > n:
        raise Malformed("truncated_ip")
    if int.from_bytes(pkt[:ihl], "big") % 0xFFFF:
        raise Malformed("bad_ip_checksum")
    if tot < n:
        del pkt[tot:]
    if ihl > 20:
        _check_options(pkt, ihl)
    return ihl


def header_checksum_ok(hdr: bytes | bytearray) -> bool:
    """True when the IPv4 header ``hdr`` (exactly the header's bytes) has a correct checksum.

    The ones'-complement sum of 16-bit words is congruent to the header read as one big-endian
    integer modulo 0xFFFF (2**16 = 1 mod 0xFFFF), and a header's checksum is right exactly when
    that sum is 0xFFFF (never 0: the version byte is not zero): one C call instead of a loop.
    """
    return not int.from_bytes(hdr, "big") % 0xFFFF


def _check_options(pkt: bytearray, ihl: int) -> None:
    i = 20
    while i < ihl:
        t = pkt[i]
        if t == 0:  # end of list
            return
        if t == 1:  # no-op
            i += 1
            continue
        if i + 1 >= ihl:
            raise Malformed("bad_ip_options")
        ln = pkt[i + 1]
        if ln < 2 or i + ln > ihl:
            raise Malformed("bad_ip_options")
        i += ln


def ip_str(a: int) -> str:
    return f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"


def ip_int(s: str) -> int:
    p = s.split(".")
    if len(p) != 4:
        raise ValueError(f"not an IPv4 address: {s!r}")
    v = 0
    for x in p:
        o = int(x)
        if not 0 <= o <= 255:
            raise ValueError(f"not an IPv4 address: {s!r}")
        v = (v << 8) | o
    return v


def build_ipv4(src: int, dst: int, proto: int, payload: bytes, ttl: int = 64, ident: int = 0, df: bool = False, tos: int = 0) -> bytearray:
    """A fresh IPv4 packet with a correct header checksum."""
    tot = 20 + len(payload)
    hdr = bytearray(
        _HDR.pack(0x45, tos, tot, ident & 0xFFFF, IP_DF if df else 0, ttl, proto, 0, src.to_bytes(4, "big"), dst.to_bytes(4, "big"))
    )
    c = checksum(hdr)
    hdr[10] = c >> 8
    hdr[11] = c & 255
    hdr += payload
    return hdr


def rewrite_tos(pkt: bytearray, tos_and: int, tos_xor: int) -> bool:
    """TOS byte := (TOS & ``tos_and``) ^ ``tos_xor``, the header checksum updated
    incrementally (RFC 1624: the word holding version/IHL and TOS changes). True if it changed."""
    old = pkt[1]
    new = (old & tos_and) ^ tos_xor
    if new == old:
        return False
    s = ((pkt[10] << 8 | pkt[11]) ^ 0xFFFF) + ((pkt[0] << 8 | old) ^ 0xFFFF) + (pkt[0] << 8 | new)
    s = (s & 0xFFFF) + (s >> 16)
    s = ((s & 0xFFFF) + (s >> 16)) ^ 0xFFFF
    pkt[1] = new
    pkt[10], pkt[11] = s >> 8, s & 0xFF
    return True


def set_ip_checksum(pkt: bytearray, ihl: int) -> None:
    pkt[10] = 0
    pkt[11] = 0
    c = checksum(pkt[:ihl])
    pkt[10] = c >> 8
    pkt[11] = c & 255


def build_icmp(src: int, dst: int, icmp_type: int, code: int, rest: int, body: bytes, ttl: int = 64, ident: int = 0) -> bytearray:
    """An ICMP message (``rest`` is the 32-bit word after the checksum)."""
    msg = bytearray(struct.pack("!BBHI", icmp_type, code, 0, rest & 0xFFFFFFFF)) + body
    c = checksum(msg)
    msg[2] = c >> 8
    msg[3] = c & 255
    return build_ipv4(src, dst, ICMP, bytes(msg), ttl=ttl, ident=ident)


def l4_checksum(pkt: bytearray, ihl: int) -> int:
    """Full TCP/UDP/ICMP checksum of the packet's payload as it would be stored (for tests and rebuilds)."""
    from masqd.wire.checksum import pseudo_header_sum

    proto = pkt[9]
    seg = bytes(pkt[ihl:])
    if proto == ICMP:
        return checksum(seg[:2] + b"\0\0" + seg[4:])
    src = int.from_bytes(pkt[12:16], "big")
    dst = int.from_bytes(pkt[16:20], "big")
    off = 16 if proto == TCP else 6
    seg = seg[:off] + b"\0\0" + seg[off + 2 :]
    c = checksum(seg, pseudo_header_sum(src, dst, proto, len(seg)))
    if proto == UDP and c == 0:
        c = 0xFFFF
    return c


def decrement_ttl(pkt: bytearray) -> None:
    """TTL - 1 in place, the header checksum updated incrementally (RFC 1624)."""
    pkt[8] -= 1
    c = ((pkt[10] << 8 | pkt[11]) ^ 0xFFFF) + 0xFEFF
    c = (c & 0xFFFF) + (c >> 16)
    c = (c & 0xFFFF) + (c >> 16)
    pkt[10] = (c ^ 0xFFFF) >> 8
    pkt[11] = (c ^ 0xFFFF) & 0xFF
