"""PPTP masquerade scenarios (SPEC section 4): Call-ID masquerade, split messages, GRE demultiplexing, timers.

The first part drives a control connection and GRE through Engine.process; the tests follow.
"""

from __future__ import annotations

from typing import Any

from scapy.all import GRE, GRE_PPTP, IP, TCP, IPOption_RR, raw
from scapy.layers.pptp import (
    PPTPCallClearRequest,
    PPTPCallDisconnectNotify,
    PPTPOutgoingCallReply,
    PPTPOutgoingCallRequest,
    PPTPSetLinkInfo,
    PPTPStartControlConnectionReply,
    PPTPStartControlConnectionRequest,
)

from masqd.engine import Engine
from masqd.wire.gre import build_pptp_gre
from masqd.wire.ipv4 import decrement_ttl
from tests.engine.conftest import H2, H3, R2, R3, SRV, WAN_IP, checksums_ok, make_cfg


def gre(src: str, dst: str, cid: int, payload: bytes = b"\xff\x03\x00\x21ppp", seq: int | None = 1,
        ack: int | None = None, ttl: int = 64) -> bytes:
    return raw(IP(src=src, dst=dst, proto=47, ttl=ttl) / build_pptp_gre(cid, payload, seq, ack))


def gre_cid(pkt: bytes) -> int:
    return int(IP(pkt)[GRE_PPTP].call_id)


class Ctl:
    """A TCP control connection LAN host -> server:1723 (or remote -> WAN:1723 when ``inbound``)."""

    def __init__(self, eng: Engine, lan: str, srv: str, sport: int = 40000, inbound: bool = False,
                 options: list | None = None) -> None:
        self.eng = eng
        self.lan = lan
        self.srv = srv
        self.sport = sport
        self.inbound = inbound
        self.options = options or []
        self.cseq = 1000  # next sequence number of the LAN side
        self.sseq = 70000  # of the remote side
        self.wport = 0

    def open(self, now: float = 0.0) -> None:
        e = self.eng
        if not self.inbound:
            out = e.process("lan", raw(IP(src=self.lan, dst=self.srv) / TCP(sport=self.sport, dport=1723, flags="S",
                                                                              seq=self.cseq - 1)), now)
            assert len(out) == 1 and out[0][0] == "wan", out
            self.wport = IP(out[0][1])[TCP].sport
            back = e.process("wan", raw(IP(src=self.srv, dst=WAN_IP) / TCP(sport=1723, dport=self.wport, flags="SA",
                                                                           seq=self.sseq - 1, ack=self.cseq)), now)
            assert len(back) == 1 and back[0][0] == "lan", back
        else:  # remote client -> WAN:1723 forwarded to the LAN server
            out = e.process("wan", raw(IP(src=self.srv, dst=WAN_IP) / TCP(sport=self.sport, dport=1723, flags="S",
                                                                          seq=self.sseq - 1)), now)
            assert len(out) == 1 and out[0][0] == "lan", out
            back = e.process("lan", raw(IP(src=self.lan, dst=self.srv) / TCP(sport=1723, dport=self.sport,
                                                                             flags="SA", seq=self.cseq - 1,
                                                                             ack=self.sseq)), now)
            assert len(back) == 1 and back[0][0] == "wan", back
            self.wport = 1723

    def _lan_seg(self, data: bytes, seq: int, flags: str) -> bytes:
        if self.inbound:
            t = TCP(sport=1723, dport=self.sport, flags=flags, seq=seq, ack=self.sseq, options=self.options)
        else:
            t = TCP(sport=self.sport, dport=1723, flags=flags, seq=seq, ack=self.sseq, options=self.options)
        return raw(IP(src=self.lan, dst=self.srv) / t / data)

    def _wan_seg(self, data: bytes, seq: int, flags: str) -> bytes:
        if self.inbound:
            t = TCP(sport=self.sport, dport=1723, flags=flags, seq=seq, ack=self.cseq, options=self.options)
        else:
            t = TCP(sport=1723, dport=self.wport, flags=flags, seq=seq, ack=self.cseq, options=self.options)
        return raw(IP(src=self.srv, dst=WAN_IP) / t / data)

    def send(self, data: bytes, now: float = 0.0, seq: int | None = None, flags: str = "PA") -> list[bytes]:
        """LAN side -> remote. Returns the segments that came out on the WAN (checksums verified)."""
        s = self.cseq if seq is None else seq
        out = self.eng.process("lan", self._lan_seg(data, s, flags), now)
        if seq is None:
            self.cseq += len(data)
        for iface, p in out:
            assert iface == "wan"
            assert checksums_ok(p), IP(p).show(dump=True)
        return [p for _, p in out]

    def recv(self, data: bytes, now: float = 0.0, seq: int | None = None, flags: str = "PA") -> list[bytes]:
        """Remote -> LAN side. Returns the segments delivered on the LAN (checksums verified)."""
        s = self.sseq if seq is None else seq
        out = self.eng.process("wan", self._wan_seg(data, s, flags), now)
        if seq is None:
            self.sseq += len(data)
        for iface, p in out:
            assert iface == "lan"
            assert checksums_ok(p), IP(p).show(dump=True)
        return [p for _, p in out]


