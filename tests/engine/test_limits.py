"""Per-host limits, port quarantine, early drop and the half-open cap, on a fake clock.

Each test drives the engine with packets (as a misbehaving LAN host or a hostile WAN
would) and checks what the other hosts still get, what was counted and what the
table holds. Defaults are used unless the test is about the setting it changes.
"""

from __future__ import annotations

import struct

import pytest
from scapy.all import TCP, UDP

from masqd.engine import Engine
from masqd.engine.expiry import TimerWheel
from masqd.engine.table import DESTROY, TABLE_FULL, Change
from masqd.wire.ipv4 import set_ip_checksum
from tests.engine.conftest import H2, H3, R2, SRV, WAN_IP, make_cfg, one, tcp, udp


def sprayer(src: str, dst: str, dport: int = 53) -> tuple[bytearray, bytes]:
    """A template UDP packet from ``src`` and its bytes; ``spray(tpl, sport, dport)`` re-aims it."""
    tpl = bytearray(udp(src, dst, 1, dport))
    return tpl, bytes(tpl)


def spray(tpl: bytearray, sport: int, dport: int | None = None, src: int | None = None) -> bytes:
    struct.pack_into("!H", tpl, 20, sport)
    if dport is not None:
        struct.pack_into("!H", tpl, 22, dport)
    if src is not None:
        struct.pack_into("!I", tpl, 12, src)
    set_ip_checksum(tpl, 20)
    return bytes(tpl)


@pytest.mark.conformance("RFC 6888 REQ-4")
def test_one_host_spraying_every_source_port_leaves_the_pool_to_the_others() -> None:
    """The issue's case: one host sends UDP from all its source ports to one server. With the
    defaults it holds a quarter of the pool at most; another host's new flow still gets a port."""
    eng = Engine(make_cfg())
    tpl, _ = sprayer(H2, SRV)
    limit = eng.nat.limits.max_ports
    assert limit == (65535 - 1024 + 1) // 4
    now = 0.0
    for sport in range(1, 65536):
        now += 0.002  # 500 new flows a second: under the default rate limit
        eng.process("lan", spray(tpl, sport), now)
    c = eng.counters
    assert eng.nat.hosts[0x0A000002].ports[1] == limit  # (ports 1-1023 were preserved, outside the pool)
    assert c["pool_used_udp"] == limit - 1023
    assert c["drop_host_ports_limit"] == 65535 - limit
    assert "drop_pool_exhausted" not in c
    p = one(eng.process("lan", udp(H3, SRV, 5555, 53), now), "wan")
    assert p.src == WAN_IP  # (port 5555 is H2's: H3 gets another)
    top = eng.host_limits(now)["top_offenders"]
    assert top[0]["host"] == H2 and top[0]["reasons"] == {"host_ports_limit": 65535 - limit}
    assert len(top) == 1
    # the refusals were logged a few times, not once per packet (one event each 10 s at most)
    events = [e for e in eng.drain_events() if e[1] == "host_limit"]
    assert 1 <= len(events) <= now / 10 + 1
    assert sum(e[2]["drops"] for e in events) <= 65535 - limit


def test_a_host_hitting_its_limit_can_use_the_mappings_it_has() -> None:
    eng = Engine(make_cfg("[limits]\nhost_max_ports = 10\n"))
    tpl, _ = sprayer(H2, SRV)
    outs = [eng.process("lan", spray(tpl, 1000 + i), 0.0) for i in range(15)]
    assert sum(1 for o in outs if o) == 10 and eng.counters["drop_host_ports_limit"] == 5
    assert len(eng.process("lan", spray(tpl, 1003), 1.0)) == 1  # an existing mapping: new remote port too
    assert len(eng.process("lan", spray(tpl, 1003, 54), 1.0)) == 1
    # ICMP identifiers are counted apart from UDP ports
    assert eng.process("lan", bytes(tcp(H2, SRV, 999, 80, "S")), 1.0)


