"""IPsec masquerade scenarios (SPEC section 3), written as the HOWTO's situations.

Fake clock throughout: a 30-minute table lifetime is a number. Packets are
crafted with scapy (ESP, ISAKMP, IKEv2) and pushed through ``Engine.process``
both ways, as the data plane would.
"""

from __future__ import annotations

from typing import Any

import pytest
from scapy.all import IP, UDP, raw
from scapy.contrib.ikev2 import IKEv2
from scapy.layers.inet import ICMP
from scapy.layers.ipsec import AH, ESP
from scapy.layers.isakmp import ISAKMP

from masqd.engine import Engine
from tests.engine.conftest import H2, H3, R2, SRV, WAN_IP, checksums_ok, make_cfg

H4, H5 = "10.0.0.4", "10.0.0.5"


def cfg(**ipsec: Any) -> Any:
    lines = "\n".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in ipsec.items())
    return make_cfg("[ipsec]\n" + lines + "\n" if lines else "")


def esp(src: str, dst: str, spi: int, seq: int = 1, ttl: int = 64) -> bytes:
    return raw(IP(src=src, dst=dst, ttl=ttl) / ESP(spi=spi, seq=seq, data=b"\xa5" * 48))


def ike1(src: str, dst: str, icookie: bytes, rcookie: bytes = b"\0" * 8, exch: int = 2) -> bytes:
    return raw(IP(src=src, dst=dst) / UDP(sport=500, dport=500)
               / ISAKMP(init_cookie=icookie, resp_cookie=rcookie, exch_type=exch, next_payload=0))


def ike2(src: str, dst: str, ispi: bytes, rspi: bytes = b"\0" * 8, exch: int = 34, flags: int = 0x08) -> bytes:
    return raw(IP(src=src, dst=dst) / UDP(sport=500, dport=500)
               / IKEv2(init_SPI=ispi, resp_SPI=rspi, exch_type=exch, flags=flags, next_payload=0))


class Net:
    """The firewall between LAN hosts and remotes, with a clock."""

    def __init__(self, **ipsec: Any) -> None:
        self.eng = Engine(cfg(**ipsec))
        self.now = 1000.0

    def tick(self, dt: float) -> None:
        self.now += dt
        self.eng.expire(self.now)

    def out(self, pkt: bytes) -> list[tuple[str, bytes]]:
        return self.eng.process("lan", pkt, self.now)

    def inn(self, pkt: bytes) -> list[tuple[str, bytes]]:
        return self.eng.process("wan", pkt, self.now)

    def esp_out(self, lan: str, spi: int, rem: str = SRV) -> IP | None:
        """ESP from a LAN host; the packet seen on the WAN, or None when dropped."""
        o = self.out(esp(lan, rem, spi))
        if not o:
            return None
        assert len(o) == 1 and o[0][0] == "wan"
        p = IP(o[0][1])
        assert p.src == WAN_IP and p.dst == rem and p[ESP].spi == spi and p.ttl == 63
        assert checksums_ok(o[0][1])
        return p

    def esp_in(self, spi: int, rem: str = SRV) -> list[str]:
        """ESP from a remote; the LAN hosts it was delivered to."""
        o = self.inn(esp(rem, WAN_IP, spi))
        hosts = []
        for iface, b in o:
            assert iface == "lan"
            p = IP(b)
            assert p.src == rem and p[ESP].spi == spi and p.ttl == 63 and checksums_ok(b)
            hosts.append(p.dst)
        return hosts

    def c(self, name: str) -> int:
        return self.eng.counters.get(name, 0)

    def rows(self, proto: str = "esp") -> list[dict[str, Any]]:
        return [r for r in self.eng.table(self.now) if r["proto"] == proto]

    def events(self) -> list[tuple[str, str, dict[str, Any]]]:
        return self.eng.drain_events()

    def handshake(self, lan: str, icookie: bytes, rcookie: bytes, rem: str = SRV) -> None:
        """An IKEv1 main-mode start: the LAN host's initiation and the remote's reply."""
        o = self.out(ike1(lan, rem, icookie))
        assert len(o) == 1 and IP(o[0][1]).src == WAN_IP and IP(o[0][1])[UDP].sport == 500
        i = self.inn(ike1(rem, WAN_IP, icookie, rcookie))
        assert len(i) == 1 and IP(i[0][1]).dst == lan

    def pair(self, lan: str, spi_out: int, spi_in: int, rem: str = SRV) -> None:
        assert self.esp_out(lan, spi_out, rem) is not None
        assert self.esp_in(spi_in, rem) == [lan]