def payload(pkt: bytes) -> bytes:
    return bytes(IP(pkt)[TCP].payload)


# ------------------------------------------------------------------ messages
def ocrq(cid: int) -> bytes:
    return raw(PPTPOutgoingCallRequest(call_id=cid, call_serial_number=1))


def ocrp(cid: int, peer: int, result: int = 1) -> bytes:
    return raw(PPTPOutgoingCallReply(call_id=cid, peer_call_id=peer, result_code=result))


def sli(peer: int) -> bytes:
    return raw(PPTPSetLinkInfo(peer_call_id=peer))


def ccrq(cid: int) -> bytes:
    return raw(PPTPCallClearRequest(call_id=cid))


def cdn(cid: int) -> bytes:
    return raw(PPTPCallDisconnectNotify(call_id=cid))


def field(seg: bytes, off: int) -> int:
    """A 16-bit field of the TCP payload."""
    p = payload(seg)
    return int.from_bytes(p[off:off + 2], "big")


def place_call(eng: Engine, lan: str, cid: int, server_cid: int, sport: int = 40000, now: float = 0.0,
               srv: str = SRV) -> tuple[Ctl, int]:
    """A LAN client opens a control connection and places one call; returns (ctl, masqueraded call id)."""
    c = Ctl(eng, lan, srv, sport=sport)
    c.open(now)
    out = c.send(raw(PPTPStartControlConnectionRequest()), now)
    assert len(out) == 1
    c.recv(raw(PPTPStartControlConnectionReply()), now)
    out = c.send(ocrq(cid), now)
    assert len(out) == 1
    masq = field(out[0], 12)
    back = c.recv(ocrp(server_cid, masq), now)
    assert len(back) == 1
    assert field(back[0], 14) == cid and field(back[0], 12) == server_cid
    return c, masq


def helper(eng: Engine) -> Any:
    return next(h for h in eng.helpers if h.name == "pptp")


