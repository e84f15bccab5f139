"""Masquerade of TCP, UDP and ICMP echo: mappings, ports, timeouts, filtering, hairpinning.

Each test names the RFC 4787 / 5382 / 5508 / 7857 requirement it shows where there is one.
"""

from __future__ import annotations

import pytest
from scapy.all import ICMP, IP, TCP, UDP

from masqd.engine import Engine
from tests.engine.conftest import (
    H2,
    H3,
    R2,
    SRV,
    WAN_IP,
    checksums_ok,
    echo,
    make_cfg,
    one,
    tcp,
    udp,
)


def test_udp_out_and_reply_back(eng: Engine) -> None:
    p = one(eng.process("lan", udp(H2, SRV, 4000, 53, b"query"), 0.0), "wan")
    assert p.src == WAN_IP and p[UDP].dport == 53 and bytes(p[UDP].payload) == b"query"
    assert checksums_ok(bytes(p))
    r = one(eng.process("wan", udp(SRV, WAN_IP, 53, p[UDP].sport, b"answer"), 0.1), "lan")
    assert r.dst == H2 and r[UDP].dport == 4000 and bytes(r[UDP].payload) == b"answer"
    assert checksums_ok(bytes(r))


@pytest.mark.conformance("RFC 5382 REQ-5")
def test_tcp_handshake_data_and_close(eng: Engine) -> None:
    s = one(eng.process("lan", tcp(H2, SRV, 40000, 80, "S", seq=1), 0.0), "wan")
    port = s[TCP].sport
    assert checksums_ok(bytes(s))
    sa = one(eng.process("wan", tcp(SRV, WAN_IP, 80, port, "SA", seq=9, ack=2), 0.1), "lan")
    assert sa.dst == H2 and sa[TCP].dport == 40000 and checksums_ok(bytes(sa))
    for i in range(3):  # established: fast path both ways
        d = one(eng.process("lan", tcp(H2, SRV, 40000, 80, "PA", b"GET /", seq=2 + i), 0.2), "wan")
        assert checksums_ok(bytes(d)) and d[TCP].sport == port
        a = one(eng.process("wan", tcp(SRV, WAN_IP, 80, port, "A", b"data", ack=3 + i), 0.3), "lan")
        assert checksums_ok(bytes(a)) and a.dst == H2
    row = [r for r in eng.table(1.0) if r["proto"] == "tcp"][0]
    assert row["state"] == "ESTABLISHED"
    assert row["expires_in"] > 7400  # RFC 5382 REQ-5: established >= 2 h 4 min
    one(eng.process("lan", tcp(H2, SRV, 40000, 80, "FA", seq=10), 2.0), "wan")
    row = [r for r in eng.table(2.0) if r["proto"] == "tcp"][0]
    assert row["state"] == "FIN_WAIT" and row["expires_in"] <= 240


def test_icmp_echo_masquerade_rewrites_identifier_back(eng: Engine) -> None:
    p = one(eng.process("lan", echo(H2, SRV, ident=77), 0.0), "wan")
    assert p.src == WAN_IP and checksums_ok(bytes(p))
    r = one(eng.process("wan", echo(SRV, WAN_IP, ident=p[ICMP].id, reply=True), 0.1), "lan")
    assert r.dst == H2 and r[ICMP].id == 77 and checksums_ok(bytes(r))


