"""A VPN gateway on a private address (port forward UDP 500 + protocol forward 50) while
LAN IPsec clients use a remote gateway through the IPsec masquerade (issue 8, SPEC 3 and 5):
the case where one remote host is both a LAN client's gateway and a client of the
forwarded gateway."""

from __future__ import annotations

from scapy.all import ESP, IP, UDP, raw

from masqd.engine import Engine
from tests.engine.conftest import H2, H3, R2, WAN_IP, make_cfg, udp

FORWARD_IPSEC = """
[forwarding]
portfw = [{proto = "udp", port = 500, to = "10.0.0.2", to_port = 500}]
protofw = [{proto = 50, to = "10.0.0.2"}]
"""

ZERO = b"\0" * 8
A, B, C, D = b"\xaa" * 8, b"\xbb" * 8, b"\xcc" * 8, b"\xdd" * 8


def isakmp(icookie: bytes, rcookie: bytes) -> bytes:
    return icookie + rcookie + b"\x01\x10\x02\x00" + b"\0" * 4 + (28).to_bytes(4, "big")


def _dsts(out: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
    return [(iface, IP(p).dst) for iface, p in out]


def _lan_client_has_ipsec_with_r2(eng: Engine) -> None:
    """H3 (10.0.0.3) runs IKE (cookies A/B) and ESP with R2 through the IPsec masquerade."""
    assert _dsts(eng.process("lan", udp(H3, R2, 500, 500, isakmp(A, ZERO)), 0.0)) == [("wan", R2)]
    assert _dsts(eng.process("wan", udp(R2, WAN_IP, 500, 500, isakmp(A, B)), 0.1)) == [("lan", H3)]
    assert _dsts(eng.process("lan", raw(IP(src=H3, dst=R2) / ESP(spi=0xA100, seq=1) / b"x"), 0.2)) == [("wan", R2)]
    assert _dsts(eng.process("wan", raw(IP(src=R2, dst=WAN_IP) / ESP(spi=0xB100, seq=1) / b"x"), 0.3)) == [("lan", H3)]


def test_new_exchange_from_a_remote_goes_to_the_forwarded_gateway_not_the_lan_client() -> None:
    """R2 is H3's gateway and also calls the gateway forwarded on 10.0.0.2: its new exchange
    (responder cookie 0) reaches 10.0.0.2 by the UDP 500 forward instead of being guessed
    to H3 (before the fix every such exchange went to H3 and R2 never reached the server)."""
    eng = Engine(make_cfg(FORWARD_IPSEC))
    _lan_client_has_ipsec_with_r2(eng)
    out = eng.process("wan", udp(R2, WAN_IP, 500, 500, isakmp(C, ZERO)), 1.0)
    assert _dsts(out) == [("lan", H2)]
    assert eng.counters.get("isakmp_remote_initiated", 0) == 0
    assert eng.counters["portfw_connections"] == 1
    ans = eng.process("lan", udp(H2, R2, 500, 500, isakmp(C, D)), 1.1)
    assert [(i, IP(p).src, IP(p)[UDP].sport) for i, p in ans] == [("wan", WAN_IP, 500)]
    # the forwarded gateway's ESP leaves masqueraded by address
    esp = eng.process("lan", raw(IP(src=H2, dst=R2) / ESP(spi=0xD100, seq=1) / b"x"), 1.2)
    assert [(i, IP(p).src) for i, p in esp] == [("wan", WAN_IP)]


def test_without_a_forward_a_remote_started_exchange_still_goes_to_the_lan_client() -> None:
    """No UDP 500 forward: the HOWTO's guess (the LAN host that last talked ISAKMP with R2)."""
    eng = Engine(make_cfg(""))
    _lan_client_has_ipsec_with_r2(eng)
    assert _dsts(eng.process("wan", udp(R2, WAN_IP, 500, 500, isakmp(C, ZERO)), 1.0)) == [("lan", H3)]
    assert eng.counters["isakmp_remote_initiated"] == 1


def test_lan_clients_exchange_keeps_its_cookie_routing_after_the_remote_reached_the_server() -> None:
    """Once R2 also talks to the forwarded gateway, the portfw session (R2:500 <-> WAN:500)
    and H3's ISAKMP exchange share one address/port 4-tuple; only the cookies tell them
    apart. H3's exchange (cookies A/B, e.g. its DPD or a CREATE_CHILD_SA re-key) must still
    reach H3, and the server's (C/D) the server."""
    eng = Engine(make_cfg(FORWARD_IPSEC))
    _lan_client_has_ipsec_with_r2(eng)
    eng.process("wan", udp(R2, WAN_IP, 500, 500, isakmp(C, ZERO)), 1.0)
    eng.process("lan", udp(H2, R2, 500, 500, isakmp(C, D)), 1.1)
    for t in (1.2, 1.3, 1.4):  # the server's exchange goes on (full path, then the fast path)
        assert _dsts(eng.process("wan", udp(R2, WAN_IP, 500, 500, isakmp(C, D)), t)) == [("lan", H2)]
        eng.process("lan", udp(H2, R2, 500, 500, isakmp(C, D)), t + 0.01)
    assert _dsts(eng.process("wan", udp(R2, WAN_IP, 500, 500, isakmp(A, B)), 2.0)) == [("lan", H3)]