# ------------------------------------------------------------------ scenarios
def test_two_clients_same_call_id_same_server_each_get_their_own_gre(eng: Engine) -> None:
    c2, m2 = place_call(eng, H2, 0x100, 0x900, sport=40000)
    c3, m3 = place_call(eng, H3, 0x100, 0x901, sport=40000)
    assert m2 == 0x100  # the client's own value when free
    assert m3 != 0x100  # unique towards that server
    # the second control connection to the same server is allowed and logged
    ev = [e for e in eng.drain_events() if e[1] == "pptp_second_control_connection"]
    assert ev and ev[0][0] == "info" and ev[0][2]["lan"] == H3
    # GRE from the server, keyed by the masqueraded IDs, reaches each client with its own ID
    for key, who in ((m2, H2), (m3, H3)):
        out = eng.process("wan", gre(SRV, WAN_IP, key, b"to " + who.encode()), 1.0)
        assert len(out) == 1 and out[0][0] == "lan"
        p = IP(out[0][1])
        assert p.dst == who and gre_cid(out[0][1]) == 0x100 and p.ttl == 63
        assert bytes(p[GRE_PPTP].payload).endswith(b"to " + who.encode())
        assert checksums_ok(out[0][1])
    # GRE from each client (key = the server's call id) goes out from the WAN address
    for who, skey in ((H2, 0x900), (H3, 0x901)):
        out = eng.process("lan", gre(who, SRV, skey), 1.0)
        assert len(out) == 1 and out[0][0] == "wan"
        p = IP(out[0][1])
        assert p.src == WAN_IP and gre_cid(out[0][1]) == skey and checksums_ok(out[0][1])
    assert eng.counters["pptp_calls_setup"] == 2
    assert eng.counters["pptp_call_ids_in_use"] == 2
    rows = [r for r in eng.table(1.0) if r["proto"] == "gre"]
    assert {(r["lan"], r["masq_call_id"], r["server_call_id"], r["state"]) for r in rows} == {
        (f"{H2}:256", m2, 0x900, "ESTABLISHED"), (f"{H3}:256", m3, 0x901, "ESTABLISHED")}
    assert eng.counters.get("drop_internal_error", 0) == 0


def test_control_message_split_over_three_segments(eng: Engine) -> None:
    place_call(eng, H2, 0x100, 0x900)  # takes 0x100 towards SRV
    c = Ctl(eng, H3, SRV, sport=41000)
    c.open()
    msg = ocrq(0x100)
    parts = [msg[:5], msg[5:100], msg[100:]]
    outs = [c.send(p) for p in parts]
    assert all(len(o) == 1 for o in outs)
    joined = b"".join(payload(o[0]) for o in outs)
    assert len(joined) == len(msg)
    masq = int.from_bytes(joined[12:14], "big")
    assert masq != 0x100
    assert joined[:12] == msg[:12] and joined[14:] == msg[14:]  # only the Call ID changed
    # the server's reply, itself split in three, is rewritten back
    rep = ocrp(0x901, masq)
    ins = [c.recv(p) for p in (rep[:3], rep[3:16], rep[16:])]
    back = b"".join(payload(o[0]) for o in ins)
    assert int.from_bytes(back[14:16], "big") == 0x100 and int.from_bytes(back[12:14], "big") == 0x901
    out = eng.process("wan", gre(SRV, WAN_IP, masq), 1.0)
    assert IP(out[0][1]).dst == H3 and gre_cid(out[0][1]) == 0x100


def test_call_id_cut_by_segment_end_is_trimmed_and_resent_whole(eng: Engine) -> None:
    place_call(eng, H2, 0x100, 0x900)
    c = Ctl(eng, H3, SRV, sport=41000)
    c.open()
    msg = ocrq(0x100)
    out = c.send(msg[:13])  # ends inside the Call ID field
    assert len(out) == 1 and payload(out[0]) == msg[:12]  # trimmed just before the field
    assert eng.counters["pptp_segments_trimmed"] == 1
    c.cseq -= 1  # the peer acknowledged 12 bytes: the sender resends from there
    out = c.send(msg[12:])
    assert len(out) == 1
    p = payload(out[0])
    assert int.from_bytes(p[0:2], "big") != 0x100 and p[2:] == msg[14:]


def test_two_messages_in_one_segment(eng: Engine) -> None:
    place_call(eng, H2, 0x100, 0x900)
    c = Ctl(eng, H3, SRV, sport=41000)
    c.open()
    out = c.send(ocrq(0x100) + ocrq(0x101))  # two calls in one segment
    p = payload(out[0])
    m1 = int.from_bytes(p[12:14], "big")
    m2 = int.from_bytes(p[168 + 12:168 + 14], "big")
    assert m1 != 0x100 and m2 == 0x101 and m1 != m2
    back = c.recv(ocrp(0x901, m1) + sli(m1) + ocrp(0x902, m2))  # three in one, rewritten back
    q = payload(back[0])
    assert int.from_bytes(q[14:16], "big") == 0x100
    assert int.from_bytes(q[32 + 12:32 + 14], "big") == 0x100  # Set-Link-Info's Peer Call ID
    assert int.from_bytes(q[56 + 14:56 + 16], "big") == 0x101
    assert eng.counters["pptp_calls_setup"] == 3


