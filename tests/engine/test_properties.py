"""Property tests: for random valid packets, every checksum masqd writes is what scapy computes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import ICMP, IP, TCP, UDP, raw

from masqd.engine import Engine
from tests.engine.conftest import WAN_IP, checksums_ok, make_cfg

lan_hosts = st.integers(2, 0xFFFFFE).map(lambda i: f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
remotes = st.integers(1, 253).map(lambda i: f"198.51.100.{i}")
ports = st.integers(1, 65535)
payloads = st.binary(max_size=200)


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    src, dst = draw(lan_hosts), draw(remotes)
    kind = draw(st.sampled_from(["udp", "tcp", "icmp", "udp0"]))
    ip = IP(src=src, dst=dst, ttl=draw(st.integers(2, 255)), id=draw(st.integers(0, 65535)),
            tos=draw(st.integers(0, 255)))
    body = draw(payloads)
    if kind == "udp":
        p = ip / UDP(sport=draw(ports), dport=draw(ports)) / body
    elif kind == "udp0":
        p = IP(raw(ip / UDP(sport=draw(ports), dport=draw(ports), chksum=0) / body))
    elif kind == "tcp":
        p = ip / TCP(sport=draw(ports), dport=draw(ports), flags=draw(st.sampled_from(["S", "A", "PA", "FA", "SA"])),
                     seq=draw(st.integers(0, 2**32 - 1)), ack=draw(st.integers(0, 2**32 - 1))) / body
    else:
        p = ip / ICMP(type=8, id=draw(st.integers(0, 65535)), seq=draw(st.integers(0, 65535))) / body
    return raw(p)


@pytest.mark.conformance("checksums")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(packets(), min_size=1, max_size=4))
def test_masqueraded_packets_have_checksums_scapy_agrees_with(pkts: list[bytes]) -> None:
    eng = Engine(make_cfg('[masquerade]\ninbound_filtering = "endpoint-independent"\n'))
    for p in pkts:
        for _round in range(2):  # second round takes the fast path for established flows
            out = eng.process("lan", p, 1.0)
            assert len(out) == 1
            iface, q = out[0]
            assert iface == "wan"
            assert checksums_ok(q)
            qp = IP(q)
            assert qp.src == WAN_IP
            if UDP in IP(p) and IP(p)[UDP].chksum == 0:
                assert qp[UDP].chksum == 0
            # a reply comes back to the original sender with correct checksums
            if TCP in qp or UDP in qp:
                L = TCP if TCP in qp else UDP
                rep = IP(src=qp.dst, dst=WAN_IP) / L(sport=qp[L].dport, dport=qp[L].sport)
                if L is TCP:
                    rep[TCP].flags = "A"
                back = eng.process("wan", raw(rep / b"r"), 1.5)
                assert len(back) == 1 and checksums_ok(back[0][1])
                assert IP(back[0][1]).dst == IP(p).src
            elif ICMP in qp:
                rep = IP(src=qp.dst, dst=WAN_IP) / ICMP(type=0, id=qp[ICMP].id, seq=qp[ICMP].seq) / b"r"
                back = eng.process("wan", raw(rep), 1.5)
                assert len(back) == 1 and checksums_ok(back[0][1])
