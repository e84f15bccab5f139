"""Shared helpers for engine scenario tests: configs and scapy-built packets."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from scapy.all import ICMP, IP, TCP, UDP, raw

from masqd.config import Config, loads
from masqd.engine import Engine

BASE = """
[lan]
address = "10.0.0.1/8"
routes = [{prefix = "198.18.0.0/24"}]
[wan]
address = "203.0.113.200/24"
gateway = "203.0.113.1"
"""

WAN_IP = "203.0.113.200"
LAN_IP = "10.0.0.1"
H2, H3 = "10.0.0.2", "10.0.0.3"
SRV, R2, R3 = "198.51.100.1", "198.51.100.2", "198.51.100.3"


def make_cfg(extra: str = "") -> Config:
    return loads(BASE + extra)


@pytest.fixture
def cfg_factory() -> Callable[[str], Config]:
    return make_cfg


@pytest.fixture
def eng() -> Engine:
    return Engine(make_cfg())


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x", ttl: int = 64) -> bytes:
    return raw(IP(src=src, dst=dst, ttl=ttl) / UDP(sport=sport, dport=dport) / payload)


def tcp(src: str, dst: str, sport: int, dport: int, flags: str = "A", payload: bytes = b"", ttl: int = 64,
        seq: int = 1000, ack: int = 0, options: list | None = None) -> bytes:
    return raw(IP(src=src, dst=dst, ttl=ttl) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack,
                                                    options=options or []) / payload)


def echo(src: str, dst: str, ident: int = 0x1234, seq: int = 1, reply: bool = False, ttl: int = 64) -> bytes:
    return raw(IP(src=src, dst=dst, ttl=ttl) / ICMP(type=0 if reply else 8, id=ident, seq=seq) / b"pingdata")


def one(out: list[tuple[str, bytes]], iface: str) -> IP:
    assert len(out) == 1, out
    assert out[0][0] == iface, out
    return IP(out[0][1])


def checksums_ok(pkt: bytes) -> bool:
    """scapy recomputes every checksum; True when the packet's own values agree."""
    p = IP(pkt)
    q = IP(pkt)
    del q.chksum
    layers = []
    for layer in (TCP, UDP, ICMP):
        if layer in q:
            del q[layer].chksum
            layers.append(layer)
    r = IP(raw(q))
    if p.chksum != r.chksum:
        return False
    for layer in layers:
        if layer is UDP and p[UDP].chksum == 0:
            continue
        if p[layer].chksum != r[layer].chksum:
            return False
    return True