def test_call_clear_and_disconnect_free_the_id(eng: Engine) -> None:
    c2, m2 = place_call(eng, H2, 0x100, 0x900)
    c3, m3 = place_call(eng, H3, 0x100, 0x901, sport=41000)
    assert m3 != 0x100
    out = c2.send(ccrq(0x100), 10.0)
    assert field(out[0], 12) == m2
    back = c2.recv(cdn(0x900), 10.1)  # RFC 2637: the PAC's own Call ID; passed unchanged
    assert field(back[0], 12) == 0x900
    # H3 clears too, with a server that echoes the masqueraded ID in its Call-Disconnect-Notify
    c3.send(ccrq(0x100), 10.0)
    back = c3.recv(cdn(m3), 10.1)
    assert field(back[0], 12) == 0x100
    rows = [r for r in eng.table(10.2) if r["proto"] == "gre"]
    assert {r["state"] for r in rows} == {"CLEARING"}
    assert all(r["expires_in"] <= 30 for r in rows)
    eng.expire(45.0)
    assert not [r for r in eng.table(45.0) if r["proto"] == "gre"]
    assert eng.counters["pptp_calls_torn_down"] == 2 and eng.counters["pptp_call_ids_in_use"] == 0
    # late GRE for the cleared call: dropped, counted
    assert eng.process("wan", gre(SRV, WAN_IP, m3), 46.0) == []
    assert eng.counters["drop_gre_no_call"] == 1
    # the ID is free again: a new call from H3 keeps 0x100
    out = c3.send(ocrq(0x100), 47.0)
    assert field(out[0], 12) == 0x100


def test_control_entry_survives_while_a_call_carries_gre() -> None:
    eng = Engine(make_cfg("[masquerade.timeouts]\ntcp_established = 60\n"))
    c, m = place_call(eng, H2, 0x100, 0x900)
    t = 0.0
    while t < 600:
        t += 30
        assert eng.process("wan", gre(SRV, WAN_IP, m), t)
        eng.expire(t)
    tcp_rows = [r for r in eng.table(t) if r["proto"] == "tcp"]
    assert tcp_rows and tcp_rows[0]["helper"] == "pptp"
    # no more GRE: the control session times out, its call gets the clearing grace, then goes
    eng.expire(t + 61)
    assert not [r for r in eng.table(t + 61) if r["proto"] == "tcp"]
    rows = [r for r in eng.table(t + 61) if r["proto"] == "gre"]
    assert rows and rows[0]["state"] == "CLEARING"
    eng.expire(t + 61 + 31)
    assert not [r for r in eng.table(t + 100) if r["proto"] == "gre"]


def test_unanswered_and_idle_calls_expire_and_late_gre_is_dropped() -> None:
    eng = Engine(make_cfg("[pptp]\ncall_setup_timeout = 20\ncall_timeout = 100\n"))
    c = Ctl(eng, H2, SRV)
    c.open()
    m = field(c.send(ocrq(0x55))[0], 12)
    assert [r["state"] for r in eng.table(1.0) if r["proto"] == "gre"] == ["SETUP"]
    eng.expire(21.0)
    assert not [r for r in eng.table(21.0) if r["proto"] == "gre"]
    assert eng.counters["pptp_calls_expired"] == 1
    assert eng.process("wan", gre(SRV, WAN_IP, m), 22.0) == []
    # an established call expires call_timeout after its last GRE
    c2, m2 = place_call(eng, H3, 0x66, 0x901, sport=41000, now=30.0)
    eng.process("wan", gre(SRV, WAN_IP, m2), 50.0)
    eng.expire(149.0)
    assert eng.process("wan", gre(SRV, WAN_IP, m2), 149.5)
    eng.expire(250.0)
    assert eng.process("wan", gre(SRV, WAN_IP, m2), 251.0) == []
    assert eng.process("lan", gre(H3, SRV, 0x901), 251.0) == []
    assert eng.counters["drop_gre_no_call"] == 3