# ----------------------------------------------------------------- one host
def test_one_host_ike_then_esp_both_ways() -> None:
    n = Net()
    ic, rc = b"\x11" * 8, b"\x22" * 8
    o = n.out(ike1(H2, SRV, ic))
    p = IP(o[0][1])
    assert p.src == WAN_IP and p[UDP].sport == 500 and p[UDP].dport == 500 and checksums_ok(o[0][1])
    assert n.rows("isakmp")[0]["state"] == "INIT"
    i = n.inn(ike1(SRV, WAN_IP, ic, rc))
    q = IP(i[0][1])
    assert q.dst == H2 and q[UDP].dport == 500 and checksums_ok(i[0][1])
    row = n.rows("isakmp")[0]
    assert row["state"] == "ESTABLISHED" and row["icookie"] == ic.hex() and row["rcookie"] == rc.hex()
    assert row["expires_in"] == 1800.0 and row["lan"] == f"{H2}:500"
    # ESP: initial packet -> pending, reply -> paired
    n.tick(1)
    assert n.esp_out(H2, 0x1000) is not None
    assert n.rows()[0]["state"] == "PENDING" and n.c("esp_pending") == 1
    assert n.esp_in(0x2000) == [H2]
    row = n.rows()[0]
    assert row["state"] == "ESTABLISHED" and row["spi_out"] == "0x00001000" and row["spi_in"] == "0x00002000"
    assert row["lan"] == H2 and row["wan"] == WAN_IP and row["remote"] == SRV and row["expires_in"] == 1800.0
    assert n.c("esp_learned") == 1
    names = [e[1] for e in n.events()]
    assert "isakmp_session" in names and "isakmp_reply" in names and "esp_pending" in names
    assert "esp_paired" in names
    for _ in range(20):
        assert n.esp_out(H2, 0x1000) is not None
        assert n.esp_in(0x2000) == [H2]
        n.tick(60)
    assert n.c("tx_wan_esp_packets") == 21 and n.c("tx_lan_esp_packets") == 21
    assert n.eng.helpers[0].size() == 2


def test_established_esp_takes_the_fast_path() -> None:
    n = Net()
    n.pair(H2, 0x1000, 0x2000)
    n.esp_out(H2, 0x1000)  # full path once more in each direction caches the firewall decision
    n.esp_in(0x2000)
    slow_calls = []
    orig = n.eng._slow
    n.eng._slow = lambda *a: (slow_calls.append(a), orig(*a))[1]  # type: ignore[method-assign]
    for _ in range(5):
        assert n.esp_out(H2, 0x1000) is not None
        assert n.esp_in(0x2000) == [H2]
    assert slow_calls == []


def test_fast_path_honours_firewall_rules_and_counts_them() -> None:
    rules = (
        '[firewall]\nrules = """\nipchains -P forward DENY\n'
        'ipchains -A forward -p 50 -s 10.0.0.2/32 -d 0/0 -j MASQ -i eth1\n"""\n'
    )
    eng = Engine(make_cfg(rules))
    now = 5.0
    for k in range(4):
        assert eng.process("lan", esp(H2, SRV, 0x1000, k), now)
        if k == 0:
            assert eng.process("wan", esp(SRV, WAN_IP, 0x2000, k), now)
    assert eng.process("lan", esp(H3, SRV, 0x3000), now) == []  # not allowed by the rules
    assert eng.counters.get("drop_forward_deny") == 1
    rule = eng.rules.chains["forward"].rules[0]
    assert rule.pkts == 4  # the first packet by evaluation, the next three from the cached decision
    slow_calls = []
    orig = eng._slow
    eng._slow = lambda *a: (slow_calls.append(a), orig(*a))[1]  # type: ignore[method-assign]
    assert eng.process("lan", esp(H2, SRV, 0x1000, 9), now)
    assert slow_calls == [] and rule.pkts == 5
    # a reload with rules that no longer allow it: the cached decision is not reused
    eng.reload(make_cfg('[firewall]\nrules = "ipchains -P forward DENY"\n'))
    assert eng.process("lan", esp(H2, SRV, 0x1000, 10), now) == []
    assert eng.counters.get("drop_forward_deny") == 2


