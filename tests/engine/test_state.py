"""The masquerade state as records (masqd.engine.state): every kind made, carried as JSON,
checked and applied to a fresh engine, which then goes on translating as the first one did;
limits hold for restored state; bad records are refused whole; helpers announce their changes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from scapy.all import ESP, ICMP, IP, TCP, UDP, raw
from scapy.layers.pptp import PPTPCallClearRequest, PPTPSetLinkInfo

from masqd.config import Config
from masqd.engine import Engine
from masqd.engine import state as st
from masqd.engine.table import Change
from tests.engine.conftest import H2, H3, SRV, WAN_IP, checksums_ok, echo, make_cfg, one, tcp, udp
from tests.engine.test_ipsec import esp, ike1
from tests.engine.test_pptp import Ctl, field, gre, gre_cid, place_call

PORTFW = """
[[forwarding.portfw]]
proto = "tcp"
port = 8080
to = "10.0.0.3"
to_port = 80
"""


def carry(eng: Engine, now: float, cfg: Config | None = None, later: float | None = None,
          down: float = 0.0) -> tuple[Engine, list[str]]:
    """Export ``eng`` at ``now``, through JSON, into a fresh engine at ``later`` (``down`` seconds
    of downtime); returns it and the reasons of the records it refused."""
    recs = json.loads(json.dumps(st.export(eng, now)))
    new = Engine(cfg or eng.cfg)
    refused: list[str] = []
    st.apply_all(new, [st.check(r) for r in recs], later if later is not None else now, down, refused.append)
    return new, refused


def rows(eng: Engine, now: float) -> list[dict[str, Any]]:
    return sorted((r for r in eng.table(now) if r["proto"] not in ("portfw", "protofw")),
                  key=lambda r: json.dumps(r, sort_keys=True))


def test_tcp_udp_icmp_sessions_carry_over_and_keep_translating() -> None:
    a = Engine(make_cfg())
    now = 100.0
    o = a.process("lan", tcp(H2, SRV, 40000, 443, "S", seq=1), now)
    wport = IP(o[0][1])[TCP].sport
    a.process("wan", tcp(SRV, WAN_IP, 443, wport, "SA", seq=500, ack=2), now)
    a.process("lan", tcp(H2, SRV, 40000, 443, "A", seq=2, ack=501), now)
    u = a.process("lan", udp(H3, SRV, 5353, 53), now)
    uport = IP(u[0][1])[UDP].sport
    a.process("lan", echo(H2, SRV, ident=0x4242), now)
    b, refused = carry(a, now)
    assert refused == []
    assert rows(b, now) == rows(a, now)
    assert b.pool.use(6) == a.pool.use(6) and b.pool.use(17) == a.pool.use(17)
    # the restored engine answers as the first one would: replies reach their hosts, same ports
    back = b.process("wan", tcp(SRV, WAN_IP, 443, wport, "PA", seq=501, ack=2, payload=b"data"), now + 1)
    assert len(back) == 1 and IP(back[0][1]).dst == H2 and IP(back[0][1])[TCP].dport == 40000
    assert checksums_ok(back[0][1])
    again = b.process("lan", udp(H3, SRV, 5353, 53), now + 1)
    assert IP(again[0][1])[UDP].sport == uport
    pong = b.process("wan", echo(SRV, WAN_IP, ident=IP(a.process("lan", echo(H2, SRV, ident=0x4242), now)[0][1])
                                 [ICMP].id, reply=True), now + 1)
    assert IP(pong[0][1]).dst == H2 and IP(pong[0][1])[ICMP].id == 0x4242
    tcp_row = next(r for r in b.table(now) if r["proto"] == "tcp")
    assert tcp_row["state"] == "ESTABLISHED"


def test_downtime_shortens_timers_and_expired_entries_are_not_restored() -> None:
    a = Engine(make_cfg())
    a.process("lan", udp(H2, SRV, 1000, 53), 0.0)  # 300 s of UDP timeout
    a.process("lan", echo(H2, SRV), 0.0)  # 60 s of ICMP timeout
    b, refused = carry(a, 0.0, later=5000.0, down=100.0)
    assert refused == ["expired"]
    (row,) = rows(b, 5000.0)
    assert row["proto"] == "udp" and row["expires_in"] == 200.0
    b.expire(5000.0 + 199)
    assert len(b.nat) == 1
    b.expire(5000.0 + 201)
    assert len(b.nat) == 0


def test_port_forward_session_carries_over_through_the_configured_forward() -> None:
    cfg = make_cfg(PORTFW)
    a = Engine(cfg)
    o = a.process("wan", tcp(SRV, WAN_IP, 50000, 8080, "S"), 0.0)
    assert IP(o[0][1]).dst == H3
    a.process("lan", tcp(H3, SRV, 80, 50000, "SA", seq=9, ack=1001), 0.0)
    b, refused = carry(a, 0.0)
    assert refused == []
    row = next(r for r in b.table(0.0) if r["proto"] == "tcp")
    assert row["inbound"] and row["wan"] == f"{WAN_IP}:8080"
    back = b.process("lan", tcp(H3, SRV, 80, 50000, "PA", seq=10, ack=1001, payload=b"hi"), 1.0)
    assert IP(back[0][1]).src == WAN_IP and IP(back[0][1])[TCP].sport == 8080
    # without the forward in the configuration, the session is refused, not half-made
    c, refused = carry(a, 0.0, cfg=make_cfg())
    assert refused == ["no_port_forward"] and len(c.nat) == 0 and not c.nat.maps


def test_limits_hold_for_restored_state() -> None:
    a = Engine(make_cfg())
    for i in range(20):  # twenty hosts (a 16-entry table gives each host one entry)
        a.process("lan", udp(f"10.0.0.{10 + i}", SRV, 2000, 53), 0.0)
    b, refused = carry(a, 0.0, cfg=make_cfg("[masquerade]\nmax_entries = 16\n"))
    assert len(b.nat) == 16 and refused == ["table_full"] * 4
    assert len(b.nat.maps) == 16 and b.pool.use(17) == 16  # no mapping left behind by a refusal
    # a host's share holds too: twenty sessions of one host, where a host may hold sixteen
    a2 = Engine(make_cfg())
    for i in range(20):
        a2.process("lan", udp(H2, SRV, 2000 + i, 53), 0.0)
    b2, refused2 = carry(a2, 0.0, cfg=make_cfg("[limits]\nhost_max_entries = 16\n"))
    assert len(b2.nat) == 16 and len(refused2) == 4 and len(b2.nat.maps) == 16
    # a port owned by another mapping in the new engine is not taken over
    c = Engine(make_cfg())
    c.process("lan", udp(H3, SRV, 2000, 53), 0.0)  # H3:2000 takes WAN port 2000 (preserved)
    recs = [st.check(r) for r in st.export(a, 0.0)]
    refused = []
    st.apply_all(c, recs, 0.0, 0.0, refused.append)
    assert refused == ["port_taken"]
    assert c.pool.owner(17, 2000).lan_ip == int.from_bytes(bytes([10, 0, 0, 3]), "big")


def test_ipsec_pairs_and_cookies_carry_over_without_a_new_exchange() -> None:
    a = Engine(make_cfg("[ipsec]\nparallel_sessions = true\n"))
    now = 1000.0
    ic, rc = b"\x11" * 8, b"\x22" * 8
    a.process("lan", ike1(H2, SRV, ic), now)
    a.process("wan", ike1(SRV, WAN_IP, ic, rc), now)
    a.process("lan", esp(H2, SRV, 0x1000), now)
    a.process("wan", esp(SRV, WAN_IP, 0x2000), now)
    a.process("lan", esp(H3, SRV, 0x3000), now)  # pending: no reply yet
    b, refused = carry(a, now)
    assert refused == []
    assert rows(b, now) == rows(a, now)
    # inbound ESP of the known pair goes to its host, outbound keeps flowing; the pending entry
    # still waits for its reply, so the next unknown SPI pairs with H3
    got = b.process("wan", esp(SRV, WAN_IP, 0x2000), now + 1)
    assert [IP(p).dst for _, p in got] == [H2]
    assert b.process("lan", esp(H2, SRV, 0x1000), now + 1)[0][0] == "wan"
    got = b.process("wan", esp(SRV, WAN_IP, 0x4000), now + 1)
    assert [IP(p).dst for _, p in got] == [H3]
    # a re-key on the same ISAKMP SA routes by the restored cookie pair
    got = b.process("wan", ike1(SRV, WAN_IP, ic, rc, exch=32), now + 1)
    assert IP(got[0][1]).dst == H2
    assert b.counters.get("esp_learned") == 1 and b.counters.get("isakmp_sessions") is None


def test_pptp_control_stream_and_calls_carry_over_at_the_right_sequence_number() -> None:
    a = Engine(make_cfg())
    c, masq = place_call(a, H2, cid=7, server_cid=0x5000)
    b, refused = carry(a, 0.0)
    assert refused == []
    assert rows(b, 0.0) == rows(a, 0.0)
    c.eng = b  # the same connection goes on through the restored engine
    # inbound GRE with the masqueraded ID reaches the client with its own ID
    got = b.process("wan", gre(SRV, WAN_IP, masq), 1.0)
    assert IP(got[0][1]).dst == H2 and gre_cid(got[0][1]) == 7
    # the next control message is parsed where the stream was: the server's Set-Link-Info
    # names the masqueraded ID, rewritten back to the client's
    seg = c.recv(raw(PPTPSetLinkInfo(peer_call_id=masq)), 1.0)
    assert field(seg[0], 12) == 7
    # the client clears the call: its own ID is masqueraded on the way out; the call clears
    seg = c.send(raw(PPTPCallClearRequest(call_id=7)), 1.0)
    assert field(seg[0], 12) == masq
    h = next(h for h in b.helpers if h.name == "pptp")
    assert [call.state for call in h.calls] == [2]  # CLEARING


def test_a_record_that_is_not_well_formed_is_refused_whole() -> None:
    a = Engine(make_cfg())
    a.process("lan", udp(H2, SRV, 1000, 53), 0.0)
    good = st.export(a, 0.0)[0]
    for bad in ({**good, "k": "nonsense"}, {**good, "v": 2}, {**good, "lp": 70000}, {**good, "li": "10.0.0.2"},
                {**good, "left": float("nan")}, {**good, "in": 1}, {k: v for k, v in good.items() if k != "ri"},
                {**good, "p": 47}, [good], "session"):
        with pytest.raises(st.BadRecord):
            st.check(bad)
    assert st.check(dict(good)) == good


def test_forget_and_sweep_remove_by_key() -> None:
    a = Engine(make_cfg())
    a.process("lan", udp(H2, SRV, 1000, 53), 0.0)
    a.process("lan", udp(H3, SRV, 1001, 53), 0.0)
    recs = [st.check(r) for r in st.export(a, 0.0)]
    assert st.forget(a, recs[0], "flush") and not st.forget(a, recs[0], "flush")
    a.process("lan", udp(H2, SRV, 1000, 53), 0.0)
    assert st.sweep(a, {st.key(recs[0])}, 0.0, "flush") == 1
    assert [r["lan"] for r in a.table(0.0)] == [f"{H2}:1000"]


def test_helpers_announce_their_entries_on_the_change_stream() -> None:
    a = Engine(make_cfg())
    seen: list[Change] = []
    a.nat.subscribe(seen.append)
    ic, rc = b"\x11" * 8, b"\x22" * 8
    a.process("lan", ike1(H2, SRV, ic), 0.0)
    a.process("wan", ike1(SRV, WAN_IP, ic, rc), 0.0)
    a.process("lan", esp(H2, SRV, 0x1000), 0.0)
    a.process("wan", esp(SRV, WAN_IP, 0x2000), 0.0)
    kinds = [(st.record_of(a, ch.entry, 0.0) or {}).get("k") for ch in seen]
    assert [(k, ch.kind, ch.reason) for k, ch in zip(kinds, seen, strict=True)] == [
        ("ike", "new", ""), ("ike", "update", "state"), ("esp", "new", ""), ("esp", "update", "paired")]
    seen.clear()
    place_call(a, H3, cid=9, server_cid=0x6000)
    got = [((st.record_of(a, ch.entry, 0.0) or {}).get("k"), ch.kind, ch.reason) for ch in seen]
    assert ("pptp_conn", "new", "") in got and ("pptp_conn", "update", "stream") in got
    assert ("pptp_call", "new", "") in got and ("pptp_call", "update", "state") in got
    seen.clear()
    a.flush()
    got = {((st.record_of(a, ch.entry, 0.0) or {}).get("k"), ch.kind, ch.reason) for ch in seen}
    assert {("esp", "destroy", "flush"), ("ike", "destroy", "flush"), ("pptp_call", "destroy", "flush"),
            ("session", "destroy", "flush")} <= got


def test_rearm_gives_every_entry_a_full_lifetime() -> None:
    a = Engine(make_cfg())
    a.process("lan", udp(H2, SRV, 1000, 53), 0.0)
    a.process("lan", esp(H2, SRV, 0x1000), 0.0)
    a.process("wan", esp(SRV, WAN_IP, 0x2000), 0.0)
    st.rearm(a, 1000.0)
    left = {r["proto"]: r["expires_in"] for r in a.table(1000.0)}
    assert left == {"udp": 300.0, "esp": 1800.0}
    a.expire(1299.0)
    assert len(a.nat) == 1


def test_pptp_call_whose_control_connection_ended_carries_over_clearing() -> None:
    a = Engine(make_cfg())
    c, masq = place_call(a, H2, cid=7, server_cid=0x5000)
    for s in a.nat.sessions():
        a.nat.remove(s, "flush")
    a.expire(0.5)  # the orphaned call starts clearing
    b, refused = carry(a, 0.5)
    assert refused == []
    h = next(h for h in b.helpers if h.name == "pptp")
    assert [(x.state, x.masq_cid, x.ctl) for x in h.calls] == [(2, masq, None)]
    b.expire(0.5 + 31)
    assert not h.calls and not h._detached


def test_ctl_helper_kept_for_records_of_an_engine_with_pptp_off() -> None:
    a = Engine(make_cfg())
    Ctl(a, H2, SRV).open(0.0)
    b, refused = carry(a, 0.0, cfg=make_cfg("[pptp]\nenabled = false\n"))
    assert refused == ["helper_off", "helper_off"] and len(b.nat) == 0
    assert ESP  # (scapy layer used by the IPsec builders)


def test_pcp_leases_and_their_connections_carry_over_and_the_epoch_goes_on() -> None:
    """A NAT-PMP mapping, a connection through it and the mapping epoch survive a restart (the
    state document), so the clients need not map again; a lease the active ends is forgotten."""
    from tests.engine import pcpclient as pc
    from tests.engine.test_pcp import engine, inbound_syn, nat1

    a = engine()
    a.start(100.0)
    got = nat1(a, pc.natpmp_map_request("tcp", 8080, 40000, 3600), 100.0)
    assert (got.result, got.external) == (0, 40000)
    assert one(inbound_syn(a, 40000, 101.0), "lan").dst == H2
    one(a.process("lan", tcp(H2, "198.51.100.2", 8080, 33000, "SA"), 101.0), "wan")
    doc = json.loads(json.dumps(st.document(a, 110.0)))
    b = engine()
    out = st.load_document(b, doc, 200.0, 90.0, dynamic_wan=False)  # down 90 s, back at 200
    assert not [k for k in out if k != "restored"] and out["restored"] == 2
    lease = next(r for r in b.table(200.0) if r["proto"] == "pcp")
    assert lease["lan"] == f"{H2}:8080" and lease["wan"] == f"{WAN_IP}:40000"
    assert 3500 <= lease["expires_in"] <= 3600 - 100  # its lifetime went on while masqd was down
    # the open connection goes on, a new remote still reaches the host, the epoch did not restart
    assert one(b.process("wan", tcp("198.51.100.2", WAN_IP, 33000, 40000, "A", b"x"), 200.0), "lan").dst == H2
    assert one(inbound_syn(b, 40000, 200.0, src="198.51.100.3"), "lan").dst == H2
    assert nat1(b, pc.natpmp_address_request(), 200.0).epoch >= 100
    # the host's mapping count came along: deleting its one mapping leaves it none
    assert nat1(b, pc.natpmp_map_request("tcp", 8080, 0, 0), 201.0).result == 0
    assert not [r for r in b.table(201.0) if r["proto"] == "pcp"]
    rec = st.lease_record(next(iter(a.nat.leases.values())), 110.0)
    assert st.forget(a, st.check(rec), "flush") and not a.nat.leases
