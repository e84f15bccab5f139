"""Internet checksums: full computation (RFC 1071) and incremental update (RFC 1624).

The fast path never sums a payload: it folds a precomputed delta into the old
checksum field. ``delta`` values are plain ints (unfolded sums of 16-bit words).
"""

from __future__ import annotations

import sys
from array import array

_LITTLE = sys.byteorder == "little"


def ones_sum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """Ones-complement sum of ``data`` (big-endian 16-bit words), folded to 16 bits."""
    n = len(data)
    if n & 1:
        data = bytes(data) + b"\x00"
    a = array("H", bytes(data))
    if _LITTLE:
        a.byteswap()
    s = sum(a) + start
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def checksum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The Internet checksum of ``data`` (value to store in the header field)."""
    return (~ones_sum(data, start)) & 0xFFFF


def fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def word_delta(old: int, new: int) -> int:
    """Delta for replacing one 16-bit word ``old`` by ``new`` (RFC 1624 ~m + m')."""
    return ((~old) & 0xFFFF) + new


def addr_delta(old: int, new: int) -> int:
    """Delta for replacing a 32-bit address ``old`` by ``new``."""
    return (
        ((~old >> 16) & 0xFFFF)
        + ((~old) & 0xFFFF)
        + ((new >> 16) & 0xFFFF)
        + (new & 0xFFFF)
    )


def apply_delta(csum: int, delta: int) -> int:
    """New checksum field value after changes summarised by ``delta`` (RFC 1624 eqn 3)."""
    s = ((~csum) & 0xFFFF) + delta
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def apply_delta_udp(csum: int, delta: int) -> int:
    """As ``apply_delta`` for UDP: 0 means "no checksum" and stays 0; a result of 0 is sent as 0xffff."""
    if csum == 0:
        return 0
    r = apply_delta(csum, delta)
    return r or 0xFFFF


def pseudo_header_sum(src: int, dst: int, proto: int, length: int) -> int:
    return (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + proto + length
