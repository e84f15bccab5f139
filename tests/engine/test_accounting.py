"""Per-entry packet and byte counters (``masquerade.accounting``, like nf_conntrack_acct).

Off (the default): sessions are plain Sessions (no counter slots), rows carry no
counters, and the cached firewall decision is the shared one of the ruleset.
On: every forwarded packet of an entry is counted in its direction, whether the
full path or a fast path (TCP/UDP/ICMP, ESP) forwarded it, with and without
firewall rules; the counts survive in the destroy change.
"""

from __future__ import annotations

from typing import Any

from scapy.all import IP, TCP, UDP, raw
from scapy.layers.ipsec import ESP
from scapy.layers.isakmp import ISAKMP

from masqd.engine import Engine
from masqd.engine.nat import AcctSession, Session
from masqd.engine.table import Change
from tests.engine.conftest import H2, H3, SRV, WAN_IP, echo, make_cfg, tcp, udp

ON = "[masquerade]\naccounting = true\n"
RULES = ('[firewall]\nrules = """\nipchains -A forward -p udp -s 10.0.0.0/8 -j MASQ\n'
         'ipchains -A forward -j MASQ\nipchains -A output -p tcp -j ACCEPT\n"""\n')


def counts(row: dict[str, Any]) -> tuple[int, int, int, int]:
    return row["packets_out"], row["bytes_out"], row["packets_in"], row["bytes_in"]


def only(eng: Engine, proto: str, now: float = 0.0) -> dict[str, Any]:
    (row,) = [r for r in eng.table(now) if r["proto"] == proto]
    return row


def test_off_by_default_no_counter_slots_and_no_counters_in_rows() -> None:
    eng = Engine(make_cfg())
    o = eng.process("lan", udp(H2, SRV, 5000, 53), 1.0)
    wport = IP(o[0][1])[UDP].sport
    eng.process("wan", udp(SRV, WAN_IP, 53, wport), 1.0)
    (s,) = eng.sessions()
    assert type(s) is Session and not hasattr(s, "a_out")
    assert s.fw is eng.full.fw_trivial  # the shared decision: nothing per session
    row = only(eng, "udp")
    assert not {"packets_out", "bytes_out", "packets_in", "bytes_in"} & set(row)


def test_udp_and_tcp_counted_both_ways_on_the_full_and_the_fast_path() -> None:
    eng = Engine(make_cfg(ON))
    slow: list[str] = []
    full = eng._slow
    eng._slow = lambda iface, *a: (slow.append(iface), full(iface, *a))  # type: ignore[method-assign]
    sizes_out, sizes_in = [], []
    o = eng.process("lan", p := udp(H2, SRV, 5000, 53, b"q" * 10), 1.0)
    sizes_out.append(len(p))
    wport = IP(o[0][1])[UDP].sport
    for i in range(5):
        q = udp(SRV, WAN_IP, 53, wport, b"a" * (20 + i))
        assert eng.process("wan", q, 2.0 + i)
        sizes_in.append(len(q))
        p = udp(H2, SRV, 5000, 53, b"q" * (30 + i))
        assert eng.process("lan", p, 2.5 + i)
        sizes_out.append(len(p))
    (s,) = eng.sessions()
    assert isinstance(s, AcctSession)
    assert slow == ["lan", "wan"]  # the first packet each way; the other 9 took the fast path
    assert s.fw[1][-1] is s.a_out and s.fw[2][-1] is s.a_in
    assert counts(only(eng, "udp")) == (6, sum(sizes_out), 5, sum(sizes_in))
    # TCP: the handshake on the full path, data on the fast path
    o = eng.process("lan", tcp(H2, SRV, 40000, 80, "S"), 10.0)
    wport = IP(o[0][1])[TCP].sport
    eng.process("wan", tcp(SRV, WAN_IP, 80, wport, "SA"), 10.0)
    n_out = n_in = 0
    b_out = len(tcp(H2, SRV, 40000, 80, "S"))
    b_in = len(tcp(SRV, WAN_IP, 80, wport, "SA"))
    for i in range(10):
        p = tcp(H2, SRV, 40000, 80, "PA", payload=b"d" * i)
        q = tcp(SRV, WAN_IP, 80, wport, "A")
        assert eng.process("lan", p, 11.0) and eng.process("wan", q, 11.0)
        b_out += len(p)
        b_in += len(q)
        n_out += 1
        n_in += 1
    assert counts(only(eng, "tcp", 11.0)) == (1 + n_out, b_out, 1 + n_in, b_in)


