"""The PCP / NAT-PMP server on masqd's LAN address (issue 22), driven through the engine with a
fake clock: a LAN host asks for its external address and for mappings, a remote host connects
through them; bad and hostile requests get the RFCs' answers and counters.

Requests are built by tests/engine/pcpclient.py (checked against Wireshark in
test_pcp_encoder.py), answers parsed by it.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from scapy.all import IP, TCP, UDP, raw

from masqd.config import loads
from masqd.engine import Engine
from masqd.engine.nat import Lease
from masqd.engine.table import Change
from tests.engine import pcpclient as pc
from tests.engine.conftest import BASE, H2, H3, LAN_IP, R2, R3, WAN_IP, checksums_ok, one, tcp, udp

NONCE = b"nonce-abcdef"
OTHER_NONCE = b"nonce-zzzzzz"

# RFC 6887 result codes, as the RFC numbers them (section 7.4)
SUCCESS, UNSUPP_VERSION, NOT_AUTHORIZED, MALFORMED_REQUEST, UNSUPP_OPCODE = 0, 1, 2, 3, 4
UNSUPP_OPTION, MALFORMED_OPTION, NO_RESOURCES, UNSUPP_PROTOCOL = 5, 6, 8, 9
USER_EX_QUOTA, CANNOT_PROVIDE_EXTERNAL, ADDRESS_MISMATCH, EXCESSIVE_REMOTE_PEERS = 10, 11, 12, 13


def engine(pcp: str = "", extra: str = "") -> Engine:
    return Engine(loads(BASE + "[pcp]\nenabled = true\n" + pcp + extra))


def ask(eng: Engine, payload: bytes, now: float, src: str = H2, sport: int = 40000) -> list[bytes]:
    """Send one request from ``src:sport`` to the LAN address, port 5351; the answers' payloads
    (each checked: from the LAN address port 5351, to the sender, right checksums)."""
    out = eng.process("lan", raw(IP(src=src, dst=LAN_IP) / UDP(sport=sport, dport=5351) / payload), now)
    answers = []
    for iface, p in out:
        ip = IP(p)
        assert iface == "lan" and ip.src == LAN_IP and ip.dst == src, ip.summary()
        assert ip[UDP].sport == 5351 and ip[UDP].dport == sport and checksums_ok(p)
        answers.append(bytes(ip[UDP].payload))
    return answers


def pcp1(eng: Engine, payload: bytes, now: float, src: str = H2) -> pc.PcpAnswer:
    got = ask(eng, payload, now, src)
    assert len(got) == 1, got
    a = pc.parse_pcp(got[0])
    assert a.response and a.version == 2
    return a


def nat1(eng: Engine, payload: bytes, now: float, src: str = H2) -> pc.NatPmpAnswer:
    got = ask(eng, payload, now, src)
    assert len(got) == 1, got
    return pc.parse_natpmp(got[0])


def inbound_syn(eng: Engine, port: int, now: float, src: str = R2, sport: int = 33000) -> list[tuple[str, bytes]]:
    return eng.process("wan", tcp(src, WAN_IP, sport, port, "S"), now)


# --------------------------------------------------------------------------- off by default


def test_off_by_default_requests_are_dropped_and_counted() -> None:
    eng = Engine(loads(BASE))
    assert ask(eng, pc.natpmp_address_request(), 1.0) == []
    assert ask(eng, pc.map_request(H2, NONCE, pc.TCP, 80), 1.0) == []
    assert eng.c["drop_pcp_disabled"] == 2
    assert eng.start(0.0) == [] and eng.next_tick is None  # no announcements either


def test_requests_from_the_wan_side_are_not_served() -> None:
    eng = engine()
    out = eng.process("wan", udp(R2, WAN_IP, 40000, 5351, pc.natpmp_address_request()), 1.0)
    assert out == []
    out = eng.process("wan", udp(R2, LAN_IP, 40000, 5351, pc.natpmp_address_request()), 1.0)
    assert out == [] and "pcp_requests_natpmp" not in eng.c


def test_a_request_with_a_bad_udp_checksum_is_dropped() -> None:
    eng = engine()
    p = bytearray(raw(IP(src=H2, dst=LAN_IP) / UDP(sport=40000, dport=5351) / pc.natpmp_address_request()))
    p[26] ^= 0xFF
    assert eng.process("lan", bytes(p), 1.0) == []
    assert eng.c["drop_pcp_bad_checksum"] == 1


# --------------------------------------------------------------------------- NAT-PMP


@pytest.mark.conformance("RFC 6886 NAT-PMP")
def test_natpmp_external_address_and_epoch() -> None:
    eng = engine()
    eng.start(100.0)
    a = nat1(eng, pc.natpmp_address_request(), 100.5)
    assert (a.version, a.opcode, a.result, a.address, a.epoch) == (0, 128, 0, WAN_IP, 0)
    assert nat1(eng, pc.natpmp_address_request(), 142.9).epoch == 42


@pytest.mark.conformance("RFC 6886 NAT-PMP")
def test_natpmp_tcp_mapping_reaches_the_lan_host_and_expires_with_its_lifetime() -> None:
    eng = engine()
    a = nat1(eng, pc.natpmp_map_request("tcp", 8080, 40000, 3600), 1.0)
    assert (a.opcode, a.result, a.internal, a.external, a.lifetime) == (130, 0, 8080, 40000, 3600)
    row = next(r for r in eng.table(2.0) if r["proto"] == "pcp")
    assert row["lan"] == f"{H2}:8080" and row["wan"] == f"{WAN_IP}:40000" and row["remote"] == "tcp"
    syn = one(inbound_syn(eng, 40000, 2.0), "lan")
    assert syn.dst == H2 and syn[TCP].dport == 8080 and checksums_ok(raw(syn))
    sa = one(eng.process("lan", tcp(H2, R2, 8080, 33000, "SA"), 2.1), "wan")
    assert sa.src == WAN_IP and sa[TCP].sport == 40000
    # a second remote host too (endpoint-independent: it is a forwarder)
    assert one(inbound_syn(eng, 40000, 2.2, src=R3), "lan").dst == H2
    assert eng.c["pcp_connections"] == 2
    assert next(r for r in eng.table(3.0) if r["proto"] == "pcp")["hits"] == 2
    eng.expire(3602.0)
    assert not [r for r in eng.table(3602.0) if r["proto"] == "pcp"]
    assert eng.c["pcp_mappings_expired"] == 1
    # a new remote host finds nothing; the connection already open goes on
    assert inbound_syn(eng, 40000, 3603.0, src="198.51.100.9") == []
    assert one(eng.process("wan", tcp(R2, WAN_IP, 33000, 40000, "A", b"more"), 3603.0), "lan").dst == H2


@pytest.mark.conformance("RFC 6886 NAT-PMP")
def test_natpmp_udp_mapping_renew_and_delete() -> None:
    eng = engine()
    a = nat1(eng, pc.natpmp_map_request("udp", 5000, 0, 7200), 1.0)
    port = a.external
    assert a.opcode == 129 and a.result == 0 and port == 5000  # port preserved when free
    pkt = one(eng.process("wan", udp(R2, WAN_IP, 7777, port, b"hello"), 2.0), "lan")
    assert pkt.dst == H2 and pkt[UDP].dport == 5000
    b = nat1(eng, pc.natpmp_map_request("udp", 5000, 0, 7200), 100.0)
    assert b.external == port and b.lifetime == 7200 and eng.c["pcp_mappings_renewed"] == 1
    d = nat1(eng, pc.natpmp_map_request("udp", 5000, 0, 0), 101.0)
    assert (d.result, d.internal, d.external, d.lifetime) == (0, 5000, 0, 0)
    assert not eng.nat.leases and eng.c["pcp_mappings_deleted"] == 1


def test_natpmp_delete_all_of_a_hosts_mappings() -> None:
    eng = engine()
    for p in (5000, 5001, 5002):
        nat1(eng, pc.natpmp_map_request("udp", p, p, 3600), 1.0)
    nat1(eng, pc.natpmp_map_request("udp", 6000, 6000, 3600), 1.0, src=H3)
    a = nat1(eng, pc.natpmp_map_request("udp", 0, 0, 0), 2.0)
    assert a.result == 0
    assert [ls.m.lan_ip for ls in eng.nat.leases.values()] == [int(ipaddress.IPv4Address(H3))]


def test_natpmp_unsupported_opcode_responses_and_truncated_requests() -> None:
    eng = engine()
    got = ask(eng, b"\x00\x05", 1.0)
    assert got == [struct.pack("!BBHI", 0, 133, 5, 0)]  # 8 octets: version, 128+op, result 5, epoch
    assert ask(eng, b"\x00\x81" + bytes(14), 1.0) == []  # a response (opcode >= 128): never answered
    assert ask(eng, b"\x00\x02\x00\x00\x1f", 1.0) == []  # a mapping request cut short: no code for it
    assert ask(eng, b"\x00", 1.0) == []
    assert eng.c["natpmp_refused_unsupp_opcode"] == 1
    assert eng.c["drop_pcp_not_a_request"] == 1 and eng.c["drop_pcp_natpmp_truncated"] == 1
    assert eng.c["drop_pcp_runt"] == 1


def test_natpmp_and_pcp_do_not_touch_each_others_mappings() -> None:
    eng = engine()
    assert nat1(eng, pc.natpmp_map_request("tcp", 8080, 40000, 3600), 1.0).result == 0
    a = pcp1(eng, pc.map_request(H2, NONCE, pc.TCP, 8080, 40000), 2.0)
    assert a.result == NOT_AUTHORIZED
    assert pcp1(eng, pc.map_request(H2, NONCE, pc.UDP, 9000), 2.0).result == SUCCESS
    assert nat1(eng, pc.natpmp_map_request("udp", 9000, 0, 0), 3.0).result == 2  # Not Authorized/Refused
    assert len(eng.nat.leases) == 2


# --------------------------------------------------------------------------- PCP versions, framing


@pytest.mark.conformance("RFC 6887 versions")
@pytest.mark.parametrize("version", [1, 3, 255])
def test_other_versions_get_unsupp_version_with_the_version_masqd_speaks(version: int) -> None:
    eng = engine()
    req = pc.map_request(H2, NONCE, pc.TCP, 80, version=version)
    a = pcp1(eng, req, 1.0)
    assert (a.version, a.opcode, a.result) == (2, 1, UNSUPP_VERSION)
    assert a.lifetime == 1800  # a long-lived error (RFC 6887 section 7.4)
    assert eng.c["pcp_refused_unsupp_version"] == 1 and not eng.nat.leases


@pytest.mark.conformance("RFC 6887 versions")
def test_short_long_and_odd_requests() -> None:
    eng = engine()
    assert ask(eng, b"\x02", 1.0) == []  # under 2 octets: silently dropped
    req = pc.map_request(H2, NONCE, pc.TCP, 80)
    resp = bytes(req[:1]) + bytes([req[1] | 0x80]) + req[2:]
    assert ask(eng, resp, 1.0) == []  # the R bit: a response, silently dropped
    short = pcp1(eng, req[:12], 1.0)
    assert short.result == MALFORMED_REQUEST and len(short.raw) == 24
    odd = pcp1(eng, req + b"\0\0", 1.0)
    assert odd.result == MALFORMED_REQUEST and len(odd.raw) % 4 == 0
    big = pcp1(eng, req + pc.option(200, bytes(1200)), 1.0)
    assert big.result == MALFORMED_REQUEST and len(big.raw) == 1100
    cut = pcp1(eng, req[:40], 1.0)  # a MAP without all of its opcode data
    assert cut.result == MALFORMED_REQUEST
    assert cut.raw[24:40] == req[24:40]  # the error response copies the request
    assert eng.c["pcp_refused_malformed_request"] == 4 and eng.c["drop_pcp_runt"] == 1
    assert not eng.nat.leases


def test_unsupported_opcodes() -> None:
    eng = engine()
    for op in (3, 50, 97, 127):
        a = pcp1(eng, pc.header(op, 0, H2), 1.0)
        assert (a.opcode, a.result) == (op, UNSUPP_OPCODE)
    # masqd's SPI_ANNOUNCE when SPI announcements are off is an unknown opcode too
    eng = engine("spi_announce = false\n")
    a = pcp1(eng, pc.spi_request(H2, NONCE, 0x1000, 0x2000, R2), 1.0)
    assert (a.opcode, a.result) == (96, UNSUPP_OPCODE)


@pytest.mark.conformance("RFC 6887 §18 security")
def test_client_address_must_be_the_source_address() -> None:
    eng = engine()
    a = pcp1(eng, pc.map_request(H3, NONCE, pc.TCP, 80), 1.0, src=H2)
    assert a.result == ADDRESS_MISMATCH and not eng.nat.leases
    assert eng.c["pcp_refused_address_mismatch"] == 1


# --------------------------------------------------------------------------- MAP


@pytest.mark.conformance("RFC 6887 MAP")
def test_map_with_suggested_port_nonce_renew_and_delete() -> None:
    eng = engine()
    a = pcp1(eng, pc.map_request(H2, NONCE, pc.TCP, 8080, 40000, lifetime=7200), 1.0)
    assert (a.opcode, a.result, a.lifetime) == (1, SUCCESS, 7200)
    assert (a.nonce, a.protocol, a.internal_port, a.external_port, a.external_address) == (
        NONCE, 6, 8080, 40000, WAN_IP)
    assert one(inbound_syn(eng, 40000, 2.0), "lan").dst == H2
    b = pcp1(eng, pc.map_request(H2, NONCE, pc.TCP, 8080, 0, lifetime=7200), 3000.0)
    assert b.result == SUCCESS and b.external_port == 40000
    eng.expire(7300.0)  # renewed at 3000: still there
    assert len(eng.nat.leases) == 1
    c = pcp1(eng, pc.map_request(H2, OTHER_NONCE, pc.TCP, 8080, 0, lifetime=0), 7301.0)
    assert c.result == NOT_AUTHORIZED and len(eng.nat.leases) == 1
    d = pcp1(eng, pc.map_request(H2, NONCE, pc.TCP, 8080, 0, lifetime=0), 7302.0)
    assert (d.result, d.lifetime, d.external_port) == (SUCCESS, 0, 40000)
    assert not eng.nat.leases
    assert inbound_syn(eng, 40000, 7303.0, sport=34000) == []


@pytest.mark.conformance("RFC 6887 MAP")
def test_lifetimes_are_bounded() -> None:
    eng = engine("min_lifetime = 300\nmax_lifetime = 3600\n")
    assert pcp1(eng, pc.map_request(H2, NONCE, pc.UDP, 5000, lifetime=10), 1.0).lifetime == 300
    assert pcp1(eng, pc.map_request(H2, NONCE, pc.UDP, 5001, lifetime=10 ** 6), 1.0).lifetime == 3600
    assert nat1(eng, pc.natpmp_map_request("udp", 5002, 0, 1), 1.0).lifetime == 300


@pytest.mark.conformance("RFC 6887 MAP")
def test_a_port_held_by_a_configured_forwarder_or_a_live_mapping_is_never_given() -> None:
    eng = engine(extra='[forwarding]\nportfw = [{proto = "tcp", port = 8000, to = "10.0.0.3", to_port = 80}]\n')
    a = pcp1(eng, pc.map_request(H2, NONCE, pc.TCP, 8000, 8000), 1.0)
    assert a.result == SUCCESS and a.external_port != 8000
    # another host's outbound UDP flow holds 5000 (port preserved)
    wan = one(eng.process("lan", udp(H3, R2, 5000, 53, b"q"), 1.0), "wan")
    assert wan[UDP].sport == 5000
    b = pcp1(eng, pc.map_request(H2, NONCE, pc.UDP, 6000, 5000), 1.0)
    assert b.result == SUCCESS and b.external_port not in (5000, 8000)
    # PREFER_FAILURE: the suggested port or nothing
    c = pcp1(eng, pc.map_request(H2, NONCE, pc.UDP, 6001, 5000, options=pc.prefer_failure()), 1.0)
    assert c.result == CANNOT_PROVIDE_EXTERNAL and c.lifetime == 30  # a short-lived error
    assert eng.c["pcp_refused_cannot_provide_external"] == 1
    # the configured forwarder still works
    assert one(inbound_syn(eng, 8000, 2.0), "lan").dst == H3


def test_map_of_an_endpoint_with_an_implicit_mapping_keeps_its_external_port() -> None:
    eng = engine("ports = [1024, 65535]\n", extra="[masquerade]\nport_preservation = false\n")
    wan = one(eng.process("lan", udp(H2, R2, 5000, 53, b"q"), 1.0), "wan")
    a = pcp1(eng, pc.map_request(H2, NONCE, pc.UDP, 5000, 6000), 1.0)
    assert a.result == SUCCESS and a.external_port == wan[UDP].sport
    # and now anyone may send to it (an explicit mapping is endpoint-independent)
    assert one(eng.process("wan", udp(R3, WAN_IP, 9, a.external_port, b"x"), 2.0), "lan").dst == H2


def test_the_port_range_bounds_suggestions() -> None:
    eng = engine("ports = [20000, 20010]\n")
    a = pcp1(eng, pc.map_request(H2, NONCE, pc.TCP, 22, 22), 1.0)
    assert a.result == SUCCESS and 20000 <= a.external_port <= 20010
    b = pcp1(eng, pc.map_request(H2, NONCE, pc.TCP, 23, 20005), 1.0)
    assert b.external_port == 20005
    c = pcp1(eng, pc.map_request(H2, NONCE, pc.TCP, 24, 22, options=pc.prefer_failure()), 1.0)
    assert c.result == CANNOT_PROVIDE_EXTERNAL
    for p in range(25, 34):  # the range holds 11 ports: 2 taken, 9 more, then none left
        assert pcp1(eng, pc.map_request(H2, NONCE, pc.TCP, p), 1.0).result == SUCCESS
    d = pcp1(eng, pc.map_request(H2, NONCE, pc.TCP, 34), 1.0)
    assert d.result == NO_RESOURCES and d.lifetime == 30


@pytest.mark.conformance("RFC 6887 MAP")
def test_unsupported_protocols_and_port_zero() -> None:
    eng = engine()
    assert pcp1(eng, pc.map_request(H2, NONCE, 1, 0), 1.0).result == UNSUPP_PROTOCOL
    assert pcp1(eng, pc.map_request(H2, NONCE, 0, 0), 1.0).result == UNSUPP_PROTOCOL  # "all" with a lifetime
    assert pcp1(eng, pc.map_request(H2, NONCE, 0, 80), 1.0).result == MALFORMED_REQUEST
    assert pcp1(eng, pc.map_request(H2, NONCE, pc.TCP, 0), 1.0).result == MALFORMED_REQUEST
    assert not eng.nat.leases


def test_options_mandatory_optional_and_malformed() -> None:
    eng = engine()
    base = pc.map_request(H2, NONCE, pc.TCP, 80)
    assert pcp1(eng, base + pc.option(99, b"abcd"), 1.0).result == UNSUPP_OPTION
    ok = pcp1(eng, base + pc.option(200, b"abcd"), 1.0)  # optional and unknown: ignored, not echoed
    assert ok.result == SUCCESS and len(ok.raw) == 60
    eng.nat.leases.clear()
    assert pcp1(eng, base + struct.pack("!BBH", 200, 0, 40), 1.0).result == MALFORMED_OPTION
    assert pcp1(eng, base + pc.option(1, bytes(4)), 1.0).result == MALFORMED_OPTION  # THIRD_PARTY length
    assert pcp1(eng, base + pc.prefer_failure() + pc.prefer_failure(), 1.0).result == MALFORMED_OPTION
    peer = pc.peer_request(H2, NONCE, pc.UDP, 5000, R2, 6000, options=pc.prefer_failure())
    assert pcp1(eng, peer, 1.0).result == MALFORMED_OPTION
    assert pcp1(eng, pc.announce_request(H2) + pc.third_party(H3), 1.0).result == MALFORMED_OPTION
    assert pcp1(eng, base + pc.prefer_failure(), 1.0).result == MALFORMED_OPTION  # nothing suggested


@pytest.mark.conformance("RFC 6887 §18 security")
def test_third_party_only_for_the_listed_hosts_and_lan_addresses() -> None:
    eng = engine(f'third_party = ["{H3}"]\n')
    opt = pc.third_party("10.0.0.9")
    a = pcp1(eng, pc.map_request(H2, NONCE, pc.TCP, 80, options=opt), 1.0)
    assert a.result == NOT_AUTHORIZED and not eng.nat.leases
    b = pcp1(eng, pc.map_request(H3, NONCE, pc.TCP, 80, 8081, options=opt), 1.0, src=H3)
    assert b.result == SUCCESS and b.raw[60:] == opt  # the processed option goes back
    assert eng.nat.leases[(6, int(ipaddress.IPv4Address("10.0.0.9")), 80)].client == int(
        ipaddress.IPv4Address(H3))
    assert one(inbound_syn(eng, 8081, 2.0), "lan").dst == "10.0.0.9"
    c = pcp1(eng, pc.map_request(H3, NONCE, pc.TCP, 81, options=pc.third_party(R2)), 1.0, src=H3)
    assert c.result == NOT_AUTHORIZED  # not a LAN address
    d = pcp1(eng, pc.map_request(H3, NONCE, pc.TCP, 82, options=pc.third_party(H3)), 1.0, src=H3)
    assert d.result == MALFORMED_REQUEST  # THIRD_PARTY naming the sender
    assert eng.c["pcp_refused_not_authorized"] == 2


def test_filter_option_limits_who_may_connect() -> None:
    eng = engine()
    a = pcp1(eng, pc.map_request(H2, NONCE, pc.TCP, 8080, 40000,
                                 options=pc.filter_option(128, 0, R2)), 1.0)
    assert a.result == SUCCESS
    assert one(inbound_syn(eng, 40000, 2.0), "lan").dst == H2
    assert inbound_syn(eng, 40000, 2.0, src=R3) == []
    assert eng.c["drop_pcp_filtered"] == 1
    many = b"".join(pc.filter_option(128, 0, f"198.51.100.{i}") for i in range(5))
    b = pcp1(eng, pc.map_request(H2, NONCE, pc.TCP, 8081, options=many), 1.0)
    assert b.result == EXCESSIVE_REMOTE_PEERS


@pytest.mark.conformance("RFC 6887 §18 security")
def test_per_host_mapping_limit() -> None:
    eng = engine("max_mappings_per_host = 3\n")
    for p in range(3):
        assert pcp1(eng, pc.map_request(H2, NONCE, pc.UDP, 5000 + p), 1.0).result == SUCCESS
    a = pcp1(eng, pc.map_request(H2, NONCE, pc.UDP, 5003), 1.0)
    assert a.result == USER_EX_QUOTA and a.lifetime == 30
    assert nat1(eng, pc.natpmp_map_request("udp", 5004, 0, 60), 1.0).result == 4  # Out of resources
    assert pcp1(eng, pc.map_request(H3, NONCE, pc.UDP, 5003), 1.0, src=H3).result == SUCCESS  # another host
    pcp1(eng, pc.map_request(H2, NONCE, pc.UDP, 5000, lifetime=0), 2.0)  # one deleted: room again
    assert pcp1(eng, pc.map_request(H2, NONCE, pc.UDP, 5003), 2.0).result == SUCCESS
    assert eng.c["pcp_refused_user_ex_quota"] == 1 and eng.c["natpmp_refused_no_resources"] == 1


@pytest.mark.conformance("RFC 6887 §18 security")
def test_per_host_request_rate() -> None:
    eng = engine("requests_per_second = 2\nrequest_burst = 5\n")
    results = [ask(eng, pc.announce_request(H2), 1.0) for _ in range(10)]
    answered = [pc.parse_pcp(r[0]).result for r in results if r]
    assert answered[:5] == [SUCCESS] * 5
    assert answered[5:] == [NO_RESOURCES]  # one refusal, then silence for a second
    assert eng.c["pcp_refused_no_resources"] == 1 and eng.c["drop_pcp_rate_limited"] == 4
    assert pcp1(eng, pc.announce_request(H3), 1.0, src=H3).result == SUCCESS  # other hosts unaffected
    assert pcp1(eng, pc.announce_request(H2), 1.6).result == SUCCESS  # 2 tokens a second come back


# --------------------------------------------------------------------------- PEER, ANNOUNCE


@pytest.mark.conformance("RFC 6887 PEER")
def test_peer_creates_the_outbound_mapping_and_keeps_it_for_its_lifetime() -> None:
    eng = engine()
    a = pcp1(eng, pc.peer_request(H2, NONCE, pc.UDP, 5000, R2, 6000, lifetime=1200), 1.0)
    assert (a.opcode, a.result, a.lifetime, a.internal_port) == (2, SUCCESS, 1200, 5000)
    port = a.external_port
    assert a.raw[60:62] == (6000).to_bytes(2, "big") and a.raw[64:80] == pc.addr16(R2)
    # the peer can reach the host before it sent anything (address-dependent filtering holds)
    assert one(eng.process("wan", udp(R2, WAN_IP, 6000, port, b"hi"), 2.0), "lan").dst == H2
    assert eng.process("wan", udp(R3, WAN_IP, 6000, port, b"hi"), 2.0) == []
    # the outbound flow uses the same external port
    assert one(eng.process("lan", udp(H2, R2, 5000, 6000, b"yo"), 3.0), "wan")[UDP].sport == port
    eng.expire(900.0)  # past the UDP timeout (300 s), within the PEER lifetime
    assert len(eng.nat.sessions()) == 1
    b = pcp1(eng, pc.peer_request(H2, NONCE, pc.UDP, 5000, R2, 6000, lifetime=1200), 1000.0)
    assert b.external_port == port and eng.c["pcp_peer_extended"] == 1
    eng.expire(2150.0)
    assert len(eng.nat.sessions()) == 1
    eng.expire(2202.0)
    assert eng.nat.sessions() == []


def test_peer_refusals() -> None:
    eng = engine()
    assert pcp1(eng, pc.peer_request(H2, NONCE, pc.UDP, 5000, H3, 6000), 1.0).result == NOT_AUTHORIZED
    assert pcp1(eng, pc.peer_request(H2, NONCE, pc.UDP, 5000, R2, 0), 1.0).result == MALFORMED_REQUEST
    assert pcp1(eng, pc.peer_request(H2, NONCE, 1, 5000, R2, 6000), 1.0).result == UNSUPP_PROTOCOL
    assert eng.nat.sessions() == []


@pytest.mark.conformance("RFC 6887 ANNOUNCE")
def test_announce_request() -> None:
    eng = engine()
    a = pcp1(eng, pc.announce_request(H2), 5.0)
    assert (a.opcode, a.result, a.lifetime, len(a.raw)) == (0, SUCCESS, 0, 24)


def _announcements(out: list[tuple[str, bytes]]) -> list[bytes]:
    got = []
    for iface, p in out:
        ip = IP(p)
        assert iface == "lan" and ip.src == LAN_IP and ip.dst == "224.0.0.1" and ip.ttl == 1
        assert ip[UDP].sport == 5351 and ip[UDP].dport == 5350 and checksums_ok(p)
        got.append(bytes(ip[UDP].payload))
    return got


@pytest.mark.conformance("RFC 6887 ANNOUNCE")
def test_unsolicited_announcements_after_start_and_after_a_wan_address_change() -> None:
    eng = engine()
    first = _announcements(eng.start(50.0))
    assert len(first) == 2
    nat, pcp = pc.parse_natpmp(first[0]), pc.parse_pcp(first[1])
    assert (nat.opcode, nat.result, nat.address, nat.epoch) == (128, 0, WAN_IP, 0)
    assert (pcp.opcode, pcp.result, pcp.lifetime, pcp.epoch) == (0, SUCCESS, 0, 0)
    sent = [50.0]
    now = 50.0
    while eng.next_tick is not None:  # ten in all, the interval from 250 ms doubling
        now = eng.next_tick
        assert len(_announcements(eng.tick(now))) == 2
        sent.append(now)
    assert len(sent) == 10
    gaps = [round(b - a, 3) for a, b in zip(sent, sent[1:], strict=False)]
    assert gaps == [0.25 * 2 ** i for i in range(9)]
    assert eng.tick(now + 100) == []
    out = eng.set_wan_address(ipaddress.IPv4Interface("203.0.113.77/24"), 500.0)
    nat = pc.parse_natpmp(_announcements(out)[0])
    assert nat.address == "203.0.113.77" and nat.epoch == 450  # rewrite-all keeps the state: same epoch
    assert eng.next_tick == 500.25
    assert eng.c["pcp_announcements_sent"] == 11


def test_leases_follow_the_wan_address_or_end_with_it_as_dynaddr_mode_says() -> None:
    eng = engine()
    eng.start(0.0)
    port = nat1(eng, pc.natpmp_map_request("tcp", 8080, 40000, 3600), 1.0).external
    eng.set_wan_address(ipaddress.IPv4Interface("203.0.113.77/24"), 10.0)
    syn = one(eng.process("wan", tcp(R2, "203.0.113.77", 33000, port, "S"), 11.0), "lan")
    assert syn.dst == H2
    assert next(r for r in eng.table(12.0) if r["proto"] == "pcp")["wan"] == f"203.0.113.77:{port}"
    eng = Engine(loads(BASE.replace('gateway = "203.0.113.1"', 'gateway = "203.0.113.1"\ndynaddr_mode = "flush"')
                       + "[pcp]\nenabled = true\n"))
    eng.start(0.0)
    nat1(eng, pc.natpmp_map_request("tcp", 8080, 40000, 3600), 1.0)
    out = eng.set_wan_address(ipaddress.IPv4Interface("203.0.113.77/24"), 100.0)
    assert not eng.nat.leases and eng.c["pcp_mappings_address_change"] == 1
    assert pc.parse_natpmp(_announcements(out)[0]).epoch == 0  # the state was lost: a new epoch


def test_the_epoch_goes_on_from_a_restored_value() -> None:
    eng = engine()
    eng.nat.restore_mapping_epoch(5000.0, 10.0)  # what a state file gives back
    eng.start(10.0)
    assert nat1(eng, pc.natpmp_address_request(), 12.0).epoch == 5002


# --------------------------------------------------------------------------- firewall, stream, reload


def test_the_chains_apply_input_to_requests_forward_to_inbound_connections() -> None:
    eng = engine(extra="[firewall]\nrules = \"\"\"\n"
                       "ipchains -A input -p udp -s 10.0.0.3 -d 0/0 5351 -j DENY\n"
                       "ipchains -A forward -p tcp -d 10.0.0.2 22 -j REJECT\n\"\"\"\n")
    assert ask(eng, pc.natpmp_address_request(), 1.0, src=H3) == []
    assert eng.c["drop_input_deny"] == 1
    nat1(eng, pc.natpmp_map_request("tcp", 22, 2222, 3600), 1.0)
    nat1(eng, pc.natpmp_map_request("tcp", 80, 8080, 3600), 1.0)
    rej = one(inbound_syn(eng, 2222, 2.0), "wan")  # REJECT answers the remote
    assert rej.dst == R2 and rej.proto == 1 and eng.c["drop_forward_reject"] == 1
    assert one(inbound_syn(eng, 8080, 2.0), "lan").dst == H2


def test_tcp_through_a_lease_must_start_with_a_syn() -> None:
    eng = engine()
    nat1(eng, pc.natpmp_map_request("tcp", 80, 8080, 3600), 1.0)
    assert eng.process("wan", tcp(R2, WAN_IP, 33000, 8080, "A"), 2.0) == []
    assert eng.c["drop_pcp_not_syn"] == 1


def test_leases_are_on_the_change_stream() -> None:
    eng = engine()
    seen: list[Change] = []
    eng.nat.subscribe(seen.append)
    pcp1(eng, pc.map_request(H2, NONCE, pc.UDP, 5000, lifetime=600), 1.0)
    pcp1(eng, pc.map_request(H2, NONCE, pc.UDP, 5000, lifetime=600), 2.0)
    pcp1(eng, pc.map_request(H2, NONCE, pc.UDP, 5000, lifetime=0), 3.0)
    nat1(eng, pc.natpmp_map_request("tcp", 80, 0, 120), 4.0)
    eng.expire(130.0)
    leases = [(c.kind, c.reason) for c in seen if isinstance(c.entry, Lease)]
    assert leases == [("new", ""), ("update", "renewed"), ("destroy", "deleted"), ("new", ""),
                      ("destroy", "timeout")]


def test_rules_rows_and_counters() -> None:
    eng = engine()
    nat1(eng, pc.natpmp_map_request("tcp", 80, 8080, 3600), 1.0)
    rows = eng.pcp.rule_rows(2.0)
    assert len(rows) == 1 and rows[0]["chain"] == "pcp"
    assert f"{WAN_IP}:8080 -> {H2}:80" in rows[0]["rule"] and "NAT-PMP" in rows[0]["rule"]
    assert eng.counters["pcp_mappings"] == 1
    assert eng.table_summary()[("pcp", "nat-pmp")] == 1


def test_a_reload_that_turns_pcp_off_ends_the_leases() -> None:
    eng = engine()
    nat1(eng, pc.natpmp_map_request("tcp", 80, 8080, 3600), 1.0)
    eng.reload(loads(BASE))
    assert not eng.nat.leases and eng.c["pcp_mappings_flushed"] == 1
    assert ask(eng, pc.natpmp_address_request(), 2.0) == []
    assert inbound_syn(eng, 8080, 2.0) == []


def test_flush_keeps_leases_like_configured_forwards() -> None:
    eng = engine()
    nat1(eng, pc.natpmp_map_request("tcp", 80, 8080, 3600), 1.0)
    one(inbound_syn(eng, 8080, 2.0), "lan")
    assert eng.flush() == 1  # the session
    assert len(eng.nat.leases) == 1
    assert one(inbound_syn(eng, 8080, 3.0, sport=34000), "lan").dst == H2
