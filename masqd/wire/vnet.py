"""The virtio-net header that TUN/TAP puts in front of each packet with IFF_VNET_HDR.

Layout (10 bytes, little-endian on this machine: the kernel uses the host's
byte order for legacy headers)::

    u8 flags        NEEDS_CSUM (1): the L4 checksum is partial; DATA_VALID (2)
    u8 gso_type     NONE 0, TCPV4 1, UDP 3, TCPV6 4, UDP_L4 5; ECN bit 0x80
    u16 hdr_len     bytes of headers (a hint, counted from the frame start)
    u16 gso_size    payload bytes per segment of a super-packet
    u16 csum_start  where checksumming starts (from the frame start)
    u16 csum_offset where the result goes (from csum_start)

With NEEDS_CSUM, the checksum field of the TCP/UDP header holds the folded,
*non-inverted* ones-complement sum of the pseudo-header; whoever completes it
(the kernel, a NIC) adds the rest of the segment and inverts. Changing an
address in the pseudo-header therefore changes that field by the address
delta without inversion, and changing a port (inside the summed area) needs
no update at all. :func:`complete_checksum` does in software what the kernel
does when such a packet reaches a device that cannot offload.

Offsets in the header are relative to the start of what was read: in TAP mode
that includes the 14-byte Ethernet header, in TUN mode it is the IPv4 header.
The engine always works with IPv4-relative offsets (:func:`shift`).
"""

from __future__ import annotations

import struct

from masqd.wire.checksum import fold, ones_sum, pseudo_header_sum

SIZE = 10
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

ZERO = bytes(SIZE)
_HDR = struct.Struct("<BBHHHH")
unpack = _HDR.unpack
pack = _HDR.pack


def shift(hdr: bytes, by: int) -> bytes:
    """The header with ``hdr_len`` and ``csum_start`` moved by ``by`` bytes (TAP <-> IP offsets)."""
    flags, gso, hlen, gsz, cstart, coff = unpack(hdr)
    if flags & F_NEEDS_CSUM:
        cstart += by
    if gso:
        hlen += by
    return pack(flags, gso, max(hlen, 0), gsz, max(cstart, 0), coff)


def complete_checksum(pkt: bytearray, start: int, offset: int, udp: bool = False) -> None:
    """Finish a partial checksum in place: sum ``pkt[start:]`` (seeded by the field) and invert.

    A UDP checksum that comes out as 0 is sent as 0xFFFF (0 means "none").
    """
    pos = start + offset
    seed = (pkt[pos] << 8) | pkt[pos + 1]
    pkt[pos] = pkt[pos + 1] = 0
    c = (~ones_sum(memoryview(pkt)[start:], seed)) & 0xFFFF
    if udp and c == 0:
        c = 0xFFFF
    pkt[pos] = c >> 8
    pkt[pos + 1] = c & 0xFF


def partial_seed(pkt: bytes | bytearray, ihl: int) -> int:
    """The pseudo-header sum a partial TCP/UDP checksum field holds (folded, not inverted)."""
    src = int.from_bytes(pkt[12:16], "big")
    dst = int.from_bytes(pkt[16:20], "big")
    return fold(pseudo_header_sum(src, dst, pkt[9], len(pkt) - ihl))


def segment_size(pkt: bytes | bytearray, ihl: int, gso_type: int, gso_size: int) -> int:
    """Size of each IPv4 packet the kernel will cut a super-packet into (0 if not GSO)."""
    t = gso_type & ~GSO_ECN
    if t == GSO_TCPV4 and len(pkt) >= ihl + 13:
        return ihl + ((pkt[ihl + 12] >> 4) << 2) + gso_size
    if t in (GSO_UDP_L4, GSO_UDP):
        return ihl + 8 + gso_size
    return 0
