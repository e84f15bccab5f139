"""dataplane.keep_warm: the shadow exchange runs while traffic is recent, stops when it is not,
and never touches the real engine."""

from __future__ import annotations

import asyncio

import pytest

from masqd.config import ConfigError, loads
from masqd.dataplane import warm
from masqd.dataplane.warm import PEER, Warmer
from masqd.engine import Engine

BASE = '[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "203.0.113.200/24"\n'


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def run_for(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


def test_shadow_runs_while_traffic_is_recent_then_stops() -> None:
    cfg = loads(BASE + "[dataplane]\nkeep_warm = 0.001\n")
    real = Engine(cfg)
    clock, counters = Clock(), {}  # type: ignore[var-annotated]
    w = Warmer(cfg, real, cfg.dataplane.keep_warm, clock, counters)
    assert w.shadow is not None and all(back is not None for _out, back in w.exchanges)
    loop = asyncio.new_event_loop()
    try:
        w.start(loop)
        run_for(loop, 0.03)
        assert counters.get("keep_warm_runs", 0) == 0  # no traffic yet: nothing runs
        w.poke(clock())
        run_for(loop, 0.05)
        assert counters.get("keep_warm_runs", 0) == 0  # the clock stood still: traffic "just now"
        clock.t += 0.002  # 2 ms without a packet: the path would go cold
        run_for(loop, 0.05)
        ran = counters["keep_warm_runs"]
        assert 5 <= ran <= 120  # one per tick of the loop's millisecond clock, never a spin
        # both directions went through the shadow, UDP and ICMP echo in turn: two sessions
        rows = w.shadow.table(clock())
        assert sorted(r["proto"] for r in rows) == ["icmp", "udp"], rows
        for proto in (1, 2):  # udp, icmp: from the LAN and from the WAN, each about half the runs
            assert w.shadow.rx_pkts[proto] >= ran // 2 and w.shadow.rx_pkts[6 + proto] >= ran // 2, proto
        # the real engine saw nothing
        assert real.table(clock()) == []
        assert not any(real.rx_pkts) and not any(real.tx_pkts)
        # traffic stops: after SPAN the timer stops by itself
        clock.t += warm.SPAN + 0.1
        run_for(loop, 0.02)
        assert w.timer is None
        stopped = counters["keep_warm_runs"]
        run_for(loop, 0.03)
        assert counters["keep_warm_runs"] == stopped
        # and the next packet read starts it again
        w.poke(clock())
        clock.t += 0.002
        run_for(loop, 0.03)
        assert counters["keep_warm_runs"] > stopped
    finally:
        w.stop()
        loop.close()


def test_shadow_flow_stays_out_of_the_real_table_through_a_denying_firewall() -> None:
    """A rule set that denies the shadow flow only changes which path is kept warm."""
    cfg = loads(BASE + "[dataplane]\nkeep_warm = 0.001\n[firewall]\nforward_policy = \"DENY\"\n")
    real = Engine(cfg)
    w = Warmer(cfg, real, 0.001, Clock(), {})
    assert w.shadow is not None
    assert [back for _out, back in w.exchanges] == [None, None]  # nothing came out: no way back
    w.poke(0.0)
    w._tick()  # without a loop: runs once, no timer
    assert real.table(0.0) == []


def test_a_shadow_that_cannot_be_built_turns_warming_off() -> None:
    class Broken:
        def __init__(self, cfg: object) -> None:
            raise RuntimeError("no")

    cfg = loads(BASE)
    w = Warmer(cfg, Broken.__new__(Broken), 0.001, Clock(), {})
    assert w.shadow is None
    loop = asyncio.new_event_loop()
    try:
        w.start(loop)
        w.poke(0.0)
        assert w.timer is None
    finally:
        loop.close()


def test_shadow_packets_are_valid_ipv4_udp() -> None:
    from scapy.layers.inet import IP, UDP

    raw = warm.udp_packet(0x0AFFFFFE, PEER, 40000, 9)
    p = IP(raw)
    q = p.copy()
    del q[IP].chksum
    assert IP(bytes(q))[IP].chksum == p[IP].chksum  # scapy's own checksum agrees
    assert p[IP].src == "10.255.255.254" and p[IP].dst == "198.51.100.77"
    assert p[UDP].sport == 40000 and p[UDP].dport == 9 and p[IP].len == 36


@pytest.mark.parametrize("value", ["0.5", "-1", "0.0005", '"fast"'])
def test_bad_keep_warm_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as exc:
        loads(BASE + f"[dataplane]\nkeep_warm = {value}\n")
    assert any(e.startswith("dataplane.keep_warm:") for e in exc.value.errors), exc.value.errors


def test_reload_starts_retunes_and_stops_keep_warm() -> None:
    from masqd.dataplane.router import Dataplane

    cfg0 = loads(BASE)
    dp = Dataplane(cfg0, Engine(cfg0))
    loop = asyncio.new_event_loop()
    try:
        dp.start(loop)
        assert dp.warmer is None
        dp.on_reload(loads(BASE + "[dataplane]\nkeep_warm = 0.002\n"))
        assert dp.warmer is not None and dp.warmer.period == 0.002 and dp.warmer.loop is loop
        assert dp.snapshot()["keep_warm"] == 0.002
        first = dp.warmer
        dp.on_reload(loads(BASE + "[dataplane]\nkeep_warm = 0.005\n"))
        assert dp.warmer is first and first.period == 0.005 and first.shadow is not None
        dp.on_reload(loads(BASE))
        assert dp.warmer is None and first.loop is None
        dp.stop()
    finally:
        loop.close()


def test_only_ipv4_traffic_keeps_it_warm() -> None:
    """A wake-up that passed no IPv4 packet on (ARP, IPv6 chatter) does not start the shadow."""
    from masqd.dataplane.router import Dataplane

    cfg = loads(BASE + "[dataplane]\nkeep_warm = 0.001\n")
    dp = Dataplane(cfg, Engine(cfg))

    class FakePort:
        handle = None
        idle_at = 0.0
        passed = 0

        def drain(self, now: float) -> int:
            return self.passed

    loop = asyncio.new_event_loop()
    try:
        dp.start(loop)
        assert dp.warmer is not None
        port = FakePort()
        dp._on_readable(port)  # type: ignore[arg-type]
        assert dp.warmer.timer is None and dp.warmer.last_traffic == float("-inf")
        port.passed = 3
        dp._on_readable(port)  # type: ignore[arg-type]
        assert dp.warmer.timer is not None and dp.warmer.last_traffic == port.idle_at
        dp.stop()
    finally:
        loop.close()