def test_established_ping_takes_the_fast_path_and_writes_what_the_full_path_writes(eng: Engine) -> None:
    """The second echo of a session is rewritten by the fast path (``eng.fast`` takes it); the
    same request and reply give the same bytes either way, expiry refreshed."""
    req = bytes(IP(src=H2, dst=SRV) / ICMP(type=8, id=77, seq=5) / (b"p" * 56))  # ping's 84 bytes
    assert eng.fast.out(req, 0.0) is None  # a new session: the full path's
    full_out = eng.process("lan", req, 0.0)
    p = one(full_out, "wan")
    rep = bytes(IP(src=SRV, dst=WAN_IP) / ICMP(type=0, id=p[ICMP].id, seq=5) / (b"p" * 56))
    assert eng.fast.inb(rep, 0.1) is None  # the first reply: the full path's
    full_back = eng.process("wan", rep, 0.1)
    fast_out = eng.fast.out(req, 10.0)
    assert fast_out == full_out
    fast_back = eng.fast.inb(rep, 10.1)
    assert fast_back == full_back
    row = [r for r in eng.table(10.1) if r["proto"] == "icmp"][0]
    assert row["expires_in"] > 20  # refreshed at 10.1
    c = eng.counters
    assert (c["rx_lan_icmp_packets"], c["tx_wan_icmp_packets"], c["rx_wan_icmp_packets"], c["tx_lan_icmp_packets"]) \
        == (2, 2, 2, 2)
    # a reply for an identifier nobody uses, a request with TTL 1: not the fast path's business
    stray = echo(SRV, WAN_IP, ident=(p[ICMP].id + 1) & 0xFFFF, reply=True)
    last_hop = echo(H2, SRV, ident=77, ttl=1)
    assert eng.fast.inb(stray, 10.2) is None and eng.fast.out(last_hop, 10.3) is None
    assert eng.process("wan", stray, 10.2) == []
    assert one(eng.process("lan", last_hop, 10.3), "lan")[ICMP].type == 11


@pytest.mark.conformance("RFC 4787 REQ-1")
def test_rfc4787_req1_endpoint_independent_mapping(eng: Engine) -> None:
    a = one(eng.process("lan", udp(H2, SRV, 4000, 53), 0.0), "wan")
    b = one(eng.process("lan", udp(H2, R2, 4000, 9999), 0.0), "wan")
    assert a[UDP].sport == b[UDP].sport


@pytest.mark.conformance("RFC 4787 REQ-3")
def test_port_preservation_when_free_and_distinct_ports_on_conflict(eng: Engine) -> None:
    a = one(eng.process("lan", udp(H2, SRV, 5000, 53), 0.0), "wan")
    b = one(eng.process("lan", udp(H3, SRV, 5000, 53), 0.0), "wan")
    assert a[UDP].sport == 5000
    assert b[UDP].sport != 5000
    ra = one(eng.process("wan", udp(SRV, WAN_IP, 53, a[UDP].sport), 0.1), "lan")
    rb = one(eng.process("wan", udp(SRV, WAN_IP, 53, b[UDP].sport), 0.1), "lan")
    assert ra.dst == H2 and rb.dst == H3


@pytest.mark.conformance("Linux 2.2 profile")
def test_linux22_profile_uses_61000_65095_and_its_timeouts() -> None:
    eng = Engine(make_cfg('[masquerade]\nprofile = "linux-2.2"\nport_preservation = false\n'))
    p = one(eng.process("lan", udp(H2, SRV, 5000, 53), 0.0), "wan")
    assert 61000 <= p[UDP].sport <= 65095
    one(eng.process("lan", tcp(H2, SRV, 5000, 80, "S"), 0.0), "wan")
    q = one(eng.process("wan", tcp(SRV, WAN_IP, 80, eng.table(0)[0]["wan"] and
                                 [r for r in eng.table(0) if r["proto"] == "tcp"][0]["wan"].split(":")[1] and
                                 int([r for r in eng.table(0) if r["proto"] == "tcp"][0]["wan"].split(":")[1]),
                                 "SA"), 0.0), "lan")
    assert q.dst == H2
    row = [r for r in eng.table(0.0) if r["proto"] == "tcp"][0]
    assert row["expires_in"] == 900.0


@pytest.mark.conformance("port overloading")
def test_no_port_overloading_when_the_pool_is_exhausted() -> None:
    # four ports: each host may hold a quarter of the pool (the default per-host limit), one port
    eng = Engine(make_cfg("[masquerade]\nports = [20000, 20003]\nport_preservation = false\n"))
    hosts = ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]
    got = set()
    for h in hosts:
        p = one(eng.process("lan", udp(h, SRV, 6000, 53), 0.0), "wan")
        got.add(p[UDP].sport)
    assert got == {20000, 20001, 20002, 20003}
    assert eng.process("lan", udp("10.0.0.6", SRV, 7000, 53), 0.0) == []
    assert eng.counters["drop_pool_exhausted"] == 1
    # the live mappings still work
    for h in hosts:
        one(eng.process("lan", udp(h, SRV, 6000, 53), 1.0), "wan")
    eng.expire(400.0)
    # the released ports stay with their hosts for the quarantine (RFC 6888 REQ-8) ...
    assert eng.process("lan", udp("10.0.0.6", SRV, 7000, 53), 400.0) == []
    assert eng.counters["drop_pool_exhausted"] == 2
    p = one(eng.process("lan", udp(H2, SRV, 7000, 53), 400.0), "wan")  # (its own port back)
    assert p[UDP].sport in got
    # ... and are free for anyone after it
    eng.expire(521.0)
    one(eng.process("lan", udp("10.0.0.6", SRV, 7000, 53), 521.0), "wan")