@pytest.mark.conformance("RFC 6888 REQ-4")
def test_rate_of_new_mappings_is_a_token_bucket() -> None:
    eng = Engine(make_cfg())
    lim = eng.nat.limits
    assert (lim.rate, lim.burst) == (1000.0, 4000)
    tpl, _ = sprayer(H2, SRV)
    got = sum(1 for i in range(5000) if eng.process("lan", spray(tpl, 1000 + i), 10.0))
    assert got == 4000 and eng.counters["drop_host_rate_limit"] == 1000
    got = sum(1 for i in range(5000, 7000) if eng.process("lan", spray(tpl, 1000 + i), 10.5))
    assert got == 500  # half a second: 500 tokens
    # another host has its own bucket
    assert eng.process("lan", udp(H3, SRV, 4000, 53), 10.5)


def test_a_host_over_its_rate_reaches_the_full_path_at_a_bounded_rate() -> None:
    """Once the rate limit refuses a host, its flow-opening packets reach the full path at twice
    its mapping rate (a second's worth of burst) for as long as it stays over: the rest are
    dropped before it, cheaply. Its established flows, its other packets and the other hosts
    are untouched, and the hold ends a second after its last refusal."""
    eng = Engine(make_cfg())
    mu = eng.nat.mutes
    assert (mu.rate, mu.burst) == (2000.0, 2000.0)
    tpl, _ = sprayer(H2, SRV)
    assert eng.process("lan", udp(H2, SRV, 7000, 53), 10.0)  # an established flow (one token)
    assert eng.process("lan", bytes(tcp(H2, SRV, 7001, 80, "S")), 10.0)  # (another)
    got = sum(1 for i in range(24000) if eng.process("lan", spray(tpl, 10000 + i), 10.0))
    c = eng.counters  # (a copy)
    assert got == 3998  # the bucket's burst, less the two flows above
    assert c["drop_host_rate_limit"] == 1 + 2000  # the first refusal, then the budget's burst
    assert c["drop_host_slowpath_limit"] == 24000 - 3998 - 2001
    assert list(mu.hosts) == [0x0A000002]
    # the host's established flows go on; packets that open nothing are not held back
    assert eng.process("lan", udp(H2, SRV, 7000, 53), 10.0)
    assert eng.process("lan", bytes(tcp(H2, SRV, 7001, 80, "A")), 10.0)
    before = eng.counters["drop_host_slowpath_limit"]
    assert before == c["drop_host_slowpath_limit"]
    eng.process("lan", bytes(tcp(H2, SRV, 7002, 80, "A")), 10.0)  # no session: the full path says
    assert eng.counters["drop_host_slowpath_limit"] == before
    # another host is not held
    assert eng.process("lan", udp(H3, SRV, 4000, 53), 10.0)
    top = eng.host_limits(10.0)["top_offenders"]
    assert top[0]["host"] == H2 and top[0]["reasons"]["host_slowpath_limit"] == before
    assert eng.host_limits(10.0)["hosts_over_rate"] == 1
    assert eng.tables()["limit_hosts_over_rate"] == (1, 64)
    # half a second on: 1000 more for the full path, of which the mapping bucket's 500 are new flows
    got = sum(1 for i in range(3000) if eng.process("lan", spray(tpl, 40000 + i), 10.5))
    c = eng.counters
    assert got == 500 and c["drop_host_slowpath_limit"] == before + 2000
    assert c["drop_host_rate_limit"] == 2001 + 1 + 500  # (the lone ACK above wanted a mapping too)
    # a second after its last refusal the hold is over: the host opens flows at its rate again
    eng.expire(11.6)
    assert mu.hosts == {} and eng.host_limits(11.6)["hosts_over_rate"] == 0
    got = sum(1 for i in range(100) if eng.process("lan", spray(tpl, 50000 + i), 11.6))
    assert got == 100