# ------------------------------------------------ two hosts, same gateway
def test_two_hosts_start_at_once_reply_in_time() -> None:
    n = Net(parallel_sessions=True)
    assert n.esp_out(H2, 0x1000) is not None  # H2 pending
    assert n.esp_out(H3, 0x3000) is None  # "temporarily blocked"
    assert n.c("esp_blocked") == 1 and n.c("drop_esp_blocked") == 1
    ev = [e for e in n.events() if e[1] == "esp_blocked"]
    assert ev and ev[0][0] == "warning" and "temporarily blocked" in ev[0][2]["reason"]
    assert n.esp_in(0x2000) == [H2]  # the reply: R is open again
    assert n.esp_out(H3, 0x3000) is not None
    assert n.esp_in(0x4000) == [H3]
    assert {(r["lan"], r["spi_in"]) for r in n.rows()} == {(H2, "0x00002000"), (H3, "0x00004000")}
    assert n.esp_in(0x2000) == [H2] and n.esp_in(0x4000) == [H3]


def test_two_hosts_start_at_once_slow_remote_round_robin() -> None:
    """The remote is slow: H2's pending entry is contended, retried 5 times, squelched; H3 gets its turn."""
    n = Net(parallel_sessions=True)
    assert n.esp_out(H2, 0x1000) is not None
    for _ in range(3):  # H2 alone: it may wait as long as it needs, no retries counted
        n.tick(5)
        assert n.esp_out(H2, 0x1000) is not None
    assert n.c("esp_retries") == 0
    assert n.esp_out(H3, 0x3000) is None  # contention starts the count
    for k in range(5):
        n.tick(1)
        assert n.esp_out(H2, 0x1000) is not None, k
        assert n.esp_out(H3, 0x3000) is None
    assert n.c("esp_retries") == 5
    n.tick(1)
    assert n.esp_out(H2, 0x1000) is None  # sixth: squelched
    assert n.c("esp_squelched") == 1
    assert n.rows()[0]["state"] == "SQUELCHED"
    assert n.esp_out(H3, 0x3000) is not None  # H3's turn
    assert n.esp_out(H2, 0x1000) is None  # still squelched
    assert n.esp_in(0x4000) == [H3]  # the remote answers H3
    n.tick(31)  # squelch over: H2's next packet is an initial packet again
    assert n.esp_out(H2, 0x1000) is not None
    assert n.esp_in(0x2000) == [H2]
    assert sorted((r["lan"], r["state"]) for r in n.rows()) == [(H2, "ESTABLISHED"), (H3, "ESTABLISHED")]


def test_pending_entry_expires_after_its_lifetime_whatever_its_traffic() -> None:
    n = Net()
    assert n.esp_out(H2, 0x1000) is not None
    for _ in range(11):
        n.tick(10)
        n.esp_out(H2, 0x1000)
    n.tick(11)  # 121 s after creation
    assert n.rows() == [] and n.c("esp_expired") == 1


# ------------------------------------------------------------------ re-keys
def test_same_host_rekeys_new_pair_replaces_the_old() -> None:
    n = Net()
    n.pair(H2, 0x1000, 0x2000)
    n.tick(1700)  # re-key interval
    n.pair(H2, 0x1001, 0x2001)
    states = {r["spi_out"]: r["state"] for r in n.rows()}
    assert states == {"0x00001000": "REPLACED", "0x00001001": "ESTABLISHED"}
    assert n.esp_in(0x2000) == [H2]  # packets in flight on the old SA still arrive
    n.tick(121)  # the old SA is no longer used: gone after the grace period
    assert [r["spi_out"] for r in n.rows()] == ["0x00001001"]
    assert n.esp_in(0x2001) == [H2]


