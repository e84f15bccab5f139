"""Rule scripts of the ipchains era through the engine (issue 23): TOS rewriting, ipfwadm -k,
-y/-k decisions not reused for later packets of a flow, masquerade timeouts from rule lines,
loopback rules counted at zero. Rule lines written for these tests."""

from __future__ import annotations

from scapy.all import IP, TCP, raw

from masqd.engine import Engine
from tests.engine.conftest import H2, H3, SRV, WAN_IP, checksums_ok, make_cfg, one, tcp, udp


def engine(rules: str, extra: str = "") -> Engine:
    return Engine(make_cfg(f'[firewall]\nrules = """\n{rules}"""\n{extra}'))


def with_tos(pkt: bytes, tos: int) -> bytes:
    p = IP(pkt)
    p.tos = tos
    del p.chksum
    return raw(p)


# ------------------------------------------------------------------ TOS


TOS_RULES = """\
ipchains -A forward -p tcp -d 0/0 telnet -t 0x01 0x10 -j MASQ
ipchains -A forward -p tcp -s 0/0 ftp-data -t 0x01 0x08 -j MASQ
ipchains -A output -p udp -d 0/0 domain -t 0xff 0x04
"""


def test_tos_is_rewritten_on_every_packet_of_a_matching_flow_with_valid_checksums() -> None:
    eng = engine(TOS_RULES)
    s = one(eng.process("lan", with_tos(tcp(H2, SRV, 40000, 23, "S", seq=1), 0xE8), 0.0), "wan")
    assert s.tos == 0x10 and checksums_ok(bytes(s))  # precedence and old TOS bits cleared by AND 0x01
    port = s[TCP].sport
    one(eng.process("wan", tcp(SRV, WAN_IP, 23, port, "SA", seq=9, ack=2), 0.1), "lan")
    for i in range(4):  # established: the rewrite is per packet, so the flow stays on the full path
        seg = tcp(H2, SRV, 40000, 23, "PA", b"ls\n", seq=2 + i)
        assert eng.fast.out(seg, 0.2 + i) is None  # the fast path declines it
        d = one(eng.process("lan", seg, 0.2 + i), "wan")
        assert d.tos == 0x10 and checksums_ok(bytes(d)) and d[TCP].sport == port
    assert eng.counters["tos_rewritten"] == 5
    rule = eng.rules.chains["forward"].rules[0]
    assert rule.pkts == 5


def test_tos_rules_compose_and_leave_other_traffic_alone() -> None:
    eng = engine(TOS_RULES)
    # ftp-data from the LAN: Maximize-Throughput, then the output chain's XOR 0x04 is not for TCP
    d = one(eng.process("lan", tcp(H2, SRV, 20, 40001, "S"), 0.0), "wan")
    assert d.tos == 0x08 and checksums_ok(bytes(d))
    # DNS: forward policy (no TOS), then output's count-only rule flips Maximize-Reliability
    q = one(eng.process("lan", with_tos(udp(H2, SRV, 5353, 53, b"q"), 0x10), 0.0), "wan")
    assert q.tos == 0x14 and checksums_ok(bytes(q))
    # anything else keeps its TOS byte, and its flow takes the fast path as usual
    w = one(eng.process("lan", with_tos(tcp(H3, SRV, 40002, 80, "S", seq=1), 0x10), 0.0), "wan")
    assert w.tos == 0x10
    one(eng.process("wan", tcp(SRV, WAN_IP, 80, w[TCP].sport, "SA", seq=5, ack=2), 0.1), "lan")
    one(eng.process("lan", with_tos(tcp(H3, SRV, 40002, 80, "A", seq=2, ack=6), 0x10), 0.2), "wan")
    fast = eng.fast.out(with_tos(tcp(H3, SRV, 40002, 80, "PA", b"x", seq=2, ack=6), 0x10), 0.3)
    assert fast is not None and one(fast, "wan").tos == 0x10  # the fast path takes it
    assert eng.counters["tos_rewritten"] == 2


def test_tos_rewrite_does_not_happen_on_a_denied_packet() -> None:
    eng = engine("ipchains -A forward -p tcp -d 0/0 telnet -t 0x01 0x10 -j DENY\n")
    assert eng.process("lan", tcp(H2, SRV, 40000, 23, "S"), 0.0) == []
    assert eng.counters.get("tos_rewritten", 0) == 0 and eng.counters["drop_forward_deny"] == 1


# ------------------------------------------------------------------ -k and -y through the engine