def test_the_bound_on_a_host_over_its_rate_is_a_setting() -> None:
    eng = Engine(make_cfg("[limits]\nhost_slowpath_rate = 0\n"))
    tpl, _ = sprayer(H2, SRV)
    got = sum(1 for i in range(6000) if eng.process("lan", spray(tpl, 10000 + i), 10.0))
    assert got == 4000 and eng.counters["drop_host_rate_limit"] == 2000
    assert "drop_host_slowpath_limit" not in eng.counters and eng.nat.mutes.hosts == {}
    eng = Engine(make_cfg("[limits]\nhost_slowpath_rate = 100\n"))
    assert (eng.nat.mutes.rate, eng.nat.mutes.burst) == (100.0, 100.0)
    got = sum(1 for i in range(6000) if eng.process("lan", spray(tpl, 10000 + i), 10.0))
    assert got == 4000 and eng.counters["drop_host_rate_limit"] == 101
    assert eng.counters["drop_host_slowpath_limit"] == 6000 - 4000 - 101


def test_what_opens_a_flow() -> None:
    """The packets the bound applies to: those that would make a new mapping."""
    from scapy.all import ICMP, IP

    from masqd.engine.limits import opener_src

    h2 = 0x0A000002
    assert opener_src(udp(H2, SRV, 1, 53)) == h2
    assert opener_src(bytes(tcp(H2, SRV, 1, 80, "S"))) == h2
    assert opener_src(bytes(IP(src=H2, dst=SRV) / ICMP(type=8))) == h2
    for p in (bytes(tcp(H2, SRV, 1, 80, "SA")), bytes(tcp(H2, SRV, 1, 80, "A")), bytes(tcp(H2, SRV, 1, 80, "R")),
              bytes(IP(src=H2, dst=SRV) / ICMP(type=0)), bytes(IP(src=H2, dst=SRV, proto=50) / (b"e" * 16)),
              bytes(IP(src=H2, dst=SRV, flags="MF") / UDP() / (b"f" * 16)),
              bytes(IP(src=H2, dst=SRV, frag=8) / (b"f" * 16)), bytes(tcp(H2, SRV, 1, 80, "S"))[:33], b"\x45" * 10):
        assert opener_src(p) is None, p


@pytest.mark.conformance("RFC 6888 REQ-5")
def test_entries_per_host_are_limited_and_others_keep_their_share() -> None:
    eng = Engine(make_cfg("[limits]\nhost_max_entries = 300\n"))
    tpl, _ = sprayer(H2, SRV)
    got = sum(1 for i in range(500) if eng.process("lan", spray(tpl, 4000, 1 + i), 0.0))  # one port, many remotes
    assert got == 300 and eng.counters["drop_host_entries_limit"] == 200
    assert eng.counters["sessions"] == 300 and eng.counters["mappings"] == 1
    assert eng.process("lan", udp(H3, SRV, 4000, 53), 0.0)
    eng.expire(301.0)
    assert eng.counters["sessions"] == 0 and eng.nat.hosts[0x0A000003].ports[1] == 1  # (in quarantine)
    eng.expire(421.0)
    assert eng.nat.hosts == {}


def test_default_entries_limit_is_a_sixteenth_of_the_table() -> None:
    eng = Engine(make_cfg())
    assert eng.nat.limits.max_entries == 1_048_576 // 16


@pytest.mark.conformance("RFC 6888 REQ-8")
@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_rfc6888_req8_a_released_port_is_not_given_to_another_host_during_the_quarantine(proto: str) -> None:
    eng = Engine(make_cfg())
    pkt = (lambda h, t: udp(h, SRV, 5000, 53)) if proto == "udp" else (lambda h, t: tcp(h, SRV, 5000, 80, "S"))
    assert one(eng.process("lan", pkt(H2, 0), 0.0), "wan").sport == 5000
    eng.expire(1000.0)
    assert eng.counters["sessions"] == 0
    # another host wants the same port: preserved ports are not handed over while quarantined
    assert one(eng.process("lan", pkt(H3, 0), 1001.0), "wan").sport != 5000
    # its former holder gets it back at once
    assert one(eng.process("lan", pkt(H2, 0), 1001.0), "wan").sport == 5000
    eng.flush()
    eng.expire(1200.0)  # H2's port is in quarantine again from the flush (at 1001) until 1121
    assert eng.host_limits(1200.0)["ports_in_quarantine"] == 0
    assert one(eng.process("lan", pkt(H3, 0), 1200.0), "wan").sport == 5000
    assert eng.host_limits(1200.0)["limits"]["port_quarantine"] == 120.0


