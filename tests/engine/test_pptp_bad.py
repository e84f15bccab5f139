"""PPTP and GRE bad input (SPEC section 8): counted, dropped or passed unmodified, never a crash or a
corrupted rewrite. What happens to each kind is documented in masqd/engine/helpers/pptp.py."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import IP, raw

from masqd.engine import Engine
from masqd.wire import pptp as W
from masqd.wire.gre import build_pptp_gre
from tests.engine.conftest import H2, H3, SRV, WAN_IP, checksums_ok, make_cfg
from tests.engine.test_pptp import Ctl, field, gre, ocrq, payload, place_call, sli


def _bad(ctype: int = W.OUT_CALL_REQ, **kw: int) -> bytearray:
    return bytearray(W.build(ctype, call_id=0x10, **kw))


def test_wrong_magic_gives_up_the_connection(eng: Engine) -> None:
    c = Ctl(eng, H2, SRV)
    c.open()
    m = _bad()
    m[4] ^= 0xFF
    assert c.send(bytes(m)) == []
    assert eng.counters["drop_pptp_malformed"] == 1 and eng.counters["drop_pptp_bad_magic"] == 1
    ev = [e for e in eng.drain_events() if e[1] == "pptp_stream_abandoned"]
    assert ev and ev[0][0] == "warning" and ev[0][2]["reason"] == "pptp_bad_magic"
    # from now on its data is dropped (a valid message too), but ACK and FIN pass so it can end
    assert c.send(ocrq(0x20)) == [] and eng.counters["drop_pptp_stream_abandoned"] == 1
    assert len(c.send(b"", flags="A")) == 1
    assert len(c.send(b"", flags="FA")) == 1
    assert eng.counters.get("pptp_call_ids_in_use", 0) == 0


def test_wrong_lengths_and_message_type(eng: Engine) -> None:
    cases = [
        (_bad(length=100), "pptp_bad_length"),  # shorter than an Outgoing-Call-Request
        (bytearray(b"\x00\x04" + bytes(W.build(W.ECHO_REQ))[2:]), "pptp_bad_length"),  # below the header
        (bytearray(b"\x27\x0f" + bytes(W.build(W.ECHO_REQ))[2:]), "pptp_bad_length"),  # 9999
        (bytearray(bytes(W.build(W.ECHO_REQ))[:2] + b"\x00\x02" + bytes(W.build(W.ECHO_REQ))[4:]),
         "pptp_bad_message_type"),
    ]
    for i, (msg, reason) in enumerate(cases):
        c = Ctl(eng, H2, SRV, sport=40000 + i)
        c.open()
        assert c.send(bytes(msg)) == [], reason
        assert eng.counters["drop_" + reason] >= 1
    assert eng.counters["drop_pptp_malformed"] == len(cases)


def test_truncated_body_is_detected_at_the_next_header(eng: Engine) -> None:
    c = Ctl(eng, H2, SRV)
    c.open()
    # an Outgoing-Call-Request cut after 40 bytes, then more messages: the stream loses its framing
    assert c.send(ocrq(0x5)[:40] + sli(1) + ocrq(0x6)) == []
    assert eng.counters["drop_pptp_bad_magic"] == 1
    # a message cut by the end of the connection changes nothing and breaks nothing
    d = Ctl(eng, H3, SRV, sport=41000)
    d.open()
    out = d.send(ocrq(0x7)[:40], flags="FPA")
    assert len(out) == 1 and field(out[0], 12) == 0x7


def test_unknown_type_passes_unmodified_and_parsing_goes_on(eng: Engine) -> None:
    place_call(eng, H3, 0x10, 0x900)
    c = Ctl(eng, H2, SRV, sport=41000)
    c.open()
    unk = bytearray(W.build(99, length=20))
    unk[12:20] = b"\x00\x10" * 4
    out = c.send(bytes(unk) + ocrq(0x10))
    p = payload(out[0])
    assert p[:20] == bytes(unk)
    assert int.from_bytes(p[20 + 12:20 + 14], "big") != 0x10  # the next message is still rewritten
    assert eng.counters["pptp_unknown_type"] == 1


def test_forwarded_server_garbage_is_passed_untracked() -> None:
    eng = Engine(make_cfg('[[forwarding.portfw]]\nproto = "tcp"\nport = 1723\nto = "10.0.0.2"\nto_port = 1723\n'))
    c = Ctl(eng, H2, "198.51.100.2", sport=5555, inbound=True)
    c.open()
    junk = b"GET / HTTP/1.0\r\n\r\n"
    back = c.recv(junk)
    assert len(back) == 1 and payload(back[0]) == junk
    assert eng.counters["pptp_malformed_pptp_bad_magic"] == 1
    assert len(c.send(W.build(W.OUT_CALL_REPLY, 0x1, 0x2))) == 1  # passed, no longer tracked
    assert eng.counters.get("pptp_call_ids_in_use", 0) == 0


def test_call_ids_exhausted_towards_a_server() -> None:
    eng = Engine(make_cfg("[pptp]\nmax_calls_per_server = 1\n"))
    place_call(eng, H2, 0x10, 0x900)
    c = Ctl(eng, H3, SRV, sport=41000)
    c.open()
    assert c.send(ocrq(0x11)) == []
    assert eng.counters["drop_pptp_call_ids_exhausted"] == 1


def test_bad_gre_is_counted_and_dropped_both_ways(eng: Engine) -> None:
    c, m = place_call(eng, H2, 0x10, 0x900)

    def mk(src: str, dst: str, cid: int, mut: int, val: int) -> bytes:
        g = bytearray(build_pptp_gre(cid, b"\xff\x03abc", seq=1))
        if mut >= 0:
            g[mut] = val
        return raw(IP(src=src, dst=dst, proto=47) / bytes(g))

    cases = [
        (0, 0x30 | 0x80, "gre_bad_flags"),  # checksum bit
        (0, 0x10, "gre_bad_flags"),  # no key
        (1, 0x09, "gre_bad_flags"),  # reserved flag bits
        (1, 0x03, "gre_bad_version"),
        (3, 0x00, "gre_bad_protocol"),  # 0x8800 is not PPP
        (5, 0xFF, "gre_bad_length"),  # payload length beyond the packet
    ]
    for off, val, reason in cases:
        before = eng.counters.get("drop_" + reason, 0)
        assert eng.process("wan", mk(SRV, WAN_IP, m, off, val), 1.0) == [], reason
        assert eng.process("lan", mk(H2, SRV, 0x900, off, val), 1.0) == [], reason
        assert eng.counters["drop_" + reason] == before + 2, reason
    short = raw(IP(src=SRV, dst=WAN_IP, proto=47) / b"\x20\x01")
    assert eng.process("wan", short, 1.0) == [] and eng.counters["drop_gre_truncated"] == 1
    # the call still works
    assert len(eng.process("wan", gre(SRV, WAN_IP, m), 2.0)) == 1
    assert eng.counters.get("drop_internal_error", 0) == 0


_chunk = st.one_of(
    st.binary(max_size=60),
    st.sampled_from([ocrq(1), ocrq(2), W.build(W.OUT_CALL_REPLY, 5, 1), sli(1), W.build(W.CALL_CLEAR_REQ, 1),
                     W.build(W.CALL_DISCONNECT_NOTIFY, 5), W.build(W.IN_CALL_CONNECTED, 0, 2)]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.booleans(), _chunk, st.integers(0, 200)), max_size=12))
def test_fuzz_control_streams_never_crash_or_corrupt(steps: list[tuple[bool, bytes, int]]) -> None:
    eng = Engine(make_cfg())
    c = Ctl(eng, H2, SRV)
    c.open()
    t = 0.0
    for outbound, data, cut in steps:
        t += 1.0
        for piece in (data[:cut], data[cut:]):
            if not piece:
                continue
            out = c.send(piece, t) if outbound else c.recv(piece, t)  # checksums verified inside
            for p in out:
                assert checksums_ok(p)
        eng.process("wan", gre(SRV, WAN_IP, 1), t)
        eng.process("lan", gre(H2, SRV, 5), t)
        eng.expire(t)
    assert eng.counters.get("drop_internal_error", 0) == 0, eng.drain_events()
