"""The running router: two ports (LAN, WAN) around the sans-IO engine in one event loop.

``Dataplane`` wires the ports (``masqd.dataplane.port``) to the engine: every
IPv4 packet read is given to ``engine.process(iface, packet, now)`` and what
comes back is written out; a packet with offload work (a partial checksum, a
TSO/USO super-packet) goes through ``Engine.process_vnet`` and keeps its
virtio-net header. It owns the life cycle (``open``, ``start``, ``stop``,
``close``), the packet path (``_route``, ``_route_v``, ``_on_readable`` and the
Python coalescing rounds, which belong to the read path), the timers and the
control operations (``set_wan_address``, ``on_reload``, ``snapshot``,
``all_counters``).

Design decisions:

- Device and process tuning (rps, offloads, adaptive NAPI, coalescing
  settings) is in ``masqd.dataplane.tuning``; the C flow cache's glue is in
  ``masqd.dataplane.native`` (``NativeCache``). ``Dataplane.native`` is the
  running FlowCache or None, kept as a plain attribute because the packet path
  tests it after every packet.
- With ``dataplane.fastpath = "native"`` the loop's reader callbacks are the
  flow cache itself (see ``reader``); ``dataplane.coalesce`` and
  ``napi = "adaptive"`` are driven from here.
- In TAP mode the port's :class:`~masqd.dataplane.l2.EthernetHost` adds the
  Ethernet layer (ARP, neighbour cache, ICMP host-unreachable when a next hop
  cannot be resolved). Timers call ``engine.expire(now)`` every
  ``cfg.expire_interval`` (``EXPIRE_SLICE`` sessions per loop iteration at most,
  the rest in the next ones) and drive ARP retransmissions; the packets the engine
  sends of its own accord (``engine.start``, ``engine.tick`` at
  ``engine.next_tick``: the PCP/NAT-PMP announcements) are written like any other.
- Data-plane counters live in ``Dataplane.counters`` next to the engine's own;
  the flow cache's counts are folded into the engine (``sync_native``) before
  anyone reads or changes it.
- In an active/backup pair (``set_active``), the standby reads its devices but
  routes nothing, answers no ARP and announces nothing; its engine's timers do
  not run (the active's table changes reach it by sync). Taking over sends
  gratuitous ARP on both sides (three times, 0.1 s apart).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from masqd.dataplane.device import format_mac, local_mac, offload_names, open_device, parse_mac
from masqd.dataplane.l2 import EthernetHost, icmp_host_unreachable
from masqd.dataplane.native import NativeCache
from masqd.dataplane.port import CaptureTap, Port, bump
from masqd.dataplane.tuning import (
    BULK_QUIET,
    COALESCE_HOLD,
    COALESCE_MIN,
    NAPI_TICK,
    AdaptiveNapi,
    apply_coalesce,
    negotiate_offloads,
    steer,
)
from masqd.dataplane.warm import Warmer
from masqd.wire import vnet

if TYPE_CHECKING:
    from masqd.config import Config, Interface

log = logging.getLogger("masqd.dataplane")

L2_TICK = 0.25
CAPTURE_TICK = 0.05  # reader threads: how often the capture's state is looked at
# timed-out sessions removed per loop iteration at most: about 7 µs each on the build machine, so
# a mass expiry (a flood's 100 000 sessions timing out in the same second) stops the reader
# threads for ~15 ms at a time, with packets flowing in between, instead of 0.7 s at once
EXPIRE_SLICE = 2000
MAX_AUTO_QUEUES = 8


def queue_count(cfg: Config) -> int:
    """Queues per device: ``dataplane.queues``, or one per CPU masqd may run on (at most
    MAX_AUTO_QUEUES); one with the Python fast path (one reader)."""
    if cfg.dataplane.fastpath != "native":
        return 1
    return cfg.dataplane.queues or max(1, min(MAX_AUTO_QUEUES, len(os.sched_getaffinity(0))))


class Dataplane:
    """The engine between a LAN port and a WAN port, driven by an asyncio loop."""

    def __init__(self, cfg: Config, engine: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.engine = engine
        self.clock = clock
        self.counters: dict[str, int] = {}
        self.ports: dict[str, Port] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._started = False
        self.offload = 0  # TUN_F_* flags in force on both devices
        self.rps: tuple[int, int] | None = None  # (masqd's CPU, steering mask) with dataplane.rps
        self.warmer: Warmer | None = None  # dataplane.keep_warm
        # dataplane.fastpath = "native": its glue, and the running flow cache (_fastpath.FlowCache)
        # or None (the same as self.cache.fc, kept here for the packet path's one test per packet)
        self.cache = NativeCache(engine, self.ports, self.counters)
        self.native: Any = None
        self.coalesce = 0.0  # seconds between drains under load (dataplane.coalesce; 0: off)
        self.coalesce_slack_set = False
        self.last_super = 0.0  # when a super-packet was last read (no coalescing for a while)
        # napi = "adaptive": packets passed on by Python (all ports), and the switch's state
        self.npkts = 0
        self.napi_switch = AdaptiveNapi(self.ports, self.counters)
        self.active = True  # an active/backup pair's standby routes nothing (set_active)
        # the native fast path's reads: reader threads (one per queue) when the clock is the
        # monotonic clock the C code reads; False: the loop's reader callback (on_readable)
        self.reader_threads = True

    # ------------------------------------------------------------------ life cycle

    def open(self) -> None:
        """Open and place both devices (synchronous: call before the loop runs)."""
        try:
            queues = queue_count(self.cfg)
            for side in ("lan", "wan"):
                icfg: Interface = getattr(self.cfg, side)
                dev = open_device(icfg, self.cfg.dataplane.napi, queues)
                l2 = None
                if icfg.mode == "tap":
                    mac = parse_mac(icfg.mac) if icfg.mac else local_mac(icfg.name, str(icfg.address))
                    l2 = EthernetHost(side, mac, int(icfg.address.ip), icfg.address.network.prefixlen,
                                      self.counters)
                self.add_port(Port(side, dev, l2, self.counters))
                log.info("opened %s device %s (%s, mtu %d%s%s%s%s%s)", side, dev.name, dev.mode, dev.mtu,
                         f", {len(dev.fds)} queues" if len(dev.fds) > 1 else "",
                         f", netns {dev.netns}" if dev.netns else "",
                         f", bridge {icfg.bridge}" if icfg.bridge else "",
                         f", mac {format_mac(l2.mac)}" if l2 else "",
                         f", {dev.napi} NAPI" if dev.napi != "off" else "")
            self.offload = negotiate_offloads(list(self.ports.values()))
            self.rps = steer(self.cfg.dataplane.rps, self.ports.values())
        except BaseException:
            self.close()
            raise

    def add_port(self, port: Port) -> None:
        """Attach an opened port (``open`` does this for the configured devices)."""
        self.ports[port.iface] = port
        self._set_handlers(port)

    def _set_handlers(self, port: Port) -> None:
        if self.active:
            port.handle = self._handle_lan if port.iface == "lan" else self._handle_wan
            port.handle_v = self._route_v
        else:
            port.handle = self._standby_drop
            port.handle_v = self._standby_drop_v
        if port.l2 is not None:
            port.l2.silent = not self.active

    def _standby_drop(self, pkt: bytes | bytearray, now: float) -> None:
        bump(self.counters, "dp_standby_drops")

    def _standby_drop_v(self, pkt: bytes | bytearray, vh: bytes, port: Port, now: float) -> None:
        bump(self.counters, "dp_standby_drops")

    def set_active(self, active: bool) -> None:
        """Become the active (route, answer ARP, announce the addresses) or the standby of a pair."""
        if active == self.active:
            return
        self.active = active
        for port in self.ports.values():
            self._set_handlers(port)
        if not self._started or self.loop is None:
            return
        if active:
            self._set_native()
            self._announce(3)
        else:
            self.close_native()

    def _announce(self, times: int) -> None:
        """Gratuitous ARP on every TAP port, ``times`` times 0.1 s apart (a lost one is repeated)."""
        if not self._started or not self.active or self.loop is None:
            return
        for port in self.ports.values():
            if port.l2 is not None:
                port.l2.gratuitous()
                port.flush_l2()
        if times > 1:
            self._timers["announce"] = self.loop.call_later(0.1, self._announce, times - 1)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Register the readers and timers on ``loop``; announce our addresses (TAP)."""
        self.loop = loop
        now = self.clock()
        for port in self.ports.values():
            if port.l2 is not None:
                port.l2.gratuitous()  # (nothing when silent: a standby)
                port.flush_l2()
        self._started = True
        start = getattr(self.engine, "start", None)
        if callable(start):
            self._send_own(start(now), now)
        self._timers["expire"] = loop.call_later(self.cfg.expire_interval, self._expire)
        if any(p.l2 is not None for p in self.ports.values()):
            self._timers["l2"] = loop.call_later(L2_TICK, self._l2_tick)
        self._set_keep_warm()
        self._set_native()
        self._set_coalesce()
        self._register_readers()
        if any(p.dev.napi == "adaptive" for p in self.ports.values()):
            self._timers["napi"] = loop.call_later(NAPI_TICK, self._napi_tick)
        log.debug("data plane started at %.3f", now)

    # ------------------------------------------------------------------ tuning

    @property
    def napi_threaded(self) -> bool:
        """napi = "adaptive": whether the NAPI threads are on now."""
        return self.napi_switch.threaded

    def _napi_tick(self) -> None:
        """napi = "adaptive": hand the packet count to the switch every ``NAPI_TICK``."""
        if not self._started or self.loop is None:
            return
        last_super = self.last_super
        if self.native is not None:
            last_super = max(last_super, self.native.last_super)
        self.napi_switch.tick(self.npkts + (self.native.passed if self.native is not None else 0), self.loop,
                              bulk=time.monotonic() - last_super < NAPI_TICK)
        self._timers["napi"] = self.loop.call_later(NAPI_TICK, self._napi_tick)

    def _set_coalesce(self) -> None:
        """Follow ``cfg.dataplane.coalesce`` (and the fine timer slack it needs: see tuning)."""
        period = self.cfg.dataplane.coalesce
        self.coalesce_slack_set = apply_coalesce(period, self.coalesce, self.coalesce_slack_set)
        self.coalesce = period
        self.cache.set_coalesce(period)

    def reader(self, port: Port) -> tuple[Callable[[Any], None], Any]:
        """The loop's callback for ``port``'s fd, and its argument: the flow cache itself when it
        runs (and the data plane's clock is the monotonic clock it reads), else ``_on_readable``."""
        return self.cache.reader(port, self.clock) or (self._on_readable, port)

    def _register_readers(self) -> None:
        loop = self.loop
        if loop is None or not self._started:
            return
        if self.cache.efd is not None:  # reader threads read the devices; the loop serves their misses
            for port in self.ports.values():
                for fd in port.fds:
                    loop.remove_reader(fd)
            loop.add_reader(self.cache.efd, self.native.service)
            if "capture" not in self._timers:
                self._timers["capture"] = loop.call_later(CAPTURE_TICK, self._capture_tick)
            return
        for port in self.ports.values():
            cb, arg = self.reader(port)
            loop.add_reader(port.fd, cb, arg)
            for fd in port.fds[1:]:  # more queues (opened for reader threads): Python reads them
                loop.add_reader(fd, self._on_readable_q, port, fd)

    def _capture_tick(self) -> None:
        """Reader threads: a capture that started or stopped takes effect within CAPTURE_TICK."""
        if not self._started or self.loop is None or self.cache.efd is None:
            self._timers.pop("capture", None)
            return
        self.native.poll_capture()
        self._timers["capture"] = self.loop.call_later(CAPTURE_TICK, self._capture_tick)

    # ------------------------------------------------------------------ native fast path

    def _set_native(self) -> None:
        """Start or stop the native fast path for ``cfg.dataplane.fastpath``."""
        want = self.cfg.dataplane.fastpath == "native" and self.active
        if not want or not self.cache.possible():
            if self.native is not None:
                self.close_native()
                log.info("native fast path off: every packet goes through Python")
            return
        if self.native is not None:
            return
        # reader threads read the monotonic clock, as the data plane does outside tests
        self.native = self.cache.start(self.coalesce, self.warmer.poke if self.warmer is not None else None,
                                       self.loop, threads=self.reader_threads and self.clock is time.monotonic)
        if self.native is not None:
            self._register_readers()

    def sync_native(self, clear: bool = False, hold: bool = True) -> None:
        """Fold what the flow cache counted into the engine (sessions' expiry, firewall hits,
        packet counters) and into the data plane's counters; ``clear``: forget its flows too.
        ``hold=False`` for a caller that only reads: the reader threads go on at once."""
        self.cache.sync(clear, hold)

    def _set_keep_warm(self) -> None:
        """Start, retune or stop the keep-warm shadow for ``cfg.dataplane.keep_warm``."""
        period = self.cfg.dataplane.keep_warm
        if not period:
            if self.warmer is not None:
                self.warmer.stop()
                self.warmer = None
                self.cache.set_traffic(None)
            return
        if self.warmer is None:
            self.warmer = Warmer(self.cfg, self.engine, period, self.clock, self.counters)
            log.info("keep_warm: a shadow exchange every %.2f ms while traffic is recent", period * 1e3)
        else:
            self.warmer.period = period
            self.warmer.rebuild(self.cfg, self.engine)
        if self.loop is not None:
            self.warmer.start(self.loop)
        self.cache.set_traffic(self.warmer.poke)

    def stop(self) -> None:
        """Remove readers and timers (the devices stay open until ``close``)."""
        self._started = False
        self.close_native()
        if self.warmer is not None:
            self.warmer.stop()
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
        if self.loop is not None:
            for port in self.ports.values():
                for fd in port.fds:
                    try:
                        self.loop.remove_reader(fd)
                    except Exception:  # noqa: BLE001 - loop may be closing
                        pass

    def close(self) -> None:
        """Close the devices (non-persistent ones disappear)."""
        for port in self.ports.values():
            port.dev.close()
        self.ports.clear()

    # ------------------------------------------------------------------ packet path

    def _on_readable_q(self, port: Port, fd: int) -> None:
        """Python reads another queue of ``port``."""
        self._on_readable(port, fd)

    def _on_readable(self, port: Port, fd: int | None = None) -> None:
        clock = self.clock
        port.super_seen = False
        passed = port.drain(clock()) if fd is None else port.drain(clock(), fd)
        if port.super_seen:
            self.last_super = time.monotonic()
        elif passed >= COALESCE_MIN and self.coalesce and time.monotonic() - self.last_super > BULK_QUIET:
            passed += self._coalesce()
        self.npkts += passed
        port.idle_at = now = clock()
        if passed and self.warmer is not None:  # IPv4 traffic (not ARP, not IPv6 chatter)
            self.warmer.poke(now)

    def _coalesce(self) -> int:
        """``dataplane.coalesce``: under load, sleep and drain both ports in rounds (what a NIC's
        interrupt moderation does) instead of waking for every burst; returns packets passed on.

        Rounds go on while each finds at least COALESCE_MIN packets, for at most
        COALESCE_HOLD, then the loop runs its timers and other readers (epoll is
        level-triggered: whatever is queued brings masqd straight back). A
        super-packet ends them: bulk TCP moves 64 KiB per packet, and the pause
        would only delay its ACK clock."""
        clock, pause, mono = self.clock, self.coalesce, time.monotonic
        ports = list(self.ports.values())
        for p in ports:
            p.super_seen = False
        end = mono() + COALESCE_HOLD  # real time, whatever clock the packets are stamped with
        total = rounds = 0
        while True:
            time.sleep(pause)
            now = clock()
            rounds += 1
            n = 0
            for p in ports:
                n += p.drain(now)
            total += n
            if any(p.super_seen for p in ports):
                self.last_super = mono()
                break
            if n < COALESCE_MIN or mono() >= end:
                break
        bump(self.counters, "dp_coalesce_rounds", rounds)
        return total

    def _route_v(self, pkt: bytes | bytearray, vh: bytes, inport: Port, now: float) -> None:
        """A packet with offload work: the engine gives back the header to write with each output
        (``vh`` itself, relative to the input frame, or a new one relative to the IPv4 header)."""
        try:
            outs = self.engine.process_vnet(inport.iface, pkt, now, vh, inport.shift)
        except Exception:  # noqa: BLE001 - a bug must cost one packet, not the router
            bump(self.counters, "drop_engine_error")
            if self.counters["drop_engine_error"] <= 10:
                log.exception("engine failed on a packet from %s", inport.iface)
            return
        ports, nh = self.ports, self.engine.next_hop
        for oif, out, oh in outs:
            port = ports.get(oif)
            if port is None:
                bump(self.counters, "drop_no_port")
                continue
            if oh:
                if oh is vh:
                    if port.shift != inport.shift:
                        oh = vnet.shift(oh, port.shift - inport.shift)
                elif port.shift:
                    oh = vnet.shift(oh, port.shift)
            port.send(out, nh, now, oh)
        if self.native is not None and outs:
            self.cache.learn(inport.iface, pkt, outs[0][0], outs[0][1])

    def _handle_lan(self, pkt: bytes | bytearray, now: float) -> None:
        self._route("lan", pkt, now)

    def _handle_wan(self, pkt: bytes | bytearray, now: float) -> None:
        self._route("wan", pkt, now)

    def _route(self, iface: str, pkt: bytes | bytearray, now: float) -> None:
        try:
            outs = self.engine.process(iface, pkt, now)
        except Exception:  # noqa: BLE001 - a bug must cost one packet, not the router
            bump(self.counters, "drop_engine_error")
            if self.counters["drop_engine_error"] <= 10:
                log.exception("engine failed on a packet from %s", iface)
            return
        if outs:
            ports, nh = self.ports, self.engine.next_hop
            for oif, out in outs:
                port = ports.get(oif)
                if port is None:
                    bump(self.counters, "drop_no_port")
                    continue
                port.send(out, nh, now)
            if self.native is not None:
                self.cache.learn(iface, pkt, outs[0][0], outs[0][1])

    # ------------------------------------------------------------------ timers

    def _expire(self) -> None:
        if not self._started or self.loop is None:
            return
        self._expire_slice()
        self._timers["expire"] = self.loop.call_later(self.cfg.expire_interval, self._expire)

    def _expire_more(self) -> None:
        self._timers.pop("expire_more", None)
        if self._started and self.loop is not None:
            self._expire_slice()

    def _expire_slice(self) -> None:
        """Up to ``EXPIRE_SLICE`` timed-out sessions go; the rest in the next loop iteration, the
        reader threads and the loop's packets going on in between."""
        assert self.loop is not None
        more = False
        try:
            self.sync_native()  # the flow cache's counts refresh the sessions' expiry
            if self.active:  # a standby's entries go when the active says so
                more = bool(self.engine.expire(self.clock(), EXPIRE_SLICE))
            self.cache.release()  # done with the engine: the reader threads go on now
        except Exception:  # noqa: BLE001
            bump(self.counters, "dp_expire_errors")
            log.exception("engine.expire failed")
        if more and "expire_more" not in self._timers:
            self._timers["expire_more"] = self.loop.call_later(0, self._expire_more)

    def _send_own(self, outs: list[tuple[str, bytes]], now: float) -> None:
        """Write packets the engine made of its own accord, then wait for its next ones."""
        for oif, pkt in outs:
            port = self.ports.get(oif)
            if port is not None:
                port.send(pkt, self.engine.next_hop, now)
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        """A timer for ``engine.next_tick`` (the next announcement), replacing any earlier one."""
        if not self._started or self.loop is None:
            return
        old = self._timers.pop("tick", None)
        if old is not None:
            old.cancel()
        when = getattr(self.engine, "next_tick", None)
        if isinstance(when, float | int):
            self._timers["tick"] = self.loop.call_later(max(0.0, when - self.clock()), self._tick)

    def _tick(self) -> None:
        self._timers.pop("tick", None)
        if not self._started or self.loop is None:
            return
        now = self.clock()
        try:
            outs = self.engine.tick(now)
        except Exception:  # noqa: BLE001 - a bug must not stop the loop
            bump(self.counters, "dp_tick_errors")
            log.exception("engine.tick failed")
            return
        self._send_own(outs, now)

    def _l2_tick(self) -> None:
        if not self._started or self.loop is None:
            return
        now = self.clock()
        # a neighbour aged past its reachable time: the cached flows and headers that use it skip
        # lookup(), so they go through Python again (its next use makes it STALE and probes it)
        aged = [port for port in self.ports.values() if port.l2 is not None and port.l2.aging(now)]
        if aged:
            bump(self.counters, "dp_neighbour_aging_flushes")
            self.cache.stale()
        for port in self.ports.values():
            l2 = port.l2
            if l2 is None:
                continue
            l2.tick(now)
            if port in aged:
                port.hcache.clear()
            if l2.out or l2.out_offload:
                port.flush_l2()
            if l2.unreachable:
                failed, l2.unreachable = l2.unreachable, []
                for nexthop, pkt in failed:
                    # The error speaks for the silent neighbour, as if it came from that
                    # segment: the engine translates it back to the original sender.
                    err = icmp_host_unreachable(pkt, nexthop)
                    if err is not None:
                        bump(self.counters, "dp_icmp_host_unreachable")
                        self._route(port.iface, err, now)
        self._timers["l2"] = self.loop.call_later(L2_TICK, self._l2_tick)

    # ------------------------------------------------------------------ control

    def set_wan_address(self, addr: ipaddress.IPv4Interface) -> None:
        """A new WAN address: tell the engine, re-address the WAN L2 host and announce it."""
        now = self.clock()
        self.sync_native()
        outs = self.engine.set_wan_address(addr, now) or []
        port = self.ports.get("wan")
        if port is not None and port.l2 is not None:
            port.l2.set_address(int(addr.ip), addr.network.prefixlen, now)
            port.flush_l2()
        self._send_own(outs, now)  # the announcements of the new address

    def on_reload(self, cfg: Config) -> None:
        """After the engine took a new config: follow address changes on the L2 hosts."""
        self.cfg = cfg
        now = self.clock()
        for p in self.ports.values():
            p.hcache.clear()  # routes may have changed
        self._set_coalesce()
        if self._started:
            self._set_keep_warm()
            self._set_native()
            self._schedule_tick()  # a reload may have turned PCP on or off, or moved the WAN address
        for side in ("lan", "wan"):
            port = self.ports.get(side)
            addr: ipaddress.IPv4Interface = getattr(cfg, side).address
            if side == "wan":  # the engine decides (a dynamic address outlives a reload)
                addr = getattr(self.engine, "wan_if", addr)
            if port is not None and port.l2 is not None and port.l2.ip != int(addr.ip):
                port.l2.set_address(int(addr.ip), addr.network.prefixlen, now)
                port.flush_l2()

    def close_native(self) -> None:
        """Fold the last counts and drop the flow cache; the readers go back to Python."""
        if self.native is not None:
            if self.cache.efd is not None and self.loop is not None:
                self.loop.remove_reader(self.cache.efd)
            self.npkts += self.cache.stop()  # adaptive NAPI's count goes on
            self.native = None
            self._register_readers()

    def set_capture(self, tap: CaptureTap | None) -> None:
        for port in self.ports.values():
            port.capture = tap
        self.cache.set_capture(tap)  # while the tap is active every packet goes through Python

    def all_counters(self) -> dict[str, int]:
        """Engine counters plus the data plane's own (the flow cache's counts folded in first)."""
        self.sync_native(hold=False)
        out = dict(getattr(self.engine, "counters", {}) or {})
        for k, v in self.counters.items():
            out[k] = out.get(k, 0) + v
        return out

    def snapshot(self) -> dict[str, Any]:
        """Table, counters and neighbours: what ``SIGUSR1`` dumps."""
        now = self.clock()
        self.sync_native(hold=False)
        try:
            table = list(self.engine.table(now))
        except Exception as exc:  # noqa: BLE001
            table = [{"error": str(exc)}]
        return {
            "time": time.time(),
            "table": table,
            "counters": self.all_counters(),
            "neighbours": {side: p.l2.table(now) for side, p in self.ports.items() if p.l2 is not None},
            "offload": offload_names(self.offload),
            "rps": None if self.rps is None else {"cpu": self.rps[0], "mask": f"{self.rps[1]:x}"},
            "napi": {side: p.dev.napi if p.dev.napi != "adaptive" else
                     f"adaptive ({'threaded' if self.napi_threaded else 'inline'})" for side, p in self.ports.items()},
            "keep_warm": None if self.warmer is None or self.warmer.shadow is None else self.warmer.period,
            "fastpath": "native" if self.native is not None else "python",
            "coalesce": self.coalesce,
            "queues": {side: len(p.fds) for side, p in self.ports.items()},
            "reader_threads": self.native.workers if self.native is not None else 0,
            "reader_longest_stop_ms": round(self.cache.longest_stop * 1e3, 3),
        }
