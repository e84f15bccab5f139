"""ESP (RFC 4303) header view: the SPI and sequence number a masquerade can read.

Everything after the 8-byte header is encrypted; the SPI is the only handle a
masquerading gateway has on a security association. SPI 0 is reserved for
local use and never appears on the wire; 1..255 are reserved by IANA
(RFC 4303 section 2.1), so both are refused by the engine.
"""

from __future__ import annotations

import struct

from masqd.wire.ipv4 import Malformed

ESP_HDR_LEN = 8
SPI_RESERVED_MAX = 255  # 1..255: reserved by IANA; 0: never on the wire

_ESP = struct.Struct("!II")


def esp_header(pkt: bytes | bytearray, off: int) -> tuple[int, int]:
    """(spi, seq) of the ESP header at ``off``; Malformed("esp_truncated") when short."""
    if len(pkt) < off + ESP_HDR_LEN:
        raise Malformed("esp_truncated")
    spi, seq = _ESP.unpack_from(pkt, off)
    return spi, seq


def spi_reason(spi: int) -> str | None:
    """Why an SPI value is refused, or None when it is usable."""
    if spi == 0:
        return "esp_spi_zero"
    if spi <= SPI_RESERVED_MAX:
        return "esp_reserved_spi"
    return None


def build_esp(spi: int, seq: int, payload: bytes = b"") -> bytes:
    """An ESP header followed by ``payload`` (opaque: tests and tools only)."""
    return _ESP.pack(spi & 0xFFFFFFFF, seq & 0xFFFFFFFF) + payload
