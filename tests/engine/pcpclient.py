"""A PCP / NAT-PMP client for the tests, written from the RFCs' layouts, not from masqd's code.

RFC 6886 (NAT-PMP): section 3.2 (external address: request ``0, 0``; response
version, opcode 128, result (16), seconds since start of epoch, address) and
3.3 (mapping: request version, opcode 1 UDP / 2 TCP, reserved (16), internal
port, suggested external port, requested lifetime; response version, opcode
128+op, result (16), epoch, internal port, mapped external port, lifetime).

RFC 6887 (PCP): section 7.1 (request header: version, R|opcode, reserved (16),
requested lifetime, client address as 16 octets), 7.2 (response header:
version, R|opcode, reserved (8), result (8), lifetime, epoch time, reserved
(96)), 7.3 (options: code, reserved, length (16), data padded to 4), 11.1
(MAP: nonce (96), protocol, reserved (24), internal port, suggested external
port, suggested external address (128)), 12.1 (PEER: MAP's fields, then remote
peer port, reserved (16), remote peer address (128)), 13.1-13.3 (THIRD_PARTY,
PREFER_FAILURE, FILTER). masqd's SPI_ANNOUNCE is laid out as docs/pcp.md says.

``tests/engine/test_pcp_encoder.py`` checks these encodings against Wireshark's
own PCP / NAT-PMP dissector.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

TCP, UDP, ESP = 6, 17, 50


def addr16(a: str) -> bytes:
    """An IPv4 address as PCP carries it (RFC 6887 section 5: IPv4-mapped IPv6)."""
    return bytes(10) + b"\xff\xff" + socket.inet_aton(a)


def option(code: int, data: bytes = b"") -> bytes:
    pad = (-len(data)) % 4
    return struct.pack("!BBH", code, 0, len(data)) + data + bytes(pad)


def third_party(a: str) -> bytes:
    return option(1, addr16(a))


def prefer_failure() -> bytes:
    return option(2)


def filter_option(prefix_len: int, port: int, a: str) -> bytes:
    return option(3, struct.pack("!BBH", 0, prefix_len, port) + addr16(a))


def header(opcode: int, lifetime: int, client: str, version: int = 2) -> bytes:
    return struct.pack("!BBHI", version, opcode & 0x7F, 0, lifetime) + addr16(client)


def map_request(client: str, nonce: bytes, proto: int, internal: int, suggested: int = 0,
                suggested_addr: str = "0.0.0.0", lifetime: int = 3600, options: bytes = b"",
                version: int = 2) -> bytes:
    assert len(nonce) == 12
    body = nonce + struct.pack("!B3xHH", proto, internal, suggested) + addr16(suggested_addr)
    return header(1, lifetime, client, version) + body + options


def peer_request(client: str, nonce: bytes, proto: int, internal: int, remote: str, remote_port: int,
                 suggested: int = 0, lifetime: int = 600, options: bytes = b"") -> bytes:
    body = (nonce + struct.pack("!B3xHH", proto, internal, suggested) + addr16("0.0.0.0")
            + struct.pack("!H2x", remote_port) + addr16(remote))
    return header(2, lifetime, client) + body + options


def announce_request(client: str) -> bytes:
    return header(0, 0, client)


def spi_request(client: str, nonce: bytes, spi_out: int, spi_in: int, remote: str, lifetime: int = 3600,
                proto: int = ESP, options: bytes = b"") -> bytes:
    body = nonce + struct.pack("!B3xII", proto, spi_out, spi_in) + addr16(remote)
    return header(96, lifetime, client) + body + options


def natpmp_address_request() -> bytes:
    return b"\x00\x00"


def natpmp_map_request(proto: str, internal: int, suggested: int, lifetime: int) -> bytes:
    return struct.pack("!BBHHHI", 0, 1 if proto == "udp" else 2, 0, internal, suggested, lifetime)


@dataclass
class PcpAnswer:
    version: int
    opcode: int
    response: bool
    result: int
    lifetime: int
    epoch: int
    raw: bytes

    # MAP / PEER fields (when present)
    @property
    def nonce(self) -> bytes:
        return self.raw[24:36]

    @property
    def protocol(self) -> int:
        return self.raw[36]

    @property
    def internal_port(self) -> int:
        return int(struct.unpack_from("!H", self.raw, 40)[0])

    @property
    def external_port(self) -> int:
        return int(struct.unpack_from("!H", self.raw, 42)[0])

    @property
    def external_address(self) -> str:
        assert self.raw[44:56] == bytes(10) + b"\xff\xff", self.raw[44:60].hex()
        return socket.inet_ntoa(self.raw[56:60])


def parse_pcp(b: bytes) -> PcpAnswer:
    assert len(b) >= 24 and len(b) % 4 == 0, len(b)
    v, ro, _res, result, life, epoch = struct.unpack_from("!BBBBII", b, 0)
    assert b[12:24] == bytes(12), "reserved octets of a response must be zero"
    return PcpAnswer(v, ro & 0x7F, bool(ro & 0x80), result, life, epoch, b)


@dataclass
class NatPmpAnswer:
    version: int
    opcode: int
    result: int
    epoch: int
    address: str | None = None
    internal: int | None = None
    external: int | None = None
    lifetime: int | None = None


def parse_natpmp(b: bytes) -> NatPmpAnswer:
    v, op, result, epoch = struct.unpack_from("!BBHI", b, 0)
    a = NatPmpAnswer(v, op, result, epoch)
    if op == 128 and len(b) >= 12:
        a.address = socket.inet_ntoa(b[8:12])
    elif op in (129, 130) and len(b) >= 16:
        a.internal, a.external, a.lifetime = struct.unpack_from("!HHI", b, 8)
    return a
