"""Inbound forwarders (a VPN server on a private address) and the dynamic WAN address."""

from __future__ import annotations

import ipaddress

from scapy.all import ESP, GRE, IP, TCP, UDP, raw

from masqd.engine import Engine
from tests.engine.conftest import H2, H3, R2, R3, SRV, WAN_IP, checksums_ok, make_cfg, one, tcp, udp

ISAKMP_INIT = b"\x11" * 8 + b"\0" * 8 + b"\x01\x10\x02\x00" + b"\0" * 4 + (28).to_bytes(4, "big")
ISAKMP_REPLY = b"\x11" * 8 + b"\x22" * 8 + b"\x01\x10\x02\x00" + b"\0" * 4 + (28).to_bytes(4, "big")

PORTFW = """
[forwarding]
portfw = [
  {proto = "tcp", port = 1723, to = "10.0.0.2", to_port = 1723},
  {proto = "udp", port = 500, to = "10.0.0.2", to_port = 500},
  {proto = "tcp", port = 8080, to = "10.0.0.3", to_port = 80},
]
protofw = [{proto = 47, to = "10.0.0.2"}, {proto = 50, to = "10.0.0.2"}]
"""


def test_portfw_tcp_to_a_private_server_and_replies_masqueraded() -> None:
    eng = Engine(make_cfg(PORTFW))
    syn = one(eng.process("wan", tcp(R2, WAN_IP, 33000, 8080, "S"), 0.0), "lan")
    assert syn.dst == H3 and syn[TCP].dport == 80 and checksums_ok(bytes(syn))
    sa = one(eng.process("lan", tcp(H3, R2, 80, 33000, "SA"), 0.1), "wan")
    assert sa.src == WAN_IP and sa[TCP].sport == 8080 and checksums_ok(bytes(sa))
    for _ in range(2):
        d = one(eng.process("wan", tcp(R2, WAN_IP, 33000, 8080, "A", b"data"), 0.2), "lan")
        assert d.dst == H3
    rows = [r for r in eng.table(0.3) if r["proto"] == "portfw" and r["lan"] == "10.0.0.3:80"]
    assert rows[0]["hits"] == 1


def test_portfw_udp_500_ipsec_server() -> None:
    eng = Engine(make_cfg(PORTFW))
    p = one(eng.process("wan", udp(R2, WAN_IP, 500, 500, ISAKMP_INIT), 0.0), "lan")
    assert p.dst == H2 and p[UDP].dport == 500
    r = one(eng.process("lan", udp(H2, R2, 500, 500, ISAKMP_REPLY), 0.1), "wan")
    assert r.src == WAN_IP and r[UDP].sport == 500


def test_protocol_forwarding_of_gre_and_esp_to_the_server() -> None:
    eng = Engine(make_cfg(PORTFW))
    g = one(eng.process("wan", raw(IP(src=R2, dst=WAN_IP) / GRE(proto=0x880B, version=1, key_present=1, key=0x00000005) / b"ppp"), 0.0), "lan")
    assert g.dst == H2 and checksums_ok(bytes(g))
    e = one(eng.process("wan", raw(IP(src=R3, dst=WAN_IP) / ESP(spi=0x1000, seq=1) / b"enc"), 0.0), "lan")
    assert e.dst == H2
    o = one(eng.process("lan", raw(IP(src=H2, dst=R2) / GRE(proto=0x880B, version=1, key_present=1, key=7) / b"x"), 0.1), "wan")
    assert o.src == WAN_IP and checksums_ok(bytes(o))


def test_unforwarded_port_is_still_dropped() -> None:
    eng = Engine(make_cfg(PORTFW))
    assert eng.process("wan", tcp(R2, WAN_IP, 33000, 22, "S"), 0.0) == []