def test_remote_initiated_rekey_reaches_the_right_host_by_cookie_pair() -> None:
    n = Net(parallel_sessions=True)
    n.handshake(H2, b"\x02" * 8, b"\x20" * 8)
    n.handshake(H3, b"\x03" * 8, b"\x30" * 8)
    n.tick(10)
    n.out(ike1(H2, SRV, b"\x02" * 8, b"\x20" * 8))  # H2 is now the most recent
    # quick-mode re-key started by the remote on H3's ISAKMP SA: the pair routes it
    o = n.inn(ike1(SRV, WAN_IP, b"\x03" * 8, b"\x30" * 8, exch=32))
    assert [IP(b).dst for _, b in o] == [H3]
    o = n.inn(ike1(SRV, WAN_IP, b"\x02" * 8, b"\x20" * 8, exch=32))
    assert [IP(b).dst for _, b in o] == [H2]
    # a new phase 1 started by the remote (its own initiator cookie): the most recent ISAKMP host
    o = n.inn(ike1(SRV, WAN_IP, b"\x99" * 8))
    assert [IP(b).dst for _, b in o] == [H2] and n.c("isakmp_remote_initiated") == 1
    assert len(n.rows("isakmp")) == 2  # no state from inbound alone
    n.out(ike1(H2, SRV, b"\x99" * 8, b"\x29" * 8))  # H2 answers: now known by the pair
    assert len(n.rows("isakmp")) == 3
    n.tick(1)
    n.out(ike1(H3, SRV, b"\x03" * 8, b"\x30" * 8))  # H3 most recent now; the pair still wins
    o = n.inn(ike1(SRV, WAN_IP, b"\x99" * 8, b"\x29" * 8, exch=32))
    assert [IP(b).dst for _, b in o] == [H2]


def test_ikev2_create_child_sa_routes_by_the_ike_sa_spis() -> None:
    n = Net(parallel_sessions=True)
    for lan, i, r in ((H2, b"\xa2" * 8, b"\xb2" * 8), (H3, b"\xa3" * 8, b"\xb3" * 8)):
        o = n.out(ike2(lan, SRV, i))
        assert IP(o[0][1])[UDP].sport == 500
        o = n.inn(ike2(SRV, WAN_IP, i, r, flags=0x20))
        assert IP(o[0][1]).dst == lan
        n.out(ike2(lan, SRV, i, r, exch=35))
    assert {r["version"] for r in n.rows("isakmp")} == {2}
    # the remote re-keys H2's child SA (CREATE_CHILD_SA, same IKE SA SPIs, remote is the exchange initiator)
    o = n.inn(ike2(SRV, WAN_IP, b"\xa2" * 8, b"\xb2" * 8, exch=36, flags=0x00))
    assert [IP(b).dst for _, b in o] == [H2]
    o = n.inn(ike2(SRV, WAN_IP, b"\xa3" * 8, b"\xb3" * 8, exch=37, flags=0x00))
    assert [IP(b).dst for _, b in o] == [H3]


def test_ikev2_cookie_notify_with_zero_responder_spi_reaches_the_initiator() -> None:
    n = Net()
    n.out(ike2(H3, SRV, b"\xc3" * 8))
    o = n.inn(ike2(SRV, WAN_IP, b"\xc3" * 8, b"\0" * 8, flags=0x20))
    assert [IP(b).dst for _, b in o] == [H3]


def test_isakmp_entry_outlives_the_rekey_interval() -> None:
    n = Net()
    n.handshake(H2, b"\x02" * 8, b"\x20" * 8)
    n.tick(1500)
    o = n.inn(ike1(SRV, WAN_IP, b"\x02" * 8, b"\x20" * 8, exch=32))
    assert [IP(b).dst for _, b in o] == [H2]
    n.tick(1801)
    assert n.rows("isakmp") == [] and n.c("isakmp_expired") == 1