@pytest.mark.conformance("RFC 6888 REQ-8")
def test_quarantined_ports_count_against_their_host_so_churn_cannot_drain_the_pool() -> None:
    eng = Engine(make_cfg("[limits]\nhost_max_ports = 50\n[masquerade]\nport_preservation = false\n"))
    tpl, _ = sprayer(H2, SRV)
    now = 0.0
    for i in range(400):  # a new port every second, each mapping expiring 300 s later
        now += 1.0
        eng.process("lan", spray(tpl, 1000 + i), now)
        eng.expire(now)
    hl = eng.host_limits(now)
    assert eng.pool.use(17) <= 50
    assert hl["ports_in_quarantine"] + eng.counters["mappings"] <= 50
    assert eng.counters["drop_host_ports_limit"] > 0


def test_host_state_is_per_host_and_goes_away_with_its_last_entry() -> None:
    eng = Engine(make_cfg("[limits]\nport_quarantine = 0\n"))
    tpl, _ = sprayer(H2, SRV)
    for i in range(1000):
        eng.process("lan", spray(tpl, 1000 + i), 0.0)
    assert len(eng.nat.hosts) == 1 and eng.nat.hosts[0x0A000002].sessions == 1000
    eng.expire(400.0)
    assert eng.nat.hosts == {} and eng.pool.use(17) == 0


def test_offenders_are_bounded_and_decay() -> None:
    eng = Engine(make_cfg("[limits]\nhost_max_ports = 1\ntop_offenders = 3\n"))
    tpl, _ = sprayer(H2, SRV)
    for h in range(200):
        src = 0x0A010000 + h
        for k in range(2 + h % 5):
            eng.process("lan", spray(tpl, 1000 + k, src=src), float(h))
    off = eng.nat.offenders
    assert len(off.hosts) <= 6
    top = eng.host_limits(199.0)["top_offenders"]
    assert [r["rank"] for r in top] == [1, 2, 3]
    assert top[0]["score"] >= top[1]["score"] >= top[2]["score"]
    assert eng.counters["table_size_limit_offenders"] <= eng.counters["table_limit_limit_offenders"] == 6


# ---------------------------------------------------------------------------------------------- early drop


def _established_tcp(eng: Engine, host: str, sport: int, now: float) -> None:
    s = one(eng.process("lan", tcp(host, SRV, sport, 80, "S"), now), "wan")
    one(eng.process("wan", tcp(SRV, WAN_IP, 80, s[TCP].sport, "SA"), now), "lan")
    one(eng.process("lan", tcp(host, SRV, sport, 80, "A"), now), "wan")


NO_HOST_LIMIT = "[limits]\nhost_max_entries = 0\n"  # (a 16-entry table would allow 1 entry per host)


@pytest.mark.conformance("RFC 6888 REQ-5")
def test_a_full_table_evicts_an_unreplied_entry_never_an_established_one() -> None:
    eng = Engine(make_cfg("[masquerade]\nmax_entries = 16\n" + NO_HOST_LIMIT))
    gone: list[Change] = []
    eng.nat.subscribe(lambda ch: gone.append(ch) if ch.kind == DESTROY else None)
    for i in range(12):
        _established_tcp(eng, H2, 40000 + i, 0.0)
    for i in range(4):  # four UDP flows nobody answers
        one(eng.process("lan", udp(H3, SRV, 5000 + i, 53), 1.0), "wan")
    assert eng.counters["sessions"] == 16
    for i in range(6):  # new flows: each evicts an unreplied one (a new flow is unreplied in turn)
        one(eng.process("lan", udp(H3, R2, 6000 + i, 53), 2.0), "wan")
    c = eng.counters
    assert c["early_drop"] == 6 and "drop_table_full" not in c
    assert [ch.reason for ch in gone] == [TABLE_FULL] * 6
    assert all(ch.entry.m.proto == 17 for ch in gone)
    assert sum(1 for r in eng.table(2.0) if r["state"] == "ESTABLISHED") == 12


