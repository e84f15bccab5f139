"""Always defragment: reassembly before masquerading, bounded, with overlaps refused."""

from __future__ import annotations

import random

import pytest
from scapy.all import IP, UDP, fragment, raw

from masqd.engine import Engine
from tests.engine.conftest import H2, SRV, WAN_IP, checksums_ok, make_cfg, one


def _frags(payload: bytes, size: int = 200, ident: int = 7) -> list[bytes]:
    pkt = IP(src=H2, dst=SRV, id=ident) / UDP(sport=4000, dport=53) / payload
    return [raw(f) for f in fragment(pkt, fragsize=size)]


@pytest.mark.conformance("defragmentation")
def test_out_of_order_fragments_are_reassembled_then_masqueraded(eng: Engine) -> None:
    payload = bytes(random.Random(1).randrange(256) for _ in range(900))
    frags = _frags(payload)
    random.Random(2).shuffle(frags)
    outs = []
    for f in frags:
        outs += eng.process("lan", f, 0.0)
    assert len(outs) == 1
    p = IP(outs[0][1])
    assert p.src == WAN_IP and bytes(p[UDP].payload) == payload and checksums_ok(outs[0][1])
    assert eng.counters["frag_reassembled"] == 1


@pytest.mark.conformance("defragmentation")
def test_overlapping_fragments_drop_the_datagram(eng: Engine) -> None:
    frags = _frags(b"A" * 600)
    bad = IP(frags[1])
    bad.frag -= 1  # overlaps the first fragment by 8 bytes
    del bad.chksum
    outs = eng.process("lan", frags[0], 0.0) + eng.process("lan", raw(bad), 0.0)
    for f in frags[1:]:
        outs += eng.process("lan", f, 0.0)
    assert outs == [] or len(outs) <= 1
    assert eng.counters["drop_frag_overlap"] >= 1


@pytest.mark.conformance("defragmentation")
def test_incomplete_datagrams_time_out(eng: Engine) -> None:
    frags = _frags(b"B" * 600)
    eng.process("lan", frags[0], 0.0)
    assert eng.counters["frag_queue"] == 1
    eng.expire(31.0)
    assert eng.counters["frag_queue"] == 0
    assert eng.counters["drop_frag_timeout"] == 1


@pytest.mark.conformance("defragmentation")
def test_reassembly_memory_is_bounded() -> None:
    eng = Engine(make_cfg("[masquerade]\ndefrag_max_datagrams = 8\n"))
    for i in range(100):
        eng.process("lan", _frags(b"C" * 600, ident=i)[0], 0.0)
    assert eng.counters["frag_queue"] <= 8
    assert eng.counters["drop_frag_evicted"] >= 92


@pytest.mark.conformance("defragmentation")
def test_zero_length_fragment_is_refused(eng: Engine) -> None:
    p = IP(src=H2, dst=SRV, flags="MF", proto=17)
    assert eng.process("lan", raw(p), 0.0) == []
    assert eng.counters["drop_frag_empty"] == 1


@pytest.mark.conformance("defragmentation")
def test_fragment_that_would_exceed_64k_is_refused(eng: Engine) -> None:
    p = IP(src=H2, dst=SRV, frag=8190, proto=17) / (b"x" * 64)
    assert eng.process("lan", raw(p), 0.0) == []
    assert eng.counters["drop_frag_too_long"] == 1
    _ = one
