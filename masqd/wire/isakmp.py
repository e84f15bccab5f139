"""ISAKMP / IKEv1 (RFC 2408) and IKEv2 (RFC 7296) fixed header view.

Both versions start with the same 28 bytes: initiator cookie / IKE SA
initiator SPI (8), responder cookie / responder SPI (8), next payload,
version (major << 4 | minor), exchange type, flags, message ID, length. The
masquerade routes on the 8+8 byte pair; it never reads the (encrypted)
payloads.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from masqd.wire.ipv4 import Malformed

ISAKMP_HDR_LEN = 28
ZERO_COOKIE = b"\x00" * 8

# exchange types
IKEV1_MAIN, IKEV1_AGGRESSIVE, IKEV1_INFO, IKEV1_QUICK = 2, 4, 5, 32
IKEV2_SA_INIT, IKEV2_AUTH, IKEV2_CREATE_CHILD_SA, IKEV2_INFORMATIONAL = 34, 35, 36, 37
EXCHANGE_NAMES = {
    IKEV1_MAIN: "main", IKEV1_AGGRESSIVE: "aggressive", IKEV1_INFO: "informational-v1",
    IKEV1_QUICK: "quick", IKEV2_SA_INIT: "IKE_SA_INIT", IKEV2_AUTH: "IKE_AUTH",
    IKEV2_CREATE_CHILD_SA: "CREATE_CHILD_SA", IKEV2_INFORMATIONAL: "INFORMATIONAL",
}
# IKEv2 header flags
IKEV2_F_INITIATOR, IKEV2_F_VERSION, IKEV2_F_RESPONSE = 0x08, 0x10, 0x20

_TAIL = struct.Struct("!BBBBII")


class IsakmpHeader(NamedTuple):
    icookie: bytes
    rcookie: bytes
    next_payload: int
    major: int
    minor: int
    exchange: int
    flags: int
    msgid: int
    length: int


def isakmp_header(pkt: bytes | bytearray, off: int) -> IsakmpHeader:
    """Parse and check the header at ``off`` (the UDP payload); raises Malformed."""
    avail = len(pkt) - off
    if avail < ISAKMP_HDR_LEN:
        raise Malformed("isakmp_truncated")
    np, ver, ex, fl, mid, ln = _TAIL.unpack_from(pkt, off + 16)
    major = ver >> 4
    if major not in (1, 2):
        raise Malformed("isakmp_bad_version")
    if ln < ISAKMP_HDR_LEN or ln > avail:
        raise Malformed("isakmp_bad_length")
    return IsakmpHeader(bytes(pkt[off:off + 8]), bytes(pkt[off + 8:off + 16]), np, major, ver & 15, ex, fl,
                        mid, ln)


def build_isakmp(icookie: bytes, rcookie: bytes = ZERO_COOKIE, *, version: int = 0x10, exchange: int = IKEV1_MAIN,
                 flags: int = 0, msgid: int = 0, next_payload: int = 0, body: bytes = b"") -> bytes:
    """A header (and opaque body) with a correct length field (tests and tools)."""
    if len(icookie) != 8 or len(rcookie) != 8:
        raise ValueError("cookies are 8 bytes")
    return icookie + rcookie + _TAIL.pack(next_payload, version, exchange, flags, msgid,
                                          ISAKMP_HDR_LEN + len(body)) + body