@pytest.mark.conformance("RFC 6888 REQ-5")
def test_a_table_full_of_established_entries_refuses_new_ones_and_leaks_nothing() -> None:
    eng = Engine(make_cfg("[masquerade]\nmax_entries = 16\n" + NO_HOST_LIMIT))
    for i in range(16):
        _established_tcp(eng, H2, 40000 + i, 0.0)
    for i in range(3):
        assert eng.process("lan", udp(H3, SRV, 7000 + i, 53), 1.0) == []
    c = eng.counters
    assert c["drop_table_full"] == 3 and "early_drop" not in c
    assert c["mappings"] == 16 and eng.pool.use(17) == 0 and 0x0A000003 not in eng.nat.hosts


def test_early_drop_takes_closing_tcp_and_half_open_entries_too() -> None:
    eng = Engine(make_cfg("[masquerade]\nmax_entries = 16\n" + NO_HOST_LIMIT))
    for i in range(15):
        _established_tcp(eng, H2, 40000 + i, 0.0)
    one(eng.process("lan", tcp(H2, SRV, 41000, 80, "S"), 0.0), "wan")  # half-open
    one(eng.process("lan", tcp(H2, SRV, 40000, 80, "FA"), 0.0), "wan")  # closing
    states = sorted(r["state"] for r in eng.table(0.0))
    assert len(states) == 16 and states.count("ESTABLISHED") == 14
    for i in range(2):
        one(eng.process("lan", udp(H3, SRV, 7000 + i, 53), 1.0), "wan")
    assert eng.counters["early_drop"] == 2
    states = sorted(r["state"] for r in eng.table(1.0))
    assert states.count("ESTABLISHED") == 14 and states.count("UNREPLIED") == 2
    assert "SYN_SENT" not in states and "FIN_WAIT" not in states


