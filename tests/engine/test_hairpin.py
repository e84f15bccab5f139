"""Hairpinning (RFC 4787 REQ-9, RFC 5382 REQ-8) under every inbound filtering mode.

The RFC's test: a LAN host reaches another LAN host (or itself, from another port, as
an RFC 5780 client does) at its external address and port. The packet must arrive
with the sender's external address and port as its source (REQ-9a) and pass the
target mapping's filter as the traffic of a host behind the same NAT: the filter
guards against the outside, so ``inbound_filtering`` does not stop it. ICMP errors
about hairpinned packets go back to the sender the same way.
"""

from __future__ import annotations

import pytest
from scapy.all import ICMP, IP, TCP, UDP, UDPerror, raw

from masqd.engine import Engine
from tests.engine.conftest import H2, H3, SRV, WAN_IP, checksums_ok, make_cfg, one, tcp, udp

MODES = ["address-dependent", "endpoint-independent", "address-and-port-dependent"]


def engine(mode: str) -> Engine:
    if mode == "address-dependent":  # the default: the configuration does not name it
        return Engine(make_cfg())
    return Engine(make_cfg(f'[masquerade]\ninbound_filtering = "{mode}"\n'))


@pytest.mark.conformance("RFC 4787 REQ-9")
@pytest.mark.parametrize("mode", MODES)
def test_udp_hairpin_with_the_external_source_in_every_filtering_mode(mode: str) -> None:
    eng = engine(mode)
    a = one(eng.process("lan", udp(H2, SRV, 4000, 3478), 0.0), "wan")[UDP].sport  # H2's mapping
    b = one(eng.process("lan", udp(H3, SRV, 5000, 3478), 0.0), "wan")[UDP].sport  # H3's (EIM: the same after)
    h = one(eng.process("lan", udp(H3, WAN_IP, 5000, a, b"hello"), 0.1), "lan")
    assert (h.src, h[UDP].sport, h.dst, h[UDP].dport) == (WAN_IP, b, H2, 4000)
    assert bytes(h[UDP].payload) == b"hello" and h.ttl == 63 and checksums_ok(bytes(h))
    r = one(eng.process("lan", udp(H2, WAN_IP, 4000, b, b"back"), 0.2), "lan")
    assert (r.src, r[UDP].sport, r.dst, r[UDP].dport) == (WAN_IP, a, H3, 5000) and checksums_ok(bytes(r))
    # both hairpin sessions saw traffic both ways
    states = {(row["lan"], row["remote"]): row["state"] for row in eng.table(0.3)}
    assert states[(f"{H2}:4000", f"{WAN_IP}:{b}")] == "REPLIED"
    assert states[(f"{H3}:5000", f"{WAN_IP}:{a}")] == "REPLIED"
    assert "drop_hairpin_no_mapping" not in eng.counters


@pytest.mark.conformance("RFC 4787 REQ-9")
@pytest.mark.parametrize("mode", MODES)
def test_rfc5780_hairpin_test_a_host_reaches_its_own_mapping_from_another_port(mode: str) -> None:
    eng = engine(mode)
    a = one(eng.process("lan", udp(H2, SRV, 4000, 3478), 0.0), "wan")[UDP].sport
    h = one(eng.process("lan", udp(H2, WAN_IP, 4001, a, b"binding request"), 0.1), "lan")
    assert h.dst == H2 and h[UDP].dport == 4000 and h.src == WAN_IP and h[UDP].sport != 0