def test_ipfwadm_k_lets_replies_in_and_keeps_new_connections_out() -> None:
    eng = engine(
        "ipfwadm -I -a accept -P tcp -k -W eth1\n"
        "ipfwadm -I -a deny -P tcp -W eth1\n"
        "ipfwadm -F -a accept -m -S 10.0.0.0/8 -D 0/0\n"
    )
    s = one(eng.process("lan", tcp(H2, SRV, 40000, 80, "S", seq=1), 0.0), "wan")
    port = s[TCP].sport
    sa = one(eng.process("wan", tcp(SRV, WAN_IP, 80, port, "SA", seq=9, ack=2), 0.1), "lan")
    assert sa.dst == H2
    for i in range(3):
        one(eng.process("wan", tcp(SRV, WAN_IP, 80, port, "A", b"data", seq=10 + i, ack=2), 0.2 + i), "lan")
    accept_k, deny = eng.rules.chains["input"].rules
    assert accept_k.pkts == 4 and deny.pkts == 0
    # a connection attempt from outside has no ACK: denied by the second rule
    assert eng.process("wan", tcp(SRV, WAN_IP, 4444, 22, "S"), 1.0) == []
    assert deny.pkts == 1 and eng.counters["drop_input_deny"] == 1


def test_a_syn_decision_is_not_reused_for_the_rest_of_the_flow() -> None:
    """-y: the SYN may pass where later segments may not; ipchains decided every packet anew."""
    eng = engine("ipchains -A forward -p tcp -y -j MASQ\nipchains -A forward -p tcp -j DENY\n")
    s = one(eng.process("lan", tcp(H2, SRV, 40000, 80, "S", seq=1), 0.0), "wan")
    one(eng.process("wan", tcp(SRV, WAN_IP, 80, s[TCP].sport, "SA", seq=9, ack=2), 0.1), "lan")
    for i in range(3):
        assert eng.process("lan", tcp(H2, SRV, 40000, 80, "A", seq=2, ack=10 + i), 0.2 + i) == []
    assert eng.counters["drop_forward_deny"] == 3


# ------------------------------------------------------------------ masquerade timeouts


def test_ipchains_m_s_sets_the_running_engines_udp_and_tcp_timeouts() -> None:
    eng = engine("ipchains -M -S 600 30 45\n")
    assert (eng.tmo.tcp_established, eng.tmo.tcp_fin, eng.tmo.udp) == (600, 30, 45)
    one(eng.process("lan", udp(H2, SRV, 4000, 53), 0.0), "wan")
    eng.expire(44.0)
    assert eng.counters["sessions"] == 1
    eng.expire(46.5)
    assert eng.counters["sessions"] == 0


def test_ipfwadm_m_s_zero_keeps_and_a_reload_applies_new_values() -> None:
    eng = engine("ipfwadm -M -s 0 0 20\n")
    assert eng.tmo.udp == 20 and eng.tmo.tcp_established == 7440.0  # 0: the configured value stays
    eng.reload(make_cfg('[firewall]\nrules = "ipfwadm -M -s 100 0 0"\n'))
    assert eng.tmo.tcp_established == 100 and eng.tmo.udp == 300.0
    # a connection made after the reload: established, it lives 100 s after its last packet
    s = one(eng.process("lan", tcp(H2, SRV, 40000, 80, "S", seq=1), 0.0), "wan")
    one(eng.process("wan", tcp(SRV, WAN_IP, 80, s[TCP].sport, "SA", seq=9, ack=2), 0.1), "lan")
    one(eng.process("lan", tcp(H2, SRV, 40000, 80, "A", seq=2, ack=10), 1.0), "wan")
    row = eng.table(1.0)[0]
    assert row["state"] == "ESTABLISHED" and row["expires_in"] == 100
    eng.expire(241.5)  # the wheel looks at it when its handshake timer runs out: expired by then
    assert eng.counters["sessions"] == 0


# ------------------------------------------------------------------ loopback


def test_loopback_rules_never_match_real_traffic_and_count_zero() -> None:
    eng = engine(
        "ipchains -A input -i lo -j DENY\n"
        "ipchains -A input -p udp -i ! lo\n"
        "ipchains -A forward -i lo -j DENY\n"
    )
    one(eng.process("lan", udp(H2, SRV, 4000, 53), 0.0), "wan")
    p = one(eng.process("lan", udp(H2, SRV, 4001, 53), 0.0), "wan")
    one(eng.process("wan", udp(SRV, WAN_IP, 53, p.sport), 0.1), "lan")
    lo_in, not_lo = eng.rules.chains["input"].rules
    assert (lo_in.pkts, not_lo.pkts, eng.rules.chains["forward"].rules[0].pkts) == (0, 3, 0)
    # a loopback source on a real side never reaches the chains: masqd drops it as a martian
    assert eng.process("wan", udp("127.0.0.1", WAN_IP, 53, 4000), 0.2) == []
    assert eng.counters["drop_martian_source"] == 1