def test_early_drop_looks_at_a_bounded_number_of_entries() -> None:
    """The wheel's walk stops after ``budget`` items and resumes where it stopped."""
    w = TimerWheel()
    items = [[i, False] for i in range(1000)]
    for it in items:
        w.add(it, float(it[0] // 10))
    seen: list[int] = []

    def pred(x: list[int]) -> bool:
        seen.append(x[0])
        return x[0] == 700

    assert w.take(lambda x: False, pred, 100) is None
    assert len(seen) <= 100
    found = None
    calls = 1
    while found is None and calls < 20:
        found = w.take(lambda x: False, pred, 100)
        calls += 1
    assert found is items[700] and 7 <= calls <= 9  # ~100 items a call, from where the last stopped
    assert len(w) == 999
    # dead items met on the way are cleared out
    for it in items[:500]:
        it[1] = True
    w.take(lambda x: x[1], lambda x: False, 2000)
    assert len(w) == 499


def test_the_wheel_holds_nothing_once_every_deadline_has_passed() -> None:
    """The walk's cursor (the keys of its pass) is let go when time has moved past all of them:
    the fuzzer found 766 stale keys kept after every session had expired."""
    w = TimerWheel()
    items = [[i, False] for i in range(300)]
    for it in items:
        w.add(it, float(it[0]))
    assert w.take(lambda x: x[1], lambda x: False, 50) is None  # a pass begun, not finished
    assert len(w.due(1000.0, lambda x: x[1], lambda x: float(x[0]))) == 300
    assert len(w) == 0 and w._keys == [] and (w._kj, w._ci) == (0, 0)
    w.add(items[0], 2000.0)  # and a later walk starts afresh
    assert w.take(lambda x: x[1], lambda x: True, 10) is items[0]


# ---------------------------------------------------------------------------------------------- half-open


PORTFW = """
[forwarding]
portfw = [{proto = "tcp", port = 80, to = "10.0.0.2", to_port = 80}]
"""


def test_syn_flood_to_a_forwarded_server_is_capped_per_server() -> None:
    eng = Engine(make_cfg(PORTFW))
    cap = eng.nat.limits.half_open
    assert cap == 1024
    tpl = bytearray(tcp(R2, WAN_IP, 1, 80, "S"))
    for i in range(5000):
        struct.pack_into("!I", tpl, 12, 0xC6336400 + 2 + i % 250)  # 198.51.100.x: spoofed
        struct.pack_into("!H", tpl, 20, 1024 + i)
        set_ip_checksum(tpl, 20)
        eng.process("wan", bytes(tpl), i * 0.001)
    c = eng.counters
    assert c["sessions"] == cap and c["drop_half_open_limit"] == 5000 - cap
    # a client's connection gets through once the half-open ones time out (transitory, 240 s)
    assert eng.process("wan", tcp(SRV, WAN_IP, 33000, 80, "S"), 10.0) == []
    eng.expire(260.0)
    p = one(eng.process("wan", tcp(SRV, WAN_IP, 33000, 80, "S"), 260.0), "lan")
    one(eng.process("lan", tcp(H2, SRV, 80, p[TCP].sport, "SA"), 260.0), "wan")
    assert eng.nat.half_open == {}  # answered: no longer half-open


def test_limits_are_reloadable_and_validated() -> None:
    from masqd.config import ConfigError

    eng = Engine(make_cfg())
    tpl, _ = sprayer(H2, SRV)
    for i in range(10):
        assert eng.process("lan", spray(tpl, 1000 + i), 0.0)
    eng.reload(make_cfg("[limits]\nhost_max_ports = 12\nport_quarantine = 30\n"))
    assert eng.host_limits()["limits"]["host_max_ports"] == 12
    got = sum(1 for i in range(10, 20) if eng.process("lan", spray(tpl, 1000 + i), 1.0))
    assert got == 2 and eng.counters["drop_host_ports_limit"] == 8
    for bad in ("host_max_ports = -1", "host_mapping_rate = -5", "port_quarantine = 99999", "top_offenders = 0",
                "host_mapping_burst = 0", "no_such_limit = 1"):
        with pytest.raises(ConfigError) as exc:
            make_cfg(f"[limits]\n{bad}\n")
        assert "limits." in str(exc.value)


def test_a_udp_session_an_inbound_packet_made_is_unreplied_until_the_lan_host_answers() -> None:
    """Early drop may take it meanwhile; once answered it is REPLIED and both directions take
    the fast path."""
    eng = Engine(make_cfg('[masquerade]\ninbound_filtering = "endpoint-independent"\n'))
    a = one(eng.process("lan", udp(H2, SRV, 4000, 53), 0.0), "wan")[UDP].sport
    one(eng.process("wan", udp(R2, WAN_IP, 7000, a), 0.1), "lan")  # R2 was never contacted: EIF lets it in
    row = next(r for r in eng.table(0.1) if r["remote"] == f"{R2}:7000")
    assert row["state"] == "UNREPLIED" and row["inbound"]
    s = next(x for x in eng.nat if x.rem_port == 7000)
    from masqd.engine.table import droppable

    assert droppable(s) and s.fw is not None and s.fw[1] is None  # (its answer must take the full path)
    one(eng.process("lan", udp(H2, R2, 4000, 7000), 0.2), "wan")
    assert next(r for r in eng.table(0.2) if r["remote"] == f"{R2}:7000")["state"] == "REPLIED"
    assert not droppable(s) and s.fw[1] is not None
    assert eng.fast.out(udp(H2, R2, 4000, 7000, b"x" * 32), 0.3) is not None  # the fast path takes it now
    assert eng.fast.inb(udp(R2, WAN_IP, 7000, a, b"x" * 32), 0.3) is not None