@pytest.mark.conformance("RFC 5382 REQ-8")
@pytest.mark.parametrize("mode", MODES)
def test_tcp_hairpin_handshake_and_data_in_every_filtering_mode(mode: str) -> None:
    eng = engine(mode)
    a = one(eng.process("lan", tcp(H2, SRV, 4000, 80, "S"), 0.0), "wan")[TCP].sport  # H2's TCP mapping
    syn = one(eng.process("lan", tcp(H3, WAN_IP, 5000, a, "S", seq=100), 0.1), "lan")
    assert syn.dst == H2 and syn[TCP].dport == 4000 and syn.src == WAN_IP and checksums_ok(bytes(syn))
    b = syn[TCP].sport
    sa = one(eng.process("lan", tcp(H2, WAN_IP, 4000, b, "SA", seq=900, ack=101), 0.1), "lan")
    assert (sa.src, sa[TCP].sport, sa.dst, sa[TCP].dport) == (WAN_IP, a, H3, 5000) and checksums_ok(bytes(sa))
    one(eng.process("lan", tcp(H3, WAN_IP, 5000, a, "A", seq=101, ack=901), 0.2), "lan")
    d = one(eng.process("lan", tcp(H3, WAN_IP, 5000, a, "PA", b"data", seq=101, ack=901), 0.2), "lan")
    assert bytes(d[TCP].payload) == b"data" and checksums_ok(bytes(d))
    states = {(row["lan"], row["remote"]): (row["state"], row["expires_in"]) for row in eng.table(0.3)}
    # both sides of the hairpinned connection are tracked as established (long timeout)
    assert states[(f"{H2}:4000", f"{WAN_IP}:{b}")][0] == "ESTABLISHED"
    assert states[(f"{H3}:5000", f"{WAN_IP}:{a}")][0] == "ESTABLISHED"
    assert min(t for _, t in states.values() if _ == "ESTABLISHED") > 7000


@pytest.mark.parametrize("mode", MODES)
def test_icmp_error_about_a_hairpinned_packet_goes_back_to_its_sender(mode: str) -> None:
    eng = engine(mode)
    a = one(eng.process("lan", udp(H2, SRV, 4000, 3478), 0.0), "wan")[UDP].sport
    h = one(eng.process("lan", udp(H3, WAN_IP, 5000, a, b"hello"), 0.1), "lan")
    # H2 has closed its socket: port unreachable about the packet as it received it
    err = raw(IP(src=H2, dst=WAN_IP) / ICMP(type=3, code=3) / raw(h)[:28])
    e = one(eng.process("lan", err, 0.2), "lan")
    assert e.dst == H3 and e.src == WAN_IP and e[ICMP].type == 3 and e.ttl == 63
    inner = e[ICMP].payload
    assert inner.src == H3 and inner.dst == WAN_IP and inner[UDPerror].sport == 5000
    assert inner[UDPerror].dport == a
    assert checksums_ok(bytes(e))


def test_hairpin_to_a_port_forward_reaches_the_server_with_the_external_source() -> None:
    eng = Engine(make_cfg('[forwarding]\nportfw = [{proto = "tcp", port = 8080, to = "10.0.0.2", to_port = 80}]\n'))
    syn = one(eng.process("lan", tcp(H3, WAN_IP, 5000, 8080, "S"), 0.0), "lan")
    assert syn.dst == H2 and syn[TCP].dport == 80 and syn.src == WAN_IP
    sa = one(eng.process("lan", tcp(H2, WAN_IP, 80, syn[TCP].sport, "SA"), 0.0), "lan")
    assert (sa.src, sa[TCP].sport, sa.dst, sa[TCP].dport) == (WAN_IP, 8080, H3, 5000)


def test_hairpin_to_a_port_nobody_holds_is_dropped_and_counted(eng: Engine) -> None:
    assert eng.process("lan", udp(H3, WAN_IP, 5000, 40000), 0.0) == []
    assert eng.counters["drop_hairpin_no_mapping"] == 1


def test_hairpinning_off_keeps_lan_packets_for_the_wan_address_local() -> None:
    eng = Engine(make_cfg("[masquerade]\nhairpinning = false\n"))
    a = one(eng.process("lan", udp(H2, SRV, 4000, 3478), 0.0), "wan")[UDP].sport
    assert eng.process("lan", udp(H3, WAN_IP, 5000, a), 0.1) == []
    assert "hairpinned" not in eng.counters