def test_retransmission_is_rewritten_the_same_and_future_segments_wait(eng: Engine) -> None:
    place_call(eng, H2, 0x100, 0x900)
    c = Ctl(eng, H3, SRV, sport=41000)
    c.open()
    msg = ocrq(0x100)
    seq0 = c.cseq
    first = c.send(msg)
    again = c.send(msg, seq=seq0)  # retransmitted whole
    assert payload(first[0]) == payload(again[0])
    half = c.send(msg[6:], seq=seq0 + 6)  # retransmitted from another boundary
    assert payload(half[0]) == payload(first[0])[6:]
    # a segment beyond the expected sequence number is dropped until the gap is filled
    assert c.send(sli(0x900), seq=c.cseq + 100) == []
    assert eng.counters["drop_pptp_out_of_order"] == 1
    assert len(c.send(sli(0x900))) == 1


def test_tcp_options_and_ip_options_are_honoured(eng: Engine) -> None:
    c = Ctl(eng, H2, SRV, options=[("Timestamp", (1, 2)), ("NOP", None), ("NOP", None)])
    c.open()
    out = c.send(ocrq(0x77))
    assert field(out[0], 12) == 0x77
    pkt = raw(IP(src=SRV, dst=WAN_IP, options=[IPOption_RR(routers=["198.51.100.254"])])
              / TCP(sport=1723, dport=c.wport, flags="PA", seq=c.sseq, ack=c.cseq) / ocrp(0x333, 0x77))
    back = eng.process("wan", pkt, 0.5)
    assert len(back) == 1 and checksums_ok(back[0][1])
    assert field(back[0][1], 14) == 0x77
    assert [r["server_call_id"] for r in eng.table(1.0) if r["proto"] == "gre"] == [0x333]


def test_forwarded_lan_server_answers_calls_and_coexists_with_clients() -> None:
    eng = Engine(make_cfg('[[forwarding.portfw]]\nproto = "tcp"\nport = 1723\nto = "10.0.0.2"\nto_port = 1723\n'))
    srv = Ctl(eng, H2, R2, sport=5555, inbound=True)
    srv.open()
    back = srv.recv(ocrq(0x4000))  # remote client places a call: not rewritten
    assert field(back[0], 12) == 0x4000
    out = srv.send(ocrp(0x1234, 0x4000))  # the LAN server answers with its own Call ID
    assert field(out[0], 12) == 0x1234 and field(out[0], 14) == 0x4000
    # GRE from the remote client (key = the server's Call ID) reaches the LAN server unchanged
    g = eng.process("wan", gre(R2, WAN_IP, 0x1234), 1.0)
    assert len(g) == 1 and IP(g[0][1]).dst == H2 and gre_cid(g[0][1]) == 0x1234
    g = eng.process("lan", gre(H2, R2, 0x4000), 1.0)
    assert len(g) == 1 and IP(g[0][1]).src == WAN_IP and gre_cid(g[0][1]) == 0x4000
    # meanwhile a LAN client calls the same remote with the same Call ID: it gets another one
    c, m = place_call(eng, H3, 0x1234, 0x77, sport=42000, srv=R2)
    assert m != 0x1234
    g = eng.process("wan", gre(R2, WAN_IP, m), 2.0)
    assert IP(g[0][1]).dst == H3 and gre_cid(g[0][1]) == 0x1234
    g = eng.process("wan", gre(R2, WAN_IP, 0x1234), 2.0)
    assert IP(g[0][1]).dst == H2
    rows = {r["lan"]: r for r in eng.table(2.0) if r["proto"] == "gre"}
    assert rows[f"{H2}:{0x1234}"]["inbound"] is True and rows[f"{H3}:{0x1234}"]["inbound"] is False