# ---------------------------------------------- HOWTO's mis-associations
def test_slow_reply_after_pending_expired_is_misassociated_then_recovers() -> None:
    """HOWTO: a reply slower than the INIT lifetime, while another host is pending, goes to that host."""
    n = Net(parallel_sessions=True)
    n.handshake(H2, b"\x02" * 8, b"\x20" * 8)
    n.handshake(H3, b"\x03" * 8, b"\x30" * 8)
    assert n.esp_out(H2, 0x1000) is not None
    n.tick(121)
    assert n.rows() == [] and n.c("esp_expired") == 1
    assert n.esp_out(H3, 0x3000) is not None  # H3's turn
    assert n.esp_in(0x2000) == [H3]  # H2's late reply: mis-associated (documented)
    assert n.rows()[0]["lan"] == H3 and n.rows()[0]["spi_in"] == "0x00002000"
    # H3's real reply now has nowhere to go but the recent re-keyers (no entry is created)
    assert sorted(n.esp_in(0x4000)) == sorted([H2, H3])
    assert len(n.rows()) == 1
    # recovery: both re-key with fresh SPIs; serialisation pairs them correctly
    n.tick(5)
    assert n.esp_out(H3, 0x3001) is not None
    assert n.esp_in(0x4001) == [H3]
    assert n.esp_out(H2, 0x1001) is not None
    assert n.esp_in(0x2001) == [H2]
    n.tick(121)  # H3's wrong pair was replaced by its new one and has gone
    assert sorted((r["lan"], r["spi_in"]) for r in n.rows()) == [(H2, "0x00002001"), (H3, "0x00004001")]


def test_idle_session_outliving_its_entry_relearns_when_the_host_speaks_first() -> None:
    n = Net()
    n.handshake(H2, b"\x02" * 8, b"\x20" * 8)
    n.pair(H2, 0x1000, 0x2000)
    n.tick(1801)
    assert n.rows() == [] and n.rows("isakmp") == []
    assert n.esp_in(0x2000) == []  # nothing knows the remote: not delivered
    assert n.esp_out(H2, 0x1000) is not None  # an initial packet again
    assert n.esp_in(0x2000) == [H2]


def test_idle_session_inbound_while_another_host_is_pending_is_misassociated() -> None:
    n = Net(parallel_sessions=True)
    n.pair(H2, 0x1000, 0x2000)
    n.tick(1801)
    assert n.esp_out(H3, 0x3000) is not None
    assert n.esp_in(0x2000) == [H3]  # documented: raise table_lifetime above the re-key interval


def test_unknown_inbound_spi_goes_to_the_most_recent_rekeyers_only() -> None:
    n = Net(parallel_sessions=True)
    n.handshake(H2, b"\x02" * 8, b"\x20" * 8)
    n.tick(1600)  # H2's ISAKMP entry now has 200 s left: not a recent re-keyer
    n.handshake(H3, b"\x03" * 8, b"\x30" * 8)
    n.tick(10)
    n.handshake(H4, b"\x04" * 8, b"\x40" * 8)
    n.tick(10)
    n.pair(H4, 0x4000, 0x4100)
    assert n.esp_in(0x9999) == [H4, H3]  # newest first, H2 left out, no entry created
    assert len(n.rows()) == 1 and n.c("esp_guessed") == 1 and n.c("esp_guessed_copies") == 2
    n2 = Net(parallel_sessions=True, guess_max_hosts=1)
    n2.handshake(H3, b"\x03" * 8, b"\x30" * 8)
    n2.tick(1)
    n2.handshake(H4, b"\x04" * 8, b"\x40" * 8)
    assert n2.esp_in(0x9999) == [H4]


