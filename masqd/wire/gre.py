"""GRE headers: plain GRE (RFC 2784/2890) and PPTP's enhanced GRE (RFC 2637 section 4.1).

One job: tell which kind of GRE a packet carries and where its fields are.
``gre_kind`` is the edge check: it returns ``PPTP`` or ``PLAIN`` or raises
``Malformed``; after it, the Call ID and the sequence/acknowledgment numbers
can be read at fixed offsets without further checks.

Enhanced GRE header (all big-endian)::

    0      byte 0: C R K S s Recur(3)     C=0 R=0 K=1 s=0 Recur=0; S optional
    1      byte 1: A Flags(4) Ver(3)      A optional, Flags=0, Ver=1
    2..3   protocol type                  0x880B (PPP)
    4..5   payload length                 (the high half of the key)
    6..7   Call ID                        (the low half: the *receiver's* Call ID)
    8..11  sequence number                present when S
    ..+4   acknowledgment number          present when A

Neither kind has a checksum over the IP addresses, and enhanced GRE has no
checksum at all (C=0), so rewriting the IP addresses or the Call ID needs no
GRE checksum update.
"""

from __future__ import annotations

from masqd.wire.ipv4 import Malformed

GRE_PROTO = 47
PPP_PROTO = 0x880B

# byte 0
F_CSUM = 0x80
F_ROUTING = 0x40
F_KEY = 0x20
F_SEQ = 0x10
F_STRICT = 0x08
RECUR_MASK = 0x07
# byte 1
F_ACK = 0x80
FLAGS1_MASK = 0x78
VER_MASK = 0x07

# offsets from the start of the GRE header
OFF_PROTO = 2
OFF_PAYLOAD_LEN = 4
OFF_CALL_ID = 6
OFF_SEQ = 8

PLAIN, PPTP = 0, 1


def gre_kind(pkt: bytes | bytearray, off: int) -> int:
    """Validate the GRE header at ``off``; ``PPTP`` for enhanced GRE, ``PLAIN`` for version 0."""
    n = len(pkt) - off
    if n < 4:
        raise Malformed("gre_truncated")
    b0 = pkt[off]
    b1 = pkt[off + 1]
    ver = b1 & VER_MASK
    if ver == 1:
        if pkt[off + 2] != 0x88 or pkt[off + 3] != 0x0B:
            raise Malformed("gre_bad_protocol")
        if b0 & (F_CSUM | F_ROUTING | F_STRICT | RECUR_MASK) or not b0 & F_KEY or b1 & FLAGS1_MASK:
            raise Malformed("gre_bad_flags")
        hl = header_length(pkt, off)
        if n < hl:
            raise Malformed("gre_truncated")
        plen = (pkt[off + 4] << 8) | pkt[off + 5]
        if plen > n - hl or (plen and not b0 & F_SEQ):
            raise Malformed("gre_bad_length")
        return PPTP
    if ver == 0:
        if b0 & F_ROUTING:  # RFC 1701 source routing: deprecated by RFC 2784, not masqueraded
            raise Malformed("gre_bad_flags")
        hl = 4 + (4 if b0 & F_CSUM else 0) + (4 if b0 & F_KEY else 0) + (4 if b0 & F_SEQ else 0)
        if n < hl:
            raise Malformed("gre_truncated")
        return PLAIN
    raise Malformed("gre_bad_version")


def header_length(pkt: bytes | bytearray, off: int) -> int:
    """Length of an enhanced GRE header (8, 12 or 16 bytes)."""
    return 8 + (4 if pkt[off] & F_SEQ else 0) + (4 if pkt[off + 1] & F_ACK else 0)


def call_id(pkt: bytes | bytearray, off: int) -> int:
    """The Call ID (low half of the key) of an enhanced GRE header."""
    return (pkt[off + OFF_CALL_ID] << 8) | pkt[off + OFF_CALL_ID + 1]


def set_call_id(pkt: bytearray, off: int, cid: int) -> None:
    pkt[off + OFF_CALL_ID] = cid >> 8
    pkt[off + OFF_CALL_ID + 1] = cid & 0xFF


def build_pptp_gre(cid: int, payload: bytes = b"", seq: int | None = None, ack: int | None = None) -> bytes:
    """An enhanced GRE header and payload (for tests and benchmarks)."""
    b0 = F_KEY | (F_SEQ if seq is not None else 0)
    b1 = (F_ACK if ack is not None else 0) | 1
    out = bytearray((b0, b1, 0x88, 0x0B))
    out += len(payload).to_bytes(2, "big") + cid.to_bytes(2, "big")
    if seq is not None:
        out += seq.to_bytes(4, "big")
    if ack is not None:
        out += ack.to_bytes(4, "big")
    return bytes(out + payload)