@pytest.mark.conformance("RFC 4787 REQ-5")
def test_rfc4787_req5_udp_mapping_lives_five_minutes_and_is_refreshed_by_traffic(eng: Engine) -> None:
    one(eng.process("lan", udp(H2, SRV, 4000, 53), 0.0), "wan")
    eng.expire(299.0)
    assert eng.counters["sessions"] == 1
    one(eng.process("lan", udp(H2, SRV, 4000, 53), 299.0), "wan")
    eng.expire(500.0)
    assert eng.counters["sessions"] == 1
    eng.expire(600.0)
    assert eng.counters["sessions"] == 0 and eng.counters["mappings"] == 0
    assert eng.pool.use(17) == 1  # the port stays in quarantine for other hosts (RFC 6888 REQ-8) ...
    eng.expire(600.0 + 120.0)
    assert eng.pool.use(17) == 0  # ... for two minutes


@pytest.mark.conformance("RFC 5382 / 7857 transitory")
def test_rfc5382_transitory_tcp_times_out_after_4_minutes(eng: Engine) -> None:
    one(eng.process("lan", tcp(H2, SRV, 40000, 80, "S"), 0.0), "wan")
    eng.expire(239.0)
    assert eng.counters["sessions"] == 1
    eng.expire(241.5)
    assert eng.counters["sessions"] == 0


@pytest.mark.conformance("RFC 5382 / 7857 transitory")
def test_rfc7857_rst_keeps_state_4_minutes(eng: Engine) -> None:
    s = one(eng.process("lan", tcp(H2, SRV, 40000, 80, "S"), 0.0), "wan")
    one(eng.process("wan", tcp(SRV, WAN_IP, 80, s[TCP].sport, "SA"), 0.0), "lan")
    one(eng.process("lan", tcp(H2, SRV, 40000, 80, "R"), 1.0), "wan")
    eng.expire(200.0)
    assert eng.counters["sessions"] == 1
    eng.expire(242.0)
    assert eng.counters["sessions"] == 0


@pytest.mark.conformance("RFC 5508 query")
def test_icmp_query_mapping_lives_60_seconds(eng: Engine) -> None:
    one(eng.process("lan", echo(H2, SRV), 0.0), "wan")
    eng.expire(59.0)
    assert eng.counters["sessions"] == 1
    eng.expire(61.5)
    assert eng.counters["sessions"] == 0


def test_timeouts_are_configurable() -> None:
    eng = Engine(make_cfg("[masquerade.timeouts]\nudp = 30\n"))
    one(eng.process("lan", udp(H2, SRV, 4000, 53), 0.0), "wan")
    eng.expire(31.5)
    assert eng.counters["sessions"] == 0


def test_expiry_with_a_large_clock_jump(eng: Engine) -> None:
    for i in range(50):
        one(eng.process("lan", udp(H2, SRV, 4000 + i, 53), 1e9), "wan")
    eng.expire(1e9 + 10)
    assert eng.counters["sessions"] == 50
    eng.expire(1e9 + 86400 * 30)
    assert eng.counters["sessions"] == 0


