"""The NAT table's change stream: what ``masqd events``, the state file and HA sync read.

Each scenario records every change as it happens (the entry rendered as a
table row at that moment, the way a subscriber must snapshot it) and checks
the kinds, reasons and rows: a TCP connection's life ending in a RST, UDP
replies and expiry, a flush, a WAN address change, and the helpers' own
entries (ESP SPI pairs, ISAKMP SAs, PPTP calls).
"""

from __future__ import annotations

from typing import Any

from scapy.all import IP, TCP, UDP, raw
from scapy.layers.ipsec import ESP
from scapy.layers.isakmp import ISAKMP

from masqd.engine import Engine
from masqd.engine.helpers.pptp import Conn
from masqd.engine.table import Change
from tests.engine.conftest import H2, SRV, WAN_IP, make_cfg, tcp, udp
from tests.engine.test_pptp import Ctl, ccrq, cdn, field, gre, ocrp, ocrq

SHORT = ("[masquerade.timeouts]\ntcp_established = 7440\ntcp_transitory = 240\ntcp_fin = 60\n"
         "tcp_rst = 10\nudp = 30\nicmp = 30\nother = 300\n")


class Recorder:
    """Subscribes to the engine's table and keeps (kind, reason, row at that moment)."""

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.now = 0.0
        self.seen: list[tuple[str, str, dict[str, Any]]] = []
        eng.nat.subscribe(self.on_change)

    def on_change(self, ch: Change) -> None:
        row = self.eng.entry_row(ch.entry, self.now)
        if isinstance(ch.entry, Conn):  # a PPTP control connection's parse position (for the state
            assert row is None  # file and sync): its TCP session is the table's entry, no row of its own
            return
        assert row is not None, ch
        self.seen.append((ch.kind, ch.reason, row))

    def take(self) -> list[tuple[str, str, str, str]]:
        """(kind, reason, proto, state) of what was seen since the last call."""
        out = [(k, r, row["proto"], row["state"]) for k, r, row in self.seen]
        self.seen = []
        return out

    def at(self, now: float) -> Recorder:
        self.now = now
        return self


def test_a_tcp_connection_new_established_reset_is_destroyed_with_reason_reset() -> None:
    eng = Engine(make_cfg(SHORT))
    rec = Recorder(eng)
    o = eng.process("lan", tcp(H2, SRV, 40000, 80, "S"), rec.at(1.0).now)
    wport = IP(o[0][1])[TCP].sport
    assert rec.seen[0][2]["lan"] == f"{H2}:40000" and rec.seen[0][2]["remote"] == f"{SRV}:80"
    assert rec.seen[0][2]["wan"] == f"{WAN_IP}:{wport}"
    assert rec.take() == [("new", "", "tcp", "SYN_SENT")]
    eng.process("wan", tcp(SRV, WAN_IP, 80, wport, "SA"), rec.at(1.1).now)
    assert rec.take() == [("update", "state", "tcp", "ESTABLISHED")]
    for t in (2.0, 3.0):  # nothing changes: no events
        eng.process("lan", tcp(H2, SRV, 40000, 80, "A"), t)
        eng.process("wan", tcp(SRV, WAN_IP, 80, wport, "A"), t)
    assert rec.take() == []
    eng.process("wan", tcp(SRV, WAN_IP, 80, wport, "R"), rec.at(4.0).now)
    assert rec.take() == [("update", "state", "tcp", "RST")]
    # gone tcp_rst (10 s) after the RST, not at the established deadline, and it says why
    eng.expire(rec.at(13.0).now)
    assert rec.take() == []
    eng.expire(rec.at(15.0).now)
    assert rec.take() == [("destroy", "reset", "tcp", "RST")]
    assert eng.table(15.0) == []


def test_a_fin_shortens_the_deadline_too_and_ends_in_timeout() -> None:
    eng = Engine(make_cfg(SHORT))
    rec = Recorder(eng)
    o = eng.process("lan", tcp(H2, SRV, 40001, 80, "S"), 1.0)
    wport = IP(o[0][1])[TCP].sport
    eng.process("wan", tcp(SRV, WAN_IP, 80, wport, "SA"), 1.0)
    eng.process("lan", tcp(H2, SRV, 40001, 80, "FA"), 2.0)
    rec.take()
    eng.expire(61.0)
    assert rec.take() == []
    eng.expire(63.0)
    assert rec.take() == [("destroy", "timeout", "tcp", "FIN_WAIT")]


def test_udp_reply_updates_and_expiry_destroys_with_timeout() -> None:
    eng = Engine(make_cfg(SHORT))
    rec = Recorder(eng)
    o = eng.process("lan", udp(H2, SRV, 5000, 53), 1.0)
    wport = IP(o[0][1])[UDP].sport
    eng.process("wan", udp(SRV, WAN_IP, 53, wport), 1.5)
    eng.process("wan", udp(SRV, WAN_IP, 53, wport), 2.0)
    assert rec.take() == [("new", "", "udp", "UNREPLIED"), ("update", "state", "udp", "REPLIED")]
    eng.expire(40.0)
    assert rec.take() == [("destroy", "timeout", "udp", "REPLIED")]


