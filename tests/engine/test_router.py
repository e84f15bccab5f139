"""A router first: TTL, ICMP time exceeded, echo to masqd's own addresses, routing, DMZ."""

from __future__ import annotations

import pytest
from scapy.all import ICMP, IP, UDP

from masqd.engine import Engine
from tests.engine.conftest import H2, LAN_IP, SRV, WAN_IP, checksums_ok, echo, make_cfg, one, udp


def test_ttl_is_decremented_with_a_correct_header_checksum(eng: Engine) -> None:
    p = one(eng.process("lan", udp(H2, SRV, 4000, 53, ttl=10), 0.0), "wan")
    assert p.ttl == 9
    assert checksums_ok(bytes(p))


def _bad_checksum(p: bytes) -> bytes:
    q = bytearray(p)
    q[10] ^= 0x40
    return bytes(q)


@pytest.mark.conformance("RFC 1812 5.2.2")
def test_rfc1812_a_wrong_header_checksum_is_dropped_and_counted_on_both_sides(eng: Engine) -> None:
    """RFC 1812 5.2.2: new flows (full path) and established ones (fast path), both directions,
    with and without options: nothing is forwarded and nothing is created."""
    assert eng.process("lan", _bad_checksum(udp(H2, SRV, 4000, 53)), 0.0) == []
    assert eng.counters["sessions"] == 0
    p = one(eng.process("lan", udp(H2, SRV, 4000, 53), 0.0), "wan")
    one(eng.process("wan", udp(SRV, WAN_IP, 53, p[UDP].sport), 0.0), "lan")
    one(eng.process("lan", udp(H2, SRV, 4000, 53), 0.0), "wan")  # established: the fast path from now on
    reply = udp(SRV, WAN_IP, 53, p[UDP].sport)
    assert eng.process("lan", _bad_checksum(udp(H2, SRV, 4000, 53)), 0.1) == []
    assert eng.process("wan", _bad_checksum(reply), 0.1) == []
    opts = bytes(IP(src=SRV, dst=WAN_IP, options=[b"\x01\x01\x01\x00"]) / UDP(sport=53, dport=p[UDP].sport))
    assert eng.process("wan", _bad_checksum(opts), 0.1) == []
    assert eng.counters["drop_bad_ip_checksum"] == 4
    assert len(one_each := eng.process("wan", reply, 0.2)) == 1 and one_each[0][0] == "lan"
    assert eng.counters["sessions"] == 1


def test_ttl_running_out_gets_time_exceeded_from_the_lan_address(eng: Engine) -> None:
    p = one(eng.process("lan", udp(H2, SRV, 4000, 53, ttl=1), 0.0), "lan")
    assert p.src == LAN_IP and p.dst == H2
    assert p[ICMP].type == 11 and p[ICMP].code == 0
    assert eng.counters["ttl_exceeded"] == 1
    assert checksums_ok(bytes(p))


def test_masqd_answers_ping_on_its_lan_and_wan_addresses(eng: Engine) -> None:
    p = one(eng.process("lan", echo(H2, LAN_IP), 0.0), "lan")
    assert (p.src, p.dst, p[ICMP].type) == (LAN_IP, H2, 0)
    assert checksums_ok(bytes(p))
    p = one(eng.process("wan", echo(SRV, WAN_IP), 0.0), "wan")
    assert (p.src, p.dst, p[ICMP].type) == (WAN_IP, SRV, 0)
    assert p[ICMP].id == 0x1234 and bytes(p[ICMP].payload) == b"pingdata"


def test_lan_host_pings_wan_address_from_inside(eng: Engine) -> None:
    p = one(eng.process("lan", echo(H2, WAN_IP), 0.0), "lan")
    assert (p.src, p.dst) == (WAN_IP, H2)


def test_public_dmz_on_the_lan_side_is_routed_without_masquerade() -> None:
    eng = Engine(make_cfg('[firewall]\nforward_policy = "ACCEPT"\n'))
    p = one(eng.process("wan", udp(SRV, "198.18.0.2", 5000, 53), 0.0), "lan")
    assert p.src == SRV and p.dst == "198.18.0.2" and p.ttl == 63
    p = one(eng.process("lan", udp("198.18.0.2", SRV, 53, 5000), 0.0), "wan")
    assert p.src == "198.18.0.2"
    assert eng.counters["sessions"] == 0


def test_masq_policy_masquerades_lan_to_wan_but_only_routes_wan_to_dmz() -> None:
    eng = Engine(make_cfg())
    p = one(eng.process("wan", udp(SRV, "198.18.0.2", 5000, 53), 0.0), "lan")
    assert p.src == SRV


def test_packets_to_other_wan_addresses_are_not_routed_back_out(eng: Engine) -> None:
    assert eng.process("wan", udp(SRV, "198.51.100.9", 1, 2), 0.0) == []
    assert eng.counters["drop_no_route"] == 1


def test_martian_sources_are_dropped(eng: Engine) -> None:
    assert eng.process("wan", udp("10.0.0.9", WAN_IP, 1, 2), 0.0) == []
    assert eng.process("lan", udp("127.0.0.1", SRV, 1, 2), 0.0) == []
    assert eng.counters["drop_martian_source"] == 2


def test_next_hop(eng: Engine) -> None:
    from masqd.wire import ip_int

    assert eng.next_hop("wan", ip_int(SRV)) == ip_int("203.0.113.1")
    assert eng.next_hop("wan", ip_int("203.0.113.7")) == ip_int("203.0.113.7")
    assert eng.next_hop("lan", ip_int(H2)) == ip_int(H2)


def test_unsolicited_inbound_to_the_wan_address_is_dropped_and_counted(eng: Engine) -> None:
    assert eng.process("wan", udp(SRV, WAN_IP, 53, 4000), 0.0) == []
    assert eng.counters["drop_inbound_no_mapping"] == 1
    p = IP(udp(SRV, WAN_IP, 53, 4000))
    assert UDP in p
