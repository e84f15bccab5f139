"""NAT-PMP (RFC 6886) and PCP (RFC 6887) on the wire: field layouts, codes, response builders.

Both protocols share UDP port 5351 on the server and 5350 on the clients
(RFC 6887 appendix A): the first octet is the version, 0 for NAT-PMP, 2 for
PCP. This module knows the formats; what a request does is decided by
:mod:`masqd.engine.pcp`.

PCP request (24-octet common header, then the opcode's data, then options)::

    0 Version | R=0,Opcode | Reserved (16)      4 Requested Lifetime
    8 PCP Client's IP Address (128; IPv4 as ::ffff:a.b.c.d)

PCP response (24 octets, then the opcode's data, then options)::

    0 Version | R=1,Opcode | Reserved | Result  4 Lifetime   8 Epoch Time
    12 Reserved (96)

MAP data (36 octets): Nonce (96) | Protocol, Reserved (24) | Internal Port,
Suggested/Assigned External Port | External IP Address (128). PEER data (56
octets): MAP's, then Remote Peer Port, Reserved (16) | Remote Peer IP Address
(128). An option: Code | Reserved | Length (16) | data padded to 4 octets.

masqd's own opcode ``SPI_ANNOUNCE`` (96, in the private-use range of RFC
6887 section 19.2) is described in docs/pcp.md: Nonce (96) | Protocol (50),
Reserved (24) | Outbound SPI | Inbound SPI | Remote Peer IP Address (128).
"""

from __future__ import annotations

import struct

from masqd.wire.checksum import checksum, pseudo_header_sum
from masqd.wire.ipv4 import UDP, build_ipv4

SERVER_PORT = 5351  # requests go here (both protocols)
CLIENT_PORT = 5350  # unsolicited announcements go here
ALL_HOSTS = 0xE0000001  # 224.0.0.1
MAX_PCP = 1100  # octets (RFC 6887 section 7)

NATPMP_VERSION, PCP_VERSION = 0, 2

# NAT-PMP opcodes and result codes (RFC 6886 sections 3.2, 3.3, 3.5)
NATPMP_OP_ADDRESS, NATPMP_OP_MAP_UDP, NATPMP_OP_MAP_TCP = 0, 1, 2
NATPMP_SUCCESS, NATPMP_UNSUPP_VERSION, NATPMP_NOT_AUTHORIZED = 0, 1, 2
NATPMP_NETWORK_FAILURE, NATPMP_NO_RESOURCES, NATPMP_UNSUPP_OPCODE = 3, 4, 5

# PCP opcodes (RFC 6887 section 19.2) and masqd's private one
OP_ANNOUNCE, OP_MAP, OP_PEER = 0, 1, 2
OP_SPI_ANNOUNCE = 96

# PCP options (RFC 6887 section 13)
OPT_THIRD_PARTY, OPT_PREFER_FAILURE, OPT_FILTER = 1, 2, 3

# PCP result codes (RFC 6887 section 7.4)
SUCCESS = 0
UNSUPP_VERSION = 1
NOT_AUTHORIZED = 2
MALFORMED_REQUEST = 3
UNSUPP_OPCODE = 4
UNSUPP_OPTION = 5
MALFORMED_OPTION = 6
NETWORK_FAILURE = 7
NO_RESOURCES = 8
UNSUPP_PROTOCOL = 9
USER_EX_QUOTA = 10
CANNOT_PROVIDE_EXTERNAL = 11
ADDRESS_MISMATCH = 12
EXCESSIVE_REMOTE_PEERS = 13

RESULT_NAMES = {
    SUCCESS: "success", UNSUPP_VERSION: "unsupp_version", NOT_AUTHORIZED: "not_authorized",
    MALFORMED_REQUEST: "malformed_request", UNSUPP_OPCODE: "unsupp_opcode", UNSUPP_OPTION: "unsupp_option",
    MALFORMED_OPTION: "malformed_option", NETWORK_FAILURE: "network_failure", NO_RESOURCES: "no_resources",
    UNSUPP_PROTOCOL: "unsupp_protocol", USER_EX_QUOTA: "user_ex_quota",
    CANNOT_PROVIDE_EXTERNAL: "cannot_provide_external", ADDRESS_MISMATCH: "address_mismatch",
    EXCESSIVE_REMOTE_PEERS: "excessive_remote_peers",
}
NATPMP_RESULT_NAMES = {
    NATPMP_SUCCESS: "success", NATPMP_UNSUPP_VERSION: "unsupp_version", NATPMP_NOT_AUTHORIZED: "not_authorized",
    NATPMP_NETWORK_FAILURE: "network_failure", NATPMP_NO_RESOURCES: "no_resources",
    NATPMP_UNSUPP_OPCODE: "unsupp_opcode",
}