def test_pings_counted_and_rules_still_counted_with_a_ruleset() -> None:
    eng = Engine(make_cfg(ON + RULES))
    for seq in range(4):
        o = eng.process("lan", echo(H2, SRV, ident=77, seq=seq), 1.0 + seq)
        ident = IP(o[0][1])["ICMP"].id
        assert eng.process("wan", echo(SRV, WAN_IP, ident=ident, seq=seq, reply=True), 1.0 + seq)
    n = len(echo(H2, SRV, ident=77))
    assert counts(only(eng, "icmp", 5.0)) == (4, 4 * n, 4, 4 * n)
    # the forward rule's hits are the packets it matched, not more (the counter is no rule)
    fwd = [r for r in eng.rules.chains["forward"].rules]
    assert fwd[1].pkts == 4  # the catch-all MASQ rule: the 4 requests


def test_counts_survive_in_the_destroy_change() -> None:
    eng = Engine(make_cfg(ON))
    seen: list[tuple[str, str, dict[str, Any] | None]] = []

    def on(ch: Change) -> None:
        seen.append((ch.kind, ch.reason, eng.entry_row(ch.entry, 0.0)))

    eng.nat.subscribe(on)
    o = eng.process("lan", udp(H2, SRV, 5000, 53), 1.0)
    wport = IP(o[0][1])[UDP].sport
    for _ in range(3):
        eng.process("wan", udp(SRV, WAN_IP, 53, wport), 1.0)
    eng.flush()
    kind, reason, row = seen[-1]
    assert (kind, reason) == ("destroy", "flush") and row is not None
    assert counts(row)[0] == 1 and counts(row)[2] == 3


def test_switched_on_by_reload_new_sessions_are_counted_old_ones_are_not() -> None:
    eng = Engine(make_cfg())
    eng.process("lan", udp(H2, SRV, 5000, 53), 1.0)
    eng.reload(make_cfg(ON))
    eng.process("lan", udp(H3, SRV, 5000, 53), 2.0)
    eng.process("lan", udp(H2, SRV, 5000, 53), 2.0)
    rows = {r["lan"]: r for r in eng.table(2.0)}
    assert "packets_out" not in rows[f"{H2}:5000"]
    assert counts(rows[f"{H3}:5000"])[0] == 1
    # and off again: the counted session stops counting, its counts stay readable
    eng.reload(make_cfg())
    eng.process("lan", udp(H3, SRV, 5000, 53), 3.0)
    assert counts({r["lan"]: r for r in eng.table(3.0)}[f"{H3}:5000"])[0] == 1


def test_esp_pairs_and_isakmp_entries_are_counted() -> None:
    eng = Engine(make_cfg(ON))

    def esp(s: str, d: str, spi: int, n: int = 48) -> bytes:
        return raw(IP(src=s, dst=d) / ESP(spi=spi, seq=1, data=b"\xa5" * n))

    def ike(s: str, d: str, r: bytes) -> bytes:
        return raw(IP(src=s, dst=d) / UDP(sport=500, dport=500)
                   / ISAKMP(init_cookie=b"I" * 8, resp_cookie=r, exch_type=2, next_payload=0))

    i1, i2 = ike(H2, SRV, b"\0" * 8), ike(SRV, WAN_IP, b"R" * 8)
    assert eng.process("lan", i1, 1.0) and eng.process("wan", i2, 1.0)
    row = only(eng, "isakmp", 1.0)
    assert counts(row) == (1, len(i1), 1, len(i2))
    out_b = in_b = 0
    for i in range(6):  # the first two go through the full path, the rest through ESP's fast path
        p, q = esp(H2, SRV, 0x1001, 48 + i), esp(SRV, WAN_IP, 0x2001, 40 + i)
        assert eng.process("lan", p, 2.0) and eng.process("wan", q, 2.0)
        out_b += len(p)
        in_b += len(q)
    assert counts(only(eng, "esp", 2.0)) == (6, out_b, 6, in_b)