def test_a_mass_expiry_goes_in_slices_and_a_session_refreshed_meanwhile_stays(eng: Engine) -> None:
    """With a budget, one call removes at most that many timed-out sessions and says more are
    left (the data plane calls again in its next loop iteration); a session that gets a packet
    before its turn comes is filed again, not removed."""
    for i in range(50):
        one(eng.process("lan", udp(H2, SRV, 4000 + i, 53), 0.0), "wan")
    late = 400.0  # past every one's timeout
    assert eng.expire(late, 20) is True
    assert eng.counters["sessions"] == 30 and eng.counters["expired"] == 20
    left = [int(r["lan"].rsplit(":", 1)[1]) for r in eng.table(late)]
    assert len(left) == 30
    one(eng.process("lan", udp(H2, SRV, left[0], 53), late), "wan")  # its turn has not come yet
    assert eng.expire(late + 1, 20) is True
    assert eng.expire(late + 1, 20) is False
    assert eng.counters["sessions"] == 1 and eng.counters["expired"] == 49
    assert [r["lan"] for r in eng.table(late + 1)] == [f"{H2}:{left[0]}"]
    assert eng.expire(late + 1000) is False  # no budget: everything due, at once
    assert eng.counters["sessions"] == 0


def _inbound_after_outbound(filtering: str, src: str, sport: int) -> list:
    eng = Engine(make_cfg(f'[masquerade]\ninbound_filtering = "{filtering}"\n'))
    p = one(eng.process("lan", udp(H2, SRV, 4000, 53), 0.0), "wan")
    return eng.process("wan", udp(src, WAN_IP, sport, p[UDP].sport), 0.1)


@pytest.mark.conformance("RFC 4787 REQ-8")
def test_rfc4787_req8_address_dependent_filtering_is_the_default() -> None:
    assert len(_inbound_after_outbound("address-dependent", SRV, 9999)) == 1
    assert _inbound_after_outbound("address-dependent", R2, 53) == []


@pytest.mark.conformance("RFC 4787 REQ-8")
def test_rfc4787_req8_endpoint_independent_filtering() -> None:
    assert len(_inbound_after_outbound("endpoint-independent", R2, 53)) == 1


@pytest.mark.conformance("RFC 4787 REQ-8")
def test_rfc4787_req8_address_and_port_dependent_filtering() -> None:
    assert _inbound_after_outbound("address-and-port-dependent", SRV, 9999) == []
    assert len(_inbound_after_outbound("address-and-port-dependent", SRV, 53)) == 1


@pytest.mark.conformance("RFC 4787 REQ-9")
def test_rfc4787_req9_hairpinning_with_external_source() -> None:
    eng = Engine(make_cfg('[masquerade]\ninbound_filtering = "endpoint-independent"\n'))
    a = one(eng.process("lan", udp(H2, SRV, 4000, 53), 0.0), "wan")
    h = one(eng.process("lan", udp(H3, WAN_IP, 5000, a[UDP].sport, b"hi"), 0.1), "lan")
    assert h.dst == H2 and h[UDP].dport == 4000
    assert h.src == WAN_IP  # external address of the sender, not its LAN address
    assert h[UDP].sport != 0 and checksums_ok(bytes(h))
    assert h.ttl == 63


def test_packets_in_the_table_show_lan_wan_and_remote(eng: Engine) -> None:
    one(eng.process("lan", udp(H2, SRV, 4000, 53), 0.0), "wan")
    (row,) = eng.table(0.0)
    assert row["lan"] == f"{H2}:4000" and row["wan"] == f"{WAN_IP}:4000" and row["remote"] == f"{SRV}:53"
    assert row["state"] == "UNREPLIED"


def test_tcp_mss_is_clamped_to_the_egress_mtu() -> None:
    eng = Engine(make_cfg("").__class__.model_validate(
        {**make_cfg().model_dump(), "wan": {**make_cfg().wan.model_dump(), "mtu": 1400}}))
    s = one(eng.process("lan", tcp(H2, SRV, 40000, 80, "S", options=[("MSS", 1460)]), 0.0), "wan")
    assert dict(s[TCP].options)["MSS"] == 1360
    assert checksums_ok(bytes(s))


def test_stray_rst_creates_no_entry(eng: Engine) -> None:
    assert eng.process("lan", tcp(H2, SRV, 40000, 80, "R"), 0.0) == []
    assert eng.counters["sessions"] == 0