# Errors a client should remember long (RFC 6887 section 7.4 "long lifetime"), the others briefly.
SHORT_ERRORS = frozenset({NETWORK_FAILURE, NO_RESOURCES, USER_EX_QUOTA, CANNOT_PROVIDE_EXTERNAL})
LONG_ERROR_LIFETIME = 1800
SHORT_ERROR_LIFETIME = 30

HEADER = 24
MAP_DATA = 36
PEER_DATA = 56
SPI_DATA = 40

_V4MAPPED = b"\0" * 10 + b"\xff\xff"
_RESP = struct.Struct("!BBBBII12x")


def v4mapped(addr: int) -> bytes:
    """An IPv4 address as PCP carries it: ::ffff:a.b.c.d."""
    return _V4MAPPED + addr.to_bytes(4, "big")


def from_v4mapped(b: bytes | bytearray) -> int | None:
    """The IPv4 address in a 16-octet PCP address field; None if it is not IPv4-mapped."""
    if len(b) != 16 or bytes(b[:12]) != _V4MAPPED:
        return None
    return int.from_bytes(b[12:16], "big")


def is_unspecified(b: bytes | bytearray) -> bool:
    """All zeros or ::ffff:0.0.0.0: no suggestion (RFC 6887 sections 11.1, 12.1)."""
    return not any(b) or bytes(b) == _V4MAPPED + b"\0\0\0\0"


def pcp_response(request: bytes | bytearray, result: int, lifetime: int, epoch: int, version: int = PCP_VERSION,
                 length: int | None = None) -> bytearray:
    """A PCP response to ``request``: the request copied (opcode data and options included,
    truncated to 1100 octets and padded to a multiple of 4, at least 24), the R bit set and
    the server's fields (result, lifetime, epoch time; reserved octets zero) written over
    the header. ``length`` keeps only that many octets (e.g. the header and opcode data)."""
    n = min(len(request), MAX_PCP) if length is None else length
    n = max(HEADER, (n + 3) & ~3)
    out = bytearray(request[:n])
    out.extend(b"\0" * (n - len(out)))
    opcode = request[1] & 0x7F if len(request) > 1 else 0
    _RESP.pack_into(out, 0, version, 0x80 | opcode, 0, result, lifetime & 0xFFFFFFFF, epoch & 0xFFFFFFFF)
    return out


def pcp_announce(epoch: int) -> bytes:
    """An unsolicited PCP ANNOUNCE response (RFC 6887 section 14.1)."""
    return _RESP.pack(PCP_VERSION, 0x80 | OP_ANNOUNCE, 0, SUCCESS, 0, epoch & 0xFFFFFFFF)


def natpmp_address(result: int, epoch: int, external: int) -> bytes:
    """NAT-PMP external address response (RFC 6886 section 3.2), also the announcement."""
    return struct.pack("!BBHII", NATPMP_VERSION, 128 + NATPMP_OP_ADDRESS, result, epoch & 0xFFFFFFFF, external)


def natpmp_error(opcode: int, result: int, epoch: int) -> bytes:
    """The 8-octet NAT-PMP response header alone (unsupported version or opcode, RFC 6886 3.5)."""
    return struct.pack("!BBHI", NATPMP_VERSION, (128 + opcode) & 0xFF, result, epoch & 0xFFFFFFFF)


def natpmp_map(opcode: int, result: int, epoch: int, internal: int, external: int, lifetime: int) -> bytes:
    """NAT-PMP mapping response (RFC 6886 section 3.3)."""
    return struct.pack("!BBHIHHI", NATPMP_VERSION, 128 + opcode, result, epoch & 0xFFFFFFFF, internal, external,
                       lifetime & 0xFFFFFFFF)


def build_udp(src: int, dst: int, sport: int, dport: int, payload: bytes, ttl: int = 64) -> bytearray:
    """An IPv4/UDP datagram with both checksums."""
    udp = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)) + payload
    c = checksum(udp, pseudo_header_sum(src, dst, UDP, len(udp))) or 0xFFFF
    udp[6] = c >> 8
    udp[7] = c & 255
    return build_ipv4(src, dst, UDP, bytes(udp), ttl=ttl)


def udp_checksum_ok(pkt: bytes | bytearray, ihl: int, ulen: int) -> bool:
    """The UDP checksum of a received datagram is right (or absent: zero)."""
    if pkt[ihl + 6] == 0 and pkt[ihl + 7] == 0:
        return True
    src = int.from_bytes(pkt[12:16], "big")
    dst = int.from_bytes(pkt[16:20], "big")
    return checksum(bytes(pkt[ihl:ihl + ulen]), pseudo_header_sum(src, dst, UDP, ulen)) == 0