def test_preference_weights_share_within_5_percent_over_10000_connections() -> None:
    eng = Engine(make_cfg("""
[forwarding]
portfw = [
  {proto = "tcp", port = 80, to = "10.0.0.2", to_port = 80, pref = 1},
  {proto = "tcp", port = 80, to = "10.0.0.3", to_port = 80, pref = 3},
]
"""))
    seen = {H2: 0, H3: 0}
    for i in range(10_000):
        src = f"198.51.{100 + i // 60000}.{1 + (i // 250) % 250}"
        p = one(eng.process("wan", tcp(src, WAN_IP, 1024 + i % 60000, 80, "S"), 0.0), "lan")
        seen[p.dst] += 1
        one(eng.process("lan", tcp(p.dst, src, 80, p[TCP].sport, "SA"), 0.0), "wan")  # the server answers
    assert abs(seen[H2] / 10_000 - 0.25) < 0.05 and abs(seen[H3] / 10_000 - 0.75) < 0.05


def test_forward_on_the_wan_symbol_follows_an_address_change() -> None:
    eng = Engine(make_cfg(PORTFW))
    eng.set_wan_address(ipaddress.IPv4Interface("203.0.113.77/24"), 0.0)
    p = one(eng.process("wan", tcp(R2, "203.0.113.77", 33000, 8080, "S"), 0.0), "lan")
    assert p.dst == H3
    sa = one(eng.process("lan", tcp(H3, R2, 80, 33000, "SA"), 0.1), "wan")
    assert sa.src == "203.0.113.77"
    assert eng.process("wan", tcp(R3, WAN_IP, 33000, 8080, "S"), 0.2) == []


def _established(eng: Engine, host: str, port: int) -> int:
    s = one(eng.process("lan", tcp(host, SRV, port, 80, "S"), 0.0), "wan")
    one(eng.process("wan", tcp(SRV, WAN_IP, 80, s[TCP].sport, "SA"), 0.0), "lan")
    return int(s[TCP].sport)


def test_dynaddr_rewrite_all_moves_every_entry() -> None:
    eng = Engine(make_cfg())
    assert eng.cfg.wan.dynaddr_mode == "rewrite-all"
    wport = _established(eng, H2, 40000)
    eng.set_wan_address(ipaddress.IPv4Interface("203.0.113.9/24"), 1.0)
    d = one(eng.process("lan", tcp(H2, SRV, 40000, 80, "A", b"x"), 1.1), "wan")
    assert d.src == "203.0.113.9" and checksums_ok(bytes(d))
    r = one(eng.process("wan", tcp(SRV, "203.0.113.9", 80, wport, "A", b"y"), 1.2), "lan")
    assert r.dst == H2
    assert eng.counters["wan_address_changes"] == 1
    assert any(e[1] == "wan_address_changed" for e in eng.drain_events())


def test_dynaddr_flush_resets_tcp_sessions_towards_the_lan() -> None:
    eng = Engine(make_cfg().model_validate({**make_cfg().model_dump(), "wan": {**make_cfg().wan.model_dump(), "dynaddr_mode": "flush"}}))
    _established(eng, H2, 40000)
    eng.set_wan_address(ipaddress.IPv4Interface("203.0.113.9/24"), 1.0)
    assert eng.counters["sessions"] == 0
    rst = one(eng.process("lan", tcp(H2, SRV, 40000, 80, "A", b"more", seq=500, ack=777), 1.1), "lan")
    assert rst.dst == H2 and rst.src == SRV and rst[TCP].flags.R and rst[TCP].seq == 777
    assert checksums_ok(bytes(rst))
    # a new connection uses the new address at once
    s = one(eng.process("lan", tcp(H2, SRV, 40001, 80, "S"), 1.2), "wan")
    assert s.src == "203.0.113.9"


def test_dynaddr_rewrite_moves_only_unreplied_entries() -> None:
    eng = Engine(make_cfg().model_validate({**make_cfg().model_dump(), "wan": {**make_cfg().wan.model_dump(), "dynaddr_mode": "rewrite"}}))
    _established(eng, H2, 40000)
    one(eng.process("lan", udp(H3, SRV, 5000, 53), 0.0), "wan")
    eng.set_wan_address(ipaddress.IPv4Interface("203.0.113.9/24"), 1.0)
    rows = eng.table(1.0)
    assert len(rows) == 1 and rows[0]["wan"].startswith("203.0.113.9:") and rows[0]["proto"] == "udp"