def test_unknown_inbound_gre_goes_to_protocol_forwarding_when_configured() -> None:
    eng = Engine(make_cfg('[[forwarding.protofw]]\nproto = 47\nto = "10.0.0.3"\n'))
    c, m = place_call(eng, H2, 0x100, 0x900)
    out = eng.process("wan", gre(R3, WAN_IP, 0x999), 1.0)
    assert len(out) == 1 and IP(out[0][1]).dst == H3  # ipfwd --masq 10.0.0.3 47
    out = eng.process("wan", gre(SRV, WAN_IP, m), 1.0)
    assert IP(out[0][1]).dst == H2  # a known call still goes to its client


def test_plain_gre_is_masqueraded_by_address_pair(eng: Engine) -> None:
    plain = raw(IP(src=H2, dst=R2, proto=47) / GRE(proto=0x0800) / IP(src="172.16.0.1", dst="172.16.0.2"))
    out = eng.process("lan", plain, 0.0)
    assert len(out) == 1 and IP(out[0][1]).src == WAN_IP and checksums_ok(out[0][1])
    reply = raw(IP(src=R2, dst=WAN_IP, proto=47) / GRE(proto=0x0800) / IP(src="172.16.0.2", dst="172.16.0.1"))
    back = eng.process("wan", reply, 0.1)
    assert len(back) == 1 and IP(back[0][1]).dst == H2 and checksums_ok(back[0][1])
    # one LAN host per remote: another host's plain GRE to the same remote is refused
    other = raw(IP(src=H3, dst=R2, proto=47) / GRE(proto=0x0800) / (b"x" * 20))
    assert eng.process("lan", other, 0.2) == []
    assert eng.counters["drop_gre_plain_remote_busy"] == 1
    # plain GRE from a remote nobody talks to: counted, not delivered
    assert eng.process("wan", raw(IP(src=R3, dst=WAN_IP, proto=47) / GRE(proto=0x0800) / (b"y" * 20)), 0.3) == []
    assert eng.counters["drop_gre_no_entry"] == 1


def test_wan_address_change_moves_calls(eng: Engine) -> None:
    import ipaddress

    c, m = place_call(eng, H2, 0x100, 0x900)
    eng.set_wan_address(ipaddress.IPv4Interface("203.0.113.201/24"), 5.0)
    out = eng.process("lan", gre(H2, SRV, 0x900), 6.0)
    assert IP(out[0][1]).src == "203.0.113.201" and checksums_ok(out[0][1])
    back = eng.process("wan", gre(SRV, "203.0.113.201", m), 6.0)
    assert IP(back[0][1]).dst == H2 and checksums_ok(back[0][1])


def test_flush_and_size(eng: Engine) -> None:
    place_call(eng, H2, 0x100, 0x900)
    place_call(eng, H3, 0x100, 0x901, sport=41000)
    h = helper(eng)
    assert h.size() == 2
    assert h.flush() == 2
    assert h.size() == 0 and eng.counters["pptp_call_ids_in_use"] == 0


def test_fast_path_matches_full_path(eng: Engine) -> None:
    """Established GRE takes the helper's fast path; its output equals what the full path makes."""
    c, m = place_call(eng, H2, 0x100, 0x900)
    h = helper(eng)
    pkt_in = gre(SRV, WAN_IP, m, b"\xff\x03" + b"z" * 100, seq=7, ack=3)
    pkt_out = gre(H2, SRV, 0x900, b"\xff\x03" + b"q" * 100, seq=9)
    assert h.fast_in(pkt_in, 1.0) is None  # no firewall decision cached yet: full path
    assert eng.process("wan", pkt_in, 1.0) and eng.process("lan", pkt_out, 1.0)  # full path caches it
    fast_in = h.fast_in(pkt_in, 1.0)
    fast_out = h.fast_out(pkt_out, 1.0)
    assert fast_in is not None and fast_out is not None
    slow_in = h.demasq_in(bytearray(pkt_in), 20, 1.0)
    assert slow_in is not None
    decrement_ttl(slow_in[0])
    assert fast_in[0][1] == bytes(slow_in[0])
    slow_out = bytearray(pkt_out)
    assert h.masq_out(slow_out, 20, 1.0)
    decrement_ttl(slow_out)
    assert fast_out[0][1] == bytes(slow_out)
    assert checksums_ok(fast_in[0][1]) and checksums_ok(fast_out[0][1])