def test_flush(eng: Engine) -> None:
    one(eng.process("lan", udp(H2, SRV, 4000, 53), 0.0), "wan")
    one(eng.process("lan", udp(H3, SRV, 4000, 53), 0.0), "wan")
    from masqd.wire import ip_int

    assert eng.flush(lan_ip=ip_int(H2)) == 1
    assert eng.flush() == 1
    assert eng.counters["sessions"] == 0 and eng.counters["mappings"] == 0


def test_reload_keeps_the_table(eng: Engine) -> None:
    p = one(eng.process("lan", udp(H2, SRV, 4000, 53), 0.0), "wan")
    eng.reload(make_cfg("[masquerade.timeouts]\nudp = 600\n"))
    r = one(eng.process("wan", udp(SRV, WAN_IP, 53, p[UDP].sport), 1.0), "lan")
    assert r.dst == H2
    assert isinstance(IP(bytes(r)), IP)


def test_a_reload_that_moves_the_port_range_keeps_the_pool_count_right() -> None:
    """Ports taken under one range and released under another (found by bench/fuzz.py): the count
    of ports in use inside the range, which refuses new mappings when it reaches the range's size,
    must neither creep up nor go below zero. (One flow per LAN host: with a 4-port pool the
    default per-host share is one port.)"""
    hosts = [f"10.0.0.{10 + i}" for i in range(10)]
    eng = Engine(make_cfg("[masquerade]\nports = [20000, 20003]\nport_preservation = false\n"))
    for h in hosts[:2]:
        one(eng.process("lan", udp(h, SRV, 6000, 53), 0.0), "wan")
    assert eng.counters["pool_used_udp"] == 2
    eng.reload(make_cfg("[masquerade]\nports = [30000, 30003]\nport_preservation = false\n"))
    assert eng.counters["pool_used_udp"] == 0  # the live mappings are outside the new range
    for h in hosts[2:6]:
        p = one(eng.process("lan", udp(h, SRV, 7000, 53), 1.0), "wan")
        assert 30000 <= p[UDP].sport <= 30003
    eng.expire(400.0)  # all of them end: the first two were taken under the old range
    assert eng.counters["sessions"] == 0
    assert eng.counters["pool_used_udp"] == 4  # the new range's ports, in quarantine (RFC 6888 REQ-8)
    eng.expire(400.0 + 121)  # the quarantine is over
    assert eng.counters["pool_used_udp"] == 0
    for h in hosts[6:10]:  # the whole new range is free again
        one(eng.process("lan", udp(h, SRV, 8000, 53), 521.0), "wan")
    assert "drop_pool_exhausted" not in eng.counters


def test_a_full_table_refuses_new_flows_without_keeping_their_mappings() -> None:
    """A new flow refused because the table is full must not keep the mapping (and WAN port)
    made for it (found by bench/fuzz.py): they were never freed, so after a burst against a full
    table the ports stayed taken for good, and the pool ran dry once the table had room again.
    (The table is full of answered flows, which early drop never evicts; one per LAN host, the
    default per-host share of a 16-entry table.)"""
    eng = Engine(make_cfg("[masquerade]\nmax_entries = 16\nports = [20000, 20099]\nport_preservation = false\n"))
    for i in range(16):
        p = one(eng.process("lan", udp(f"10.0.0.{10 + i}", SRV, 6000, 53), 0.0), "wan")
        one(eng.process("wan", udp(SRV, WAN_IP, 53, p[UDP].sport), 0.0), "lan")
    for i in range(200):  # more than the pool holds: each one refused
        assert eng.process("lan", udp(H3, SRV, 7000 + i, 53), 1.0) == []
        assert eng.process("lan", echo(H3, SRV, ident=i), 1.0) == []
    assert eng.counters["drop_table_full"] == 400
    assert eng.counters["mappings"] == 16 and eng.counters["pool_used_udp"] == 16
    assert eng.counters["pool_used_icmp"] == 0
    eng.expire(400.0)
    assert eng.counters["mappings"] == 0
    eng.expire(400.0 + 121)  # their ports leave their quarantine
    assert eng.counters["pool_used_udp"] == 0
    for i in range(16):  # the table and the pool have room again
        one(eng.process("lan", udp(f"10.0.0.{40 + i}", SRV, 7000, 53), 521.0), "wan")