# --------------------------------------------------------- parallel sessions
def test_parallel_sessions_off_second_host_refused_while_first_entry_lives() -> None:
    n = Net()
    n.pair(H2, 0x1000, 0x2000)
    n.events()
    assert n.esp_out(H3, 0x3000) is None
    assert n.c("esp_parallel_refused") == 1 and n.c("drop_esp_parallel_sessions_off") == 1
    ev = [e for e in n.events() if e[1] == "esp_parallel_refused"]
    assert ev[0][0] == "warning" and "parallel_sessions is off" in ev[0][2]["reason"]
    assert ev[0][2]["holder"] == H2
    assert n.esp_out(H3, 0x3000, rem=R2) is not None  # another remote is fine
    n.tick(1801)
    assert n.esp_out(H3, 0x3000) is not None  # H2's entry has gone


def test_parallel_sessions_on_second_host_allowed() -> None:
    n = Net(parallel_sessions=True)
    n.pair(H2, 0x1000, 0x2000)
    n.pair(H3, 0x3000, 0x4000)
    assert n.c("esp_parallel_refused") == 0


# --------------------------------------------------------------- refusals
def test_spi_zero_and_reserved_spis_dropped_both_ways() -> None:
    n = Net()
    assert n.esp_out(H2, 0) is None and n.c("drop_esp_spi_zero") == 1
    assert n.esp_out(H2, 200) is None and n.c("drop_esp_reserved_spi") == 1
    n.pair(H2, 0x1000, 0x2000)
    assert n.esp_in(0) == [] and n.c("drop_esp_spi_zero") == 2
    assert n.esp_in(1) == [] and n.c("drop_esp_reserved_spi") == 2
    assert len(n.rows()) == 1


def test_ah_is_refused_with_the_reason() -> None:
    n = Net()
    pkt = raw(IP(src=H2, dst=SRV) / AH(spi=0x1000, seq=1, icv=b"\0" * 12) / (b"x" * 20))
    assert n.out(pkt) == []
    assert n.c("ah_refused") == 1 and n.c("drop_ah_not_masqueradable") == 1
    ev = [e for e in n.events() if e[1] == "ah_refused"]
    assert ev[0][0] == "warning" and "integrity" in ev[0][2]["reason"] and "addresses" in ev[0][2]["reason"]
    assert n.inn(raw(IP(src=SRV, dst=WAN_IP) / AH(spi=0x2000, seq=1, icv=b"\0" * 12) / (b"x" * 20))) == []
    assert n.c("ah_refused") == 2


def test_isakmp_cookie_collision_blocked_until_the_reply() -> None:
    n = Net(parallel_sessions=True)
    c = b"\x77" * 8
    assert n.out(ike1(H2, SRV, c))
    assert n.out(ike1(H3, SRV, c)) == []
    assert n.c("isakmp_collisions") == 1 and n.c("drop_isakmp_collision") == 1
    i = n.inn(ike1(SRV, WAN_IP, c, b"\x21" * 8))
    assert IP(i[0][1]).dst == H2
    assert n.out(ike1(H3, SRV, c))  # H2's exchange is now told apart by its responder cookie
    i = n.inn(ike1(SRV, WAN_IP, c, b"\x31" * 8))
    assert IP(i[0][1]).dst == H3
    i = n.inn(ike1(SRV, WAN_IP, c, b"\x21" * 8))
    assert IP(i[0][1]).dst == H2
    assert n.out(ike1(H3, SRV, c, b"\x21" * 8)) == []  # H2's pair from H3: refused
    assert n.c("isakmp_collisions") == 2


def test_isakmp_to_another_remote_or_another_cookie_is_not_a_collision() -> None:
    n = Net(parallel_sessions=True)
    assert n.out(ike1(H2, SRV, b"\x77" * 8))
    assert n.out(ike1(H3, SRV, b"\x78" * 8))
    assert n.out(ike1(H3, R2, b"\x77" * 8))
    assert n.c("isakmp_collisions") == 0


def test_zero_initiator_cookie_refused() -> None:
    n = Net()
    assert n.out(ike1(H2, SRV, b"\0" * 8)) == []
    assert n.inn(ike1(SRV, WAN_IP, b"\0" * 8, b"\x01" * 8)) == []
    assert n.c("drop_isakmp_zero_cookie") == 2