def test_flush_and_wan_address_change_say_why() -> None:
    import ipaddress

    eng = Engine(make_cfg().model_copy(update={"wan": make_cfg().wan.model_copy(
        update={"dynaddr_mode": "rewrite"})}))
    rec = Recorder(eng)
    eng.process("lan", udp(H2, SRV, 5000, 53), 1.0)  # never replied: moved by "rewrite"
    o = eng.process("lan", tcp(H2, SRV, 40000, 80, "S"), 1.0)
    wport = IP(o[0][1])[TCP].sport
    eng.process("wan", tcp(SRV, WAN_IP, 80, wport, "SA"), 1.0)  # replied: closed by "rewrite"
    rec.take()
    eng.set_wan_address(ipaddress.IPv4Interface("203.0.113.201/24"), 2.0)
    got = rec.take()
    assert ("destroy", "address-change", "tcp", "ESTABLISHED") in got
    assert ("update", "address-change", "udp", "UNREPLIED") in got and len(got) == 2
    assert rec.seen == []
    eng.process("lan", udp(H2, SRV, 5001, 53), 3.0)
    rec.take()
    assert eng.flush() == 2
    assert sorted(rec.take()) == [("destroy", "flush", "udp", "UNREPLIED")] * 2


def test_nobody_subscribed_nothing_is_built() -> None:
    """Without subscribers the table does not even make the Change record."""
    eng = Engine(make_cfg())
    made: list[Any] = []
    import masqd.engine.table as table_mod

    real = table_mod.Change

    class Spy(real):  # type: ignore[misc, valid-type]
        def __new__(cls, *a: Any) -> Any:
            made.append(a)
            return real.__new__(cls, *a)

    table_mod.Change = Spy  # type: ignore[misc]
    try:
        eng.process("lan", udp(H2, SRV, 5000, 53), 1.0)
        eng.flush()
        assert made == []
        rec = Recorder(eng)
        eng.process("lan", udp(H2, SRV, 5000, 53), 1.0)
        assert len(made) == 1 and rec.take() == [("new", "", "udp", "UNREPLIED")]
    finally:
        table_mod.Change = real  # type: ignore[misc]


# ------------------------------------------------------------------ helpers' entries
def test_esp_pending_paired_replaced_and_expired() -> None:
    eng = Engine(make_cfg())
    rec = Recorder(eng)
    esp = lambda s, d, spi: raw(IP(src=s, dst=d) / ESP(spi=spi, seq=1, data=b"\xa5" * 48))  # noqa: E731
    eng.process("lan", esp(H2, SRV, 0x1001), rec.at(10.0).now)
    (k, r, row), = rec.seen
    assert (k, r, row["proto"], row["state"], row["spi_out"]) == ("new", "", "esp", "PENDING", "0x00001001")
    rec.take()
    eng.process("wan", esp(SRV, WAN_IP, 0x2001), 11.0)
    (k, r, row), = rec.seen
    assert (k, r, row["state"], row["spi_in"]) == ("update", "paired", "ESTABLISHED", "0x00002001")
    rec.take()
    # a re-key: the new pair replaces the old one
    eng.process("lan", esp(H2, SRV, 0x1002), 20.0)
    eng.process("wan", esp(SRV, WAN_IP, 0x2002), 21.0)
    assert rec.take() == [("new", "", "esp", "PENDING"), ("update", "paired", "esp", "ESTABLISHED"),
                          ("update", "state", "esp", "REPLACED")]
    eng.expire(500.0)  # the replaced pair lives pending_lifetime (120 s) past its last packet
    assert rec.take() == [("destroy", "timeout", "esp", "REPLACED")]
    eng.flush()
    assert rec.take() == [("destroy", "flush", "esp", "ESTABLISHED")]


def test_isakmp_sa_new_replied_and_expired() -> None:
    eng = Engine(make_cfg())
    rec = Recorder(eng)
    ic, rc = b"I" * 8, b"R" * 8

    def ike(s: str, d: str, r: bytes) -> bytes:
        return raw(IP(src=s, dst=d) / UDP(sport=500, dport=500)
                   / ISAKMP(init_cookie=ic, resp_cookie=r, exch_type=2, next_payload=0))

    eng.process("lan", ike(H2, SRV, b"\0" * 8), 1.0)
    eng.process("wan", ike(SRV, WAN_IP, rc), 2.0)
    eng.process("lan", ike(H2, SRV, rc), 3.0)
    assert rec.take() == [("new", "", "isakmp", "INIT"), ("update", "state", "isakmp", "ESTABLISHED")]
    eng.expire(3.0 + 1800 + 1)
    assert rec.take() == [("destroy", "timeout", "isakmp", "ESTABLISHED")]


def test_pptp_call_set_up_cleared_and_torn_down() -> None:
    eng = Engine(make_cfg())
    rec = Recorder(eng)
    c = Ctl(eng, H2, SRV)
    c.open(0.0)
    assert rec.take() == [("new", "", "tcp", "SYN_SENT"), ("update", "state", "tcp", "ESTABLISHED")]
    masq = field(c.send(ocrq(0x100), 1.0)[0], 12)
    c.recv(ocrp(0x900, masq), 1.0)
    got = [x for x in rec.take() if x[2] == "gre"]
    assert got == [("new", "", "gre", "SETUP"), ("update", "state", "gre", "ESTABLISHED")]
    assert eng.process("wan", gre(SRV, WAN_IP, masq), 2.0)
    assert rec.take() == []  # traffic changes nothing
    c.send(ccrq(0x100), 10.0)
    c.recv(cdn(0x900), 10.1)
    assert rec.take() == [("update", "state", "gre", "CLEARING")]
    eng.expire(60.0)
    assert rec.take() == [("destroy", "timeout", "gre", "CLEARING")]
