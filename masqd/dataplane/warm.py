"""Keeps masqd's packet path in the CPU caches while traffic is sparse (``dataplane.keep_warm``).

Between two packets far apart (a 100 Hz ping) the machine runs other work, and
the interpreter's and the engine's code and data leave the CPU caches: the next
packet then costs several times what it costs warm. Traced on the 2-core build
machine: an echo request took 100-200 µs from masqd's wake-up to its write
when it came alone, the reply that followed at once 20 µs.

With ``keep_warm = T`` (seconds) and packets still coming (the last one less
than ``SPAN`` ago), whenever T has passed without a packet, a synthetic
exchange (out and back: UDP and ICMP echo in turn) runs through a *shadow*
engine: a private instance of the engine's class built
from the same config. The same code runs on the same kind of data; nothing is
written to any device, and the real engine's table and counters are untouched.
After ``SPAN`` without traffic the timer stops (an idle router pays nothing);
the next IPv4 packet read starts it again. The timer also keeps the CPU from
settling into deep idle between sparse packets.

T is at least 1 ms: the loop's timers (libuv) count whole milliseconds, and a
shorter delay rounds to zero, which would turn this into a spinning loop (busy
polling, one CPU at 100 %: that does cut the latency further, see the README,
but it is not what this setting is for).

Cost: one shadow exchange is about 9 µs warm; during a 100 Hz ping masqd
used 4-6 % of a CPU with T = 1 ms against 1.5 % without (``bench/e2e.py``
prints it); nothing under load (a real packet in the last T skips the run) or
when idle.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Callable
from typing import Any

from masqd.wire.ipv4 import UDP, build_icmp, build_ipv4

log = logging.getLogger("masqd.dataplane")

SPAN = 1.0  # keep warm this long after the last packet read
PEER = int(ipaddress.IPv4Address("198.51.100.77"))  # the shadow flow's far end (never on any wire)
SPORT, DPORT = 40000, 9
ECHO_ID = 0x6B77


def udp_packet(src: int, dst: int, sport: int, dport: int, payload: bytes = b"keepwarm") -> bytes:
    """A minimal IPv4/UDP packet (UDP checksum 0: none)."""
    return bytes(build_ipv4(src, dst, UDP, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload,
                            df=True))


class Warmer:
    """Runs the shadow exchange every ``period`` seconds while traffic is recent."""

    def __init__(self, cfg: Any, engine: Any, period: float, clock: Callable[[], float],
                 counters: dict[str, int]) -> None:
        self.period = period
        self.clock = clock
        self.counters = counters
        self.last_traffic = float("-inf")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.shadow: Any = None
        # (out from the LAN, back from the WAN or None when nothing came out), run in turn
        self.exchanges: list[tuple[bytes, bytes | None]] = []
        self.turn = 0
        self.rebuild(cfg, engine)

    def rebuild(self, cfg: Any, engine: Any) -> None:
        """A new shadow for a (re)loaded config; warming is off if it cannot be built."""
        self.shadow = None
        net = cfg.lan.address.network
        if net.num_addresses < 4:
            log.warning("dataplane.keep_warm: the LAN network %s has no spare address for the shadow flow; "
                        "off", net)
            return
        try:
            shadow = type(engine)(cfg)
            host = int(net.broadcast_address) - 1
            self.exchanges = [self._rehearse(shadow, pkt) for pkt in (
                udp_packet(host, PEER, SPORT, DPORT),
                bytes(build_icmp(host, PEER, 8, 0, ECHO_ID << 16 | 1, b"keepwarm")),
            )]
        except Exception:  # noqa: BLE001 - an optional aid must not stop the router
            log.exception("dataplane.keep_warm: the shadow engine failed; off")
            return
        self.shadow = shadow

    def _rehearse(self, shadow: Any, out_pkt: bytes) -> tuple[bytes, bytes | None]:
        """Send ``out_pkt`` through the shadow once and build the answer to what came out."""
        back = None
        for _oif, out in shadow.process("lan", out_pkt, self.clock()):
            if len(out) < 28:
                continue
            wan = int.from_bytes(out[12:16], "big")
            if out[9] == UDP:
                back = udp_packet(PEER, wan, DPORT, int.from_bytes(out[20:22], "big"))
            elif out[9] == 1 and out[20] == 8:
                back = bytes(build_icmp(PEER, wan, 0, 0, int.from_bytes(out[24:26], "big") << 16 | 1,
                                        b"keepwarm"))
        return out_pkt, back

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def poke(self, now: float) -> None:
        """Traffic was read: note it, and start the timer if it had stopped."""
        self.last_traffic = now
        if self.timer is None and self.loop is not None and self.shadow is not None:
            self.timer = self.loop.call_later(self.period, self._tick)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.loop = None

    def _tick(self) -> None:
        self.timer = None
        now = self.clock()
        shadow = self.shadow
        since = now - self.last_traffic
        if shadow is None or self.loop is None or since > SPAN:
            return
        if since < self.period:  # a real packet ran the path just now: no need, look again later
            self.timer = self.loop.call_later(self.period, self._tick)
            return
        out, back = self.exchanges[self.turn]
        self.turn = (self.turn + 1) % len(self.exchanges)
        try:
            shadow.process("lan", out, now)
            if back is not None:
                shadow.process("wan", back, now)
        except Exception:  # noqa: BLE001
            log.exception("dataplane.keep_warm: the shadow engine failed; off")
            self.shadow = None
            return
        self.counters["keep_warm_runs"] = self.counters.get("keep_warm_runs", 0) + 1
        self.timer = self.loop.call_later(self.period, self._tick)