@pytest.mark.parametrize("payload,reason", [
    (b"", "isakmp_truncated"),
    (b"\x11" * 27, "isakmp_truncated"),
    (b"\x11" * 16 + b"\x00\x30\x02\x00" + b"\0" * 4 + (28).to_bytes(4, "big"), "isakmp_bad_version"),
    (b"\x11" * 16 + b"\x00\x10\x02\x00" + b"\0" * 4 + (500).to_bytes(4, "big"), "isakmp_bad_length"),
    (b"\x11" * 16 + b"\x00\x10\x02\x00" + b"\0" * 4 + (3).to_bytes(4, "big"), "isakmp_bad_length"),
])
def test_bad_isakmp_headers_dropped_and_counted(payload: bytes, reason: str) -> None:
    n = Net()
    assert n.out(raw(IP(src=H2, dst=SRV) / UDP(sport=500, dport=500) / payload)) == []
    n.handshake(H3, b"\x03" * 8, b"\x30" * 8)
    assert n.inn(raw(IP(src=SRV, dst=WAN_IP) / UDP(sport=500, dport=500) / payload)) == []
    assert n.c("drop_" + reason) == 2 and n.c("drop_internal_error") == 0


@pytest.mark.parametrize("size", [0, 4, 7])
def test_esp_shorter_than_its_header_dropped(size: int) -> None:
    n = Net()
    n.pair(H2, 0x1000, 0x2000)
    body = (0x1000).to_bytes(4, "big") + b"\0\0\0\1"
    assert n.out(raw(IP(src=H2, dst=SRV, proto=50) / body[:size])) == []
    assert n.inn(raw(IP(src=SRV, dst=WAN_IP, proto=50) / body[:size])) == []
    assert n.c("drop_esp_truncated") == 2 and n.c("drop_internal_error") == 0


def test_flood_of_new_spis_from_one_remote_stays_bounded() -> None:
    n = Net(parallel_sessions=True, max_spis_per_remote=8)
    n.handshake(H2, b"\x02" * 8, b"\x20" * 8)
    n.pair(H2, 0x1000, 0x2000)
    for k in range(2000):  # inbound: unknown SPIs never create state
        n.inn(esp(SRV, WAN_IP, 0x100000 + k))
    assert len(n.rows()) == 1
    for k in range(2000):  # outbound + inbound pairs: at most 8 entries for that remote
        n.out(esp(H2, SRV, 0x200000 + k))
        n.inn(esp(SRV, WAN_IP, 0x300000 + k))
    assert len(n.rows()) == 8
    assert n.c("drop_esp_too_many_spis") > 1900
    # another remote is unaffected
    assert n.esp_out(H2, 0x1000, rem=R2) is not None
    for k in range(300):  # ISAKMP initiations: bounded per remote too
        n.out(ike1(H3, SRV, (k + 1).to_bytes(8, "big")))
    assert len(n.rows("isakmp")) == 8 and n.c("drop_isakmp_too_many_sessions") > 250
    assert n.c("drop_internal_error") == 0
    n.tick(1801)
    assert n.rows() == [] and n.rows("isakmp") == [] and n.eng.helpers[0].size() == 0


# ------------------------------------------------------ housekeeping / misc
def test_wan_address_change_moves_entries() -> None:
    import ipaddress

    n = Net()
    n.handshake(H2, b"\x02" * 8, b"\x20" * 8)
    n.pair(H2, 0x1000, 0x2000)
    n.eng.set_wan_address(ipaddress.IPv4Interface("203.0.113.201/24"), n.now)
    o = n.out(esp(H2, SRV, 0x1000))
    assert IP(o[0][1]).src == "203.0.113.201" and checksums_ok(o[0][1])
    i = n.inn(esp(SRV, "203.0.113.201", 0x2000))
    assert IP(i[0][1]).dst == H2 and checksums_ok(i[0][1])
    assert n.inn(esp(SRV, WAN_IP, 0x2000)) == []  # the old address is not ours any more
    o = n.out(ike1(H2, SRV, b"\x02" * 8, b"\x20" * 8, exch=32))
    assert IP(o[0][1]).src == "203.0.113.201" and checksums_ok(o[0][1])
    assert n.rows()[0]["wan"] == "203.0.113.201"


