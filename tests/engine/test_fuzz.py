"""Untrusted input: 100,000 random and mutated packets through process() raise nothing."""

from __future__ import annotations

import random

import pytest
from scapy.all import ICMP, IP, TCP, UDP, raw

from masqd.engine import Engine
from tests.engine.conftest import make_cfg

SEEDS = [
    raw(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=4000, dport=53) / b"hello"),
    raw(IP(src="10.0.0.2", dst="198.51.100.1") / TCP(sport=4000, dport=80, flags="S", options=[("MSS", 1460)])),
    raw(IP(src="10.0.0.2", dst="198.51.100.1") / ICMP(type=8) / b"ping"),
    raw(IP(src="198.51.100.1", dst="203.0.113.200") / ICMP(type=3, code=3) /
        raw(IP(src="203.0.113.200", dst="198.51.100.1") / UDP(sport=4000, dport=53))[:28]),
    raw(IP(src="10.0.0.2", dst="198.51.100.1", flags="MF", options=[b"\x94\x04\x00\x00"]) / UDP() / (b"z" * 64)),
    raw(IP(src="10.0.0.2", dst="198.51.100.1", proto=47) / b"\x30\x01\x88\x0b\x00\x04\x00\x05abcd"),
    raw(IP(src="198.51.100.1", dst="203.0.113.200", proto=50) / b"\x00\x00\x10\x00\x00\x00\x00\x01xxxxxxxx"),
    raw(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=500, dport=500) / (b"\x11" * 8 + b"\0" * 8 + b"\x01\x10\x02\0" + b"\0" * 8)),
    raw(IP(src="10.0.0.2", dst="198.51.100.1") / TCP(sport=4000, dport=1723, flags="PA") /
        (b"\x00\x9c\x00\x01\x1a\x2b\x3c\x4d\x00\x07\x00\x00" + b"\0" * 144)),
]


def _mutate(rng: random.Random, p: bytes) -> bytes:
    b = bytearray(p)
    op = rng.randrange(6)
    if op == 0 and b:
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 1:
        b = b[: rng.randrange(len(b) + 1)]
    elif op == 2:
        b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    elif op == 3 and len(b) > 4:
        b[2:4] = rng.randrange(65536).to_bytes(2, "big")
    elif op == 4:
        b[0] = 0x40 | rng.randrange(16)
    else:
        b = bytearray(rng.randbytes(rng.randrange(0, 80)))
    return bytes(b)


@pytest.mark.conformance("untrusted input")
def test_100k_random_and_mutated_packets_raise_nothing() -> None:
    rng = random.Random(20261127)
    eng = Engine(make_cfg('[masquerade]\ninbound_filtering = "endpoint-independent"\n'))
    now = 0.0
    for i in range(100_000):
        p = _mutate(rng, rng.choice(SEEDS))
        iface = "lan" if rng.random() < 0.5 else "wan"
        out = eng.process(iface, p, now)
        assert isinstance(out, list)
        if i % 1000 == 0:
            now += 7.0
            eng.expire(now)
    c = eng.counters
    assert c.get("drop_internal_error", 0) == 0, [e for e in eng.drain_events() if e[1] == "internal_error"][:3]
    assert sum(v for k, v in c.items() if k.startswith("drop_")) > 10_000
    eng.expire(now + 10**6)
    assert eng.counters["sessions"] == 0
    assert eng.counters["frag_queue"] == 0
