"""ICMP error translation both ways (RFC 5508 REQ-3..6), traceroute, path-MTU discovery."""

from __future__ import annotations

import pytest
from scapy.all import ICMP, IP, TCP, UDP, IPerror, UDPerror, raw

from masqd.engine import Engine
from tests.engine.conftest import (
    H2,
    LAN_IP,
    SRV,
    WAN_IP,
    checksums_ok,
    echo,
    make_cfg,
    one,
    tcp,
    udp,
)


def _out_udp(eng: Engine) -> IP:
    return one(eng.process("lan", udp(H2, SRV, 4000, 33434, b"probe"), 0.0), "wan")


def _icmp_about(p: IP, src: str, typ: int, code: int, nexthop_mtu: int = 0) -> bytes:
    quoted = raw(p)[:28]
    icmp = ICMP(type=typ, code=code, nexthopmtu=nexthop_mtu) if typ == 3 and code == 4 else ICMP(type=typ, code=code)
    return raw(IP(src=src, dst=WAN_IP) / icmp / quoted)


@pytest.mark.conformance("RFC 5508 REQ-3..6")
def test_rfc5508_port_unreachable_is_translated_back_with_embedded_header(eng: Engine) -> None:
    p = _out_udp(eng)
    err = one(eng.process("wan", _icmp_about(p, SRV, 3, 3), 0.5), "lan")
    assert err.dst == H2 and err[ICMP].type == 3 and err[ICMP].code == 3
    inner = err[IPerror]
    assert inner.src == H2 and inner.dst == SRV
    assert err[UDPerror].sport == 4000 and err[UDPerror].dport == 33434
    assert checksums_ok(bytes(err))
    # the embedded IP header checksum is right too
    e = IP(raw(inner)[:20] + b"\0" * 8)
    q = e.copy()
    del q.chksum
    assert IP(raw(q)).chksum == e.chksum
    assert eng.counters["icmp_errors_translated"] == 1


@pytest.mark.conformance("traceroute, path MTU")
def test_time_exceeded_from_a_router_on_the_path_reaches_the_lan_host_traceroute(eng: Engine) -> None:
    p = _out_udp(eng)
    err = one(eng.process("wan", _icmp_about(p, "203.0.113.1", 11, 0), 0.5), "lan")
    assert err.src == "203.0.113.1" and err.dst == H2 and err[UDPerror].sport == 4000
    assert checksums_ok(bytes(err))


@pytest.mark.conformance("traceroute, path MTU")
def test_fragmentation_needed_carries_the_mtu_back(eng: Engine) -> None:
    s = one(eng.process("lan", tcp(H2, SRV, 40000, 80, "S"), 0.0), "wan")
    raw_err = raw(IP(src="203.0.113.1", dst=WAN_IP) / ICMP(type=3, code=4, nexthopmtu=1280) / raw(s)[:28])
    err = one(eng.process("wan", raw_err, 0.1), "lan")
    assert err[ICMP].nexthopmtu == 1280 and err.dst == H2
    assert checksums_ok(bytes(err))


@pytest.mark.conformance("errors never refresh")
def test_errors_never_refresh_a_mapping(eng: Engine) -> None:
    p = _out_udp(eng)
    before = eng.table(100.0)[0]["expires_in"]
    one(eng.process("wan", _icmp_about(p, SRV, 3, 3), 100.0), "lan")
    assert eng.table(100.0)[0]["expires_in"] == before


def test_error_for_an_unknown_mapping_is_dropped(eng: Engine) -> None:
    p = IP(udp(WAN_IP, SRV, 9999, 53))
    assert eng.process("wan", _icmp_about(p, SRV, 3, 3), 0.0) == []
    assert eng.counters["drop_icmp_error_no_entry"] == 1


def test_error_about_an_echo_request(eng: Engine) -> None:
    p = one(eng.process("lan", echo(H2, SRV, ident=55), 0.0), "wan")
    err = one(eng.process("wan", raw(IP(src="203.0.113.1", dst=WAN_IP) / ICMP(type=11) / raw(p)[:28]), 0.1), "lan")
    assert err.dst == H2 and err[IPerror].src == H2
    assert checksums_ok(bytes(err))


@pytest.mark.conformance("RFC 5508 REQ-3..6")
def test_outbound_error_from_a_lan_host_is_translated(eng: Engine) -> None:
    p = _out_udp(eng)
    r = one(eng.process("wan", udp(SRV, WAN_IP, 33434, p[UDP].sport, b"reply"), 0.1), "lan")
    # the LAN host answers the reply with port unreachable
    err_in = raw(IP(src=H2, dst=SRV) / ICMP(type=3, code=3) / raw(r)[:28])
    err = one(eng.process("lan", err_in, 0.2), "wan")
    assert err.src == WAN_IP and err[IPerror].dst == WAN_IP and err[UDPerror].dport == p[UDP].sport
    assert checksums_ok(bytes(err))


@pytest.mark.conformance("traceroute, path MTU")
def test_needfrag_sent_back_when_df_and_too_big() -> None:
    eng = Engine(make_cfg().model_validate({**make_cfg().model_dump(), "wan": {**make_cfg().wan.model_dump(), "mtu": 1280}}))
    big = raw(IP(src=H2, dst=SRV, flags="DF") / UDP(sport=1, dport=2) / (b"a" * 1400))
    err = one(eng.process("lan", big, 0.0), "lan")
    assert err.src == LAN_IP and err[ICMP].type == 3 and err[ICMP].code == 4 and err[ICMP].nexthopmtu == 1280
    assert checksums_ok(bytes(err))


@pytest.mark.conformance("fragmentation")
def test_too_big_without_df_is_fragmented_after_masquerade() -> None:
    eng = Engine(make_cfg().model_validate({**make_cfg().model_dump(), "wan": {**make_cfg().wan.model_dump(), "mtu": 600}}))
    payload = bytes(range(256)) * 6
    out = eng.process("lan", raw(IP(src=H2, dst=SRV) / UDP(sport=4000, dport=53) / payload), 0.0)
    assert len(out) == 3 and all(i == "wan" and len(p) <= 600 for i, p in out)
    frags = [IP(p) for _, p in out]
    assert all(f.src == WAN_IP for f in frags)
    # reassemble with scapy and check the masqueraded datagram
    from scapy.all import defragment

    whole = defragment(frags)[0]
    whole = IP(raw(whole))
    assert bytes(whole[UDP].payload) == payload
    assert checksums_ok(bytes(whole))


@pytest.mark.conformance("RFC 5508 REQ-3..6")
def test_tcp_error_checksum_embedded_long_quote(eng: Engine) -> None:
    s = one(eng.process("lan", tcp(H2, SRV, 40000, 80, "S"), 0.0), "wan")
    err = one(eng.process("wan", raw(IP(src=SRV, dst=WAN_IP) / ICMP(type=3, code=1) / raw(s)), 0.1), "lan")
    assert err[IPerror].src == H2
    assert checksums_ok(bytes(err))
    inner_tcp = IP(raw(err[IPerror]))
    assert inner_tcp[TCP].sport == 40000
    q = inner_tcp.copy()
    del q[TCP].chksum
    assert IP(raw(q))[TCP].chksum == inner_tcp[TCP].chksum