def test_wan_change_flush_mode_clears_ipsec_state() -> None:
    import ipaddress

    n = Net()
    base = make_cfg()
    n.eng = Engine(base.model_copy(update={"wan": base.wan.model_copy(update={"dynaddr_mode": "flush"})}))
    n.handshake(H2, b"\x02" * 8, b"\x20" * 8)
    n.pair(H2, 0x1000, 0x2000)
    n.eng.set_wan_address(ipaddress.IPv4Interface("203.0.113.201/24"), n.now)
    assert n.rows() == [] and n.rows("isakmp") == []


def test_flush_and_size() -> None:
    n = Net(parallel_sessions=True)
    n.handshake(H2, b"\x02" * 8, b"\x20" * 8)
    n.pair(H2, 0x1000, 0x2000)
    n.pair(H3, 0x3000, 0x4000)
    h = n.eng.helpers[0]
    assert h.size() == 3
    assert n.eng.flush() >= 3
    assert h.size() == 0 and n.rows() == [] and n.rows("isakmp") == []


def test_forwarded_esp_server_still_reachable() -> None:
    """ipfwd --masq 10.0.0.5 50: ESP from a remote nobody on the LAN talks to goes to the server."""
    eng = Engine(make_cfg('[forwarding]\nprotofw = [{proto = 50, to = "10.0.0.5"}]\n'))
    o = eng.process("wan", esp(R2, WAN_IP, 0x5000), 1.0)
    assert [IP(b).dst for _, b in o] == [H5]
    # a LAN client's own IPsec with another remote is masqueraded as usual
    assert eng.process("lan", esp(H2, SRV, 0x1000), 1.0)
    assert [IP(b).dst for _, b in eng.process("wan", esp(SRV, WAN_IP, 0x2000), 1.0)] == [H2]


def test_remote_initiated_isakmp_with_no_lan_client_is_not_ours() -> None:
    n = Net()
    assert n.inn(ike1(SRV, WAN_IP, b"\x99" * 8)) == []
    assert n.c("isakmp_remote_initiated") == 0 and n.c("drop_inbound_no_mapping") == 1


def test_udp_4500_nat_t_is_ordinary_udp_masquerade() -> None:
    n = Net()
    o = n.out(raw(IP(src=H2, dst=SRV) / UDP(sport=4500, dport=4500) / (b"\0" * 4 + b"x" * 40)))
    p = IP(o[0][1])
    assert p.src == WAN_IP and n.rows() == [] and n.rows("isakmp") == []
    i = n.inn(raw(IP(src=SRV, dst=WAN_IP) / UDP(sport=4500, dport=p[UDP].sport) / (b"y" * 40)))
    assert IP(i[0][1]).dst == H2


def test_disabled_ipsec_falls_back_to_plain_handling() -> None:
    n = Net(enabled=False)
    assert n.out(esp(H2, SRV, 0x1000)) == [] and n.c("drop_proto_not_masqueraded") == 1
    o = n.out(ike1(H2, SRV, b"\x02" * 8))
    assert IP(o[0][1]).src == WAN_IP and n.rows("isakmp") == []


def test_ttl_one_is_not_forwarded() -> None:
    n = Net()
    n.pair(H2, 0x1000, 0x2000)
    o = n.out(esp(H2, SRV, 0x1000, ttl=1))
    assert all(IP(b).haslayer(ICMP) for _, b in o)


def test_config_reload_keeps_the_table_and_new_lifetimes_apply() -> None:
    n = Net()
    n.pair(H2, 0x1000, 0x2000)
    n.eng.reload(cfg(table_lifetime=60))
    n.esp_out(H2, 0x1000)
    assert n.rows()[0]["expires_in"] == 60.0
    n.tick(61)
    assert n.rows() == []
