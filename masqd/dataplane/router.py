"""The running router: two ports (LAN, WAN) around the sans-IO engine in one event loop.

``Port`` holds the only read/write path to a device (``drain`` and
``send``). With offloads (IFF_VNET_HDR) every read and write carries a
virtio-net header: ordinary packets go the usual way and are written with a
zero header; packets with offload work (partial checksums, TSO/USO
super-packets up to 64 KiB) go through ``Engine.process_vnet`` and keep their
header, the kernel finishing checksums and segmenting on the way out. Both
devices get the same offload set (negotiated at open). Reads go until the fd would block (with a
cap per wake-up so that one busy side cannot starve the other), writes are
issued at once (a TUN/TAP write does not block; a failed write is counted and
the packet dropped).

``Dataplane`` wires the ports to the engine: every IPv4 packet read is given
to ``engine.process(iface, packet, now)`` and what comes back is written out.
With ``dataplane.fastpath = "native"`` the loop's reader callbacks are the C
flow cache (masqd/dataplane/_fastpath.c): it forwards the flows the engine's
fast path has already handled and hands every other packet to ``Port.take``,
in order; ``dataplane.coalesce`` and ``napi = "adaptive"`` are driven from
here too.
In TAP mode the port's :class:`~masqd.dataplane.l2.EthernetHost` adds the
Ethernet layer (ARP, neighbour cache, ICMP host-unreachable when a next hop
cannot be resolved). Timers call ``engine.expire(now)`` every
``cfg.expire_interval`` and drive ARP retransmissions; the packets the engine
sends of its own accord (``engine.start``, ``engine.tick`` at ``engine.next_tick``:
the PCP/NAT-PMP announcements) are written like any other.

Non-IPv4 input (IPv6 router solicitations, LLDP, ...) is dropped and counted
in ``counters["drop_non_ipv4"]``; data-plane counters live in
``Dataplane.counters`` next to the engine's own.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from masqd.dataplane.device import (
    OFFLOAD_ALL,
    Device,
    format_mac,
    local_mac,
    offload_names,
    open_device,
    parse_mac,
    set_offload,
    set_rps,
    set_threaded,
)
from masqd.dataplane.l2 import EthernetHost, icmp_host_unreachable
from masqd.dataplane.warm import Warmer
from masqd.wire import vnet

try:
    from masqd.dataplane import _fastpath  # type: ignore[attr-defined]
except ImportError:  # installed without a C compiler: the Python fast path only
    _fastpath = None

if TYPE_CHECKING:
    from masqd.config import Config, Interface

log = logging.getLogger("masqd.dataplane")

READ_BATCH = 512  # packets per wake-up and port, at most
COALESCE_MIN = 2  # dataplane.coalesce: a drain that passes on this many packets means "under load"
COALESCE_HOLD = 0.002  # ... and the loop is held for at most this long before its other work runs
BULK_QUIET = 0.02  # ... and not within this long of a super-packet (bulk TCP: its ACKs are small)
NAPI_TICK = 0.1  # napi = "adaptive": the packet rate is looked at this often,
NAPI_UP = 2000  # threads on at this many packets in a tick (20 kpps),
NAPI_DOWN = 500  # off after NAPI_QUIET ticks in a row under this many (5 kpps)
NAPI_QUIET = 10
HCACHE_MAX = 4096
BURST_GAP = 20e-6  # readable again this soon after a drain: packets are queueing, read in batches
VH = vnet.SIZE
ZERO_VH = vnet.ZERO
BUF_SIZE = VH + 14 + 65536  # virtio-net header, Ethernet header, largest IPv4 packet
L2_TICK = 0.25


class CaptureTap(Protocol):
    active: bool

    def record(self, iface: str, packet: bytes | bytearray | memoryview) -> None: ...


def _bump(counters: dict[str, int], key: str, n: int = 1) -> None:
    counters[key] = counters.get(key, 0) + n


def _no_handler(pkt: bytes | bytearray, now: float) -> None:
    raise RuntimeError("port read before Dataplane.start")


def _no_handler_v(pkt: bytes | bytearray, vh: bytes, port: Port, now: float) -> None:
    raise RuntimeError("port read before Dataplane.start")


def _set_timer_slack(ns: int) -> bool:
    """prctl(PR_SET_TIMERSLACK): how late the kernel may fire this process's timers (sleeps)."""
    try:
        import ctypes

        return int(ctypes.CDLL(None, use_errno=True).prctl(29, ns, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class Port:
    """One interface: its device fd, its L2 host (TAP mode), and the read/write path."""

    def __init__(self, iface: str, dev: Device, l2: EthernetHost | None, counters: dict[str, int]) -> None:
        self.iface = iface
        self.dev = dev
        self.fd = dev.fd
        self.l2 = l2
        self.counters = counters
        self.capture: CaptureTap | None = None
        self.vnet = dev.vnet
        # virtio-net header offsets count from the start of the frame: the Ethernet header in TAP mode
        self.shift = 14 if l2 is not None else 0
        self.idle_at = 0.0  # when the last drain returned (see drain)
        # TAP: destination address -> Ethernet header (next hop resolved), dropped when the
        # neighbour table changes, on every L2 tick (so aging is seen) and on reload
        self.hcache: dict[bytes, bytes] = {}
        self.hver = -1
        self.hlen = VH if self.vnet else 0  # bytes before the frame in every read and write
        self.handle: Callable[[bytes | bytearray, float], None] = _no_handler
        self.handle_v: Callable[[bytes | bytearray, bytes, Port, float], None] = _no_handler_v
        # the native fast path (see Dataplane._set_native): the flow cache and this port's index
        # in it (the cache itself empties when the engine's or the neighbours' state moved)
        self.native: Any = None
        self.native_idx = 0
        self.super_seen = False  # a TSO/USO super-packet was read (bulk TCP: no coalescing)

    def drain(self, now: float) -> int:
        """Read and pass each IPv4 packet on (``take``); returns how many packets were passed on
        (frames the L2 host consumed, such as ARP, and dropped non-IPv4 input are not counted).

        How many: under load the fd is readable again right after a drain
        returns (``BURST_GAP``), and reads go until EAGAIN (up to READ_BATCH).
        At low rates a wake-up brings one packet, and the read that would only
        say EAGAIN costs more than the packet (an exception in Python): one read,
        then back to the loop; epoll is level-triggered, so anything left wakes
        us again at once and switches the port to batches.

        With the native fast path, the reads are done by the flow cache, which
        forwards the packets of the flows it knows and hands back the first one
        it does not: that one takes the path below, then the cache goes on.
        """
        fd = self.fd
        native = self.native if self.capture is None or not self.capture.active else None
        read, take = os.read, self.take
        n = passed = 0
        # (the flow cache reads until EAGAIN: a read that would block costs it no exception)
        budget = READ_BATCH if native is not None or now - self.idle_at < BURST_GAP else 1
        while n < budget:
            if native is None:
                try:
                    data = read(fd, BUF_SIZE)
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                except OSError as exc:
                    self._read_error(exc)
                    break
                n += 1
            else:
                k, fwd, data = native.drain(self.native_idx, budget - n, now)
                n += k
                passed += fwd
                if type(data) is not bytes:
                    if data is not None:  # an errno
                        self._read_error(OSError(data, os.strerror(data)))
                    break
            passed += take(data, now)
        return passed

    def take(self, data: bytes, now: float) -> int:
        """One frame as read (from ``drain``, or handed back by the flow cache's reader): 1 if an
        IPv4 packet was passed on to ``handle`` (or, on a device with virtio-net headers, one
        with offload work, a partial checksum or a super-packet, to ``handle_v`` with its
        header, offsets relative to the frame start: see ``shift``), 0 if the L2 host consumed
        it or it was dropped. Frames the L2 host produced are written at once."""
        l2, hl = self.l2, self.hlen
        if self.capture is not None and self.capture.active:
            self.capture.record(self.iface, data[hl:])
        if l2 is not None:
            pkt = l2.rx_at(data, hl, now)
            if pkt is None:  # ARP (answered here), or dropped
                if l2.out or l2.out_offload:
                    self.flush_l2()
                return 0
        elif len(data) >= hl + 20 and data[hl] >> 4 == 4:
            pkt = data[hl:]  # the same object when there is no header
        else:
            _bump(self.counters, "drop_non_ipv4")
            return 0
        if not hl or (data[0] & 1 == 0 and data[1] == 0):  # no partial checksum, no super-packet
            self.handle(pkt, now)
        else:
            if data[1]:
                self.super_seen = True
            self.handle_v(pkt, data[:hl], self, now)
        if l2 is not None and (l2.out or l2.out_offload):
            self.flush_l2()
        return 1

    def native_miss(self, data: bytes | int, now: float) -> int:
        """What the flow cache's reader hands back: a frame (see ``take``) or a read's errno."""
        if type(data) is int:
            self._read_error(OSError(data, os.strerror(data)))
            return 0
        return self.take(data, now)  # type: ignore[arg-type]

    def _read_error(self, exc: OSError) -> None:
        _bump(self.counters, f"dp_{self.iface}_read_errors")
        log.warning("read error on %s: %s", self.iface, exc)

    def send(self, pkt: bytes | bytearray, nexthop: Callable[[str, int], int], now: float,
             vh: bytes = b"") -> None:
        """Write one IPv4 packet (TAP: behind an Ethernet header, once the next hop is known).

        ``vh``: its virtio-net header in device-relative form (b"" for an
        ordinary packet; only meaningful on a device with headers).
        """
        l2 = self.l2
        try:
            if l2 is None:
                if self.vnet:
                    os.writev(self.fd, (vh or ZERO_VH, pkt))
                else:
                    os.write(self.fd, pkt)
                if self.capture is not None and self.capture.active:
                    self.capture.record(self.iface, pkt)
                return
            if l2.version != self.hver:
                self.hcache.clear()
                self.hver = l2.version
            dst = pkt[16:20] if type(pkt) is bytes else bytes(pkt[16:20])
            hdr = self.hcache.get(dst)
            if hdr is None:
                nh = nexthop(self.iface, int.from_bytes(dst, "big"))
                hdr = l2.lookup(nh, now)
                if hdr is None:
                    hdr = l2.header(nh, pkt, now, vh)  # queued (with its offload header) or dropped
                elif len(self.hcache) < HCACHE_MAX:
                    self.hcache[dst] = hdr
            if hdr is not None:
                if self.vnet:
                    os.writev(self.fd, (vh or ZERO_VH, hdr, pkt))
                else:
                    os.writev(self.fd, (hdr, pkt))
                if self.capture is not None and self.capture.active:
                    self.capture.record(self.iface, hdr + bytes(pkt))
            if l2.out or l2.out_offload:
                self.flush_l2()
        except OSError as exc:
            _bump(self.counters, f"dp_{self.iface}_write_errors")
            log.debug("write error on %s: %s", self.iface, exc)

    def flush_l2(self) -> None:
        """Write the frames the L2 host produced (ARP, packets released from a queue)."""
        assert self.l2 is not None
        frames, self.l2.out = self.l2.out, []
        cap = self.capture if self.capture is not None and self.capture.active else None
        if self.l2.out_offload:
            held, self.l2.out_offload = self.l2.out_offload, []
            for vh, frame in held:
                try:
                    os.writev(self.fd, (vh, frame))
                except OSError:
                    _bump(self.counters, f"dp_{self.iface}_write_errors")
                    continue
                if cap is not None:
                    cap.record(self.iface, frame)
        for frame in frames:
            try:
                if self.vnet:
                    os.writev(self.fd, (ZERO_VH, frame))
                else:
                    os.write(self.fd, frame)
            except OSError:
                _bump(self.counters, f"dp_{self.iface}_write_errors")
                continue
            if cap is not None:
                cap.record(self.iface, frame)


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
        self.native: Any = None  # dataplane.fastpath = "native": the flow cache (_fastpath.FlowCache)
        self.coalesce = 0.0  # seconds between drains under load (dataplane.coalesce; 0: off)
        self.coalesce_slack_set = False
        self.last_super = 0.0  # when a super-packet was last read (no coalescing for a while)
        # napi = "adaptive": packets passed on (all ports), at the last tick, quiet ticks in a row,
        # whether the threads are on, and a switch in progress (done in a worker thread)
        self.npkts = 0
        self._napi_seen = 0
        self._napi_quiet = 0
        self.napi_threaded = False
        self._napi_busy = False

    # ------------------------------------------------------------------ life cycle

    def open(self) -> None:
        """Open and place both devices (synchronous: call before the loop runs)."""
        try:
            for side in ("lan", "wan"):
                icfg: Interface = getattr(self.cfg, side)
                dev = open_device(icfg, self.cfg.dataplane.napi)
                l2 = None
                if icfg.mode == "tap":
                    mac = parse_mac(icfg.mac) if icfg.mac else local_mac(icfg.name, str(icfg.address))
                    l2 = EthernetHost(side, mac, int(icfg.address.ip), icfg.address.network.prefixlen,
                                      self.counters)
                self.add_port(Port(side, dev, l2, self.counters))
                log.info("opened %s device %s (%s, mtu %d%s%s%s%s)", side, dev.name, dev.mode, dev.mtu,
                         f", netns {dev.netns}" if dev.netns else "",
                         f", bridge {icfg.bridge}" if icfg.bridge else "",
                         f", mac {format_mac(l2.mac)}" if l2 else "",
                         f", {dev.napi} NAPI" if dev.napi != "off" else "")
            self._negotiate_offloads()
            self._steer()
        except BaseException:
            self.close()
            raise

    def add_port(self, port: Port) -> None:
        """Attach an opened port (``open`` does this for the configured devices)."""
        port.handle = self._handle_lan if port.iface == "lan" else self._handle_wan
        port.handle_v = self._route_v
        self.ports[port.iface] = port

    def _steer(self) -> None:
        """``dataplane.rps``: pin masqd to one CPU, the kernel work after its writes to the others."""
        rps = self.cfg.dataplane.rps
        if rps == "off":
            return
        allowed = sorted(os.sched_getaffinity(0))
        if rps == "auto":
            if len(allowed) < 2:
                log.info("dataplane.rps = auto: one CPU only, nothing to steer")
                return
            own = {allowed[0]}
            mask = sum(1 << c for c in allowed[1:])
        else:
            mask = int(rps, 16)
            own = {c for c in allowed if not mask >> c & 1} or set(allowed)
        os.sched_setaffinity(0, own)
        for port in self.ports.values():
            set_rps(port.dev.name, port.dev.netns, mask)
        self.rps = (min(own), mask)
        log.info("masqd runs on CPU %s; kernel work after its writes on CPU mask %x",
                 ",".join(map(str, sorted(own))), mask)

    def _negotiate_offloads(self) -> None:
        """Turn on the offloads both devices accept (a super-packet read on one side is written
        on the other, so they must agree); none at all if either side has them off or refused."""
        ports = list(self.ports.values())
        self.offload = 0
        if not all(p.vnet for p in ports):
            off = [p.iface for p in ports if not p.vnet]
            log.info("offloads off (config: %s): packets are handled one by one", ", ".join(off))
            for p in ports:
                if p.vnet:
                    set_offload(p.fd, 0)
            return
        got = [set_offload(p.fd, OFFLOAD_ALL) for p in ports]
        common = got[0]
        for g in got[1:]:
            common &= g
        if common != OFFLOAD_ALL:  # bring every device down to the set they all accept
            for p in ports:
                set_offload(p.fd, common)
        for p in ports:
            p.dev.offload = common
        self.offload = common
        if common:
            log.info("offloads on (%s): super-packets up to 64 KiB are rewritten once", offload_names(common))
        else:
            log.warning("offloads unavailable (the kernel refused TUNSETOFFLOAD on %s): packets are handled "
                        "one by one", ", ".join(p.iface for p, g in zip(ports, got, strict=True) if not g))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Register the readers and timers on ``loop``; announce our addresses (TAP)."""
        self.loop = loop
        now = self.clock()
        for port in self.ports.values():
            if port.l2 is not None:
                port.l2.gratuitous()
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

    # ------------------------------------------------------------------ adaptive NAPI

    def _napi_tick(self) -> None:
        """napi = "adaptive": threads on when the rate is high, off after a quiet second."""
        if not self._started or self.loop is None:
            return
        total = self.npkts + (self.native.passed if self.native is not None else 0)
        n, self._napi_seen = total - self._napi_seen, total
        self._napi_quiet = self._napi_quiet + 1 if n < NAPI_DOWN else 0
        want = self.napi_threaded
        if n >= NAPI_UP:
            want = True
        elif self._napi_quiet >= NAPI_QUIET:
            want = False
        if want != self.napi_threaded and not self._napi_busy:
            self._napi_busy = True
            fut = self.loop.run_in_executor(None, self._napi_switch, want)
            fut.add_done_callback(functools.partial(self._napi_switched, want))
        self._timers["napi"] = self.loop.call_later(NAPI_TICK, self._napi_tick)

    def _napi_switch(self, on: bool) -> None:
        """In a worker thread (the sysfs write goes through ``ip netns exec``: milliseconds)."""
        for port in self.ports.values():
            if port.dev.napi == "adaptive":
                set_threaded(port.dev.name, port.dev.netns, on)

    def _napi_switched(self, on: bool, fut: Any) -> None:
        self._napi_busy = False
        exc = fut.exception()
        if exc is not None:
            _bump(self.counters, "dp_napi_switch_errors")
            log.warning("napi = adaptive: cannot switch the NAPI threads %s: %s", "on" if on else "off", exc)
            return
        self.napi_threaded = on
        _bump(self.counters, "dp_napi_switches")
        log.info("napi = adaptive: NAPI threads %s", "on (high packet rate)" if on else "off (quiet)")

    def _set_coalesce(self) -> None:
        """Follow ``cfg.dataplane.coalesce``; a short pause needs a fine timer slack (the default
        50 µs would stretch it), so the process's slack is set to 1 µs while it is on."""
        period = self.cfg.dataplane.coalesce
        if period and not self.coalesce_slack_set:
            self.coalesce_slack_set = _set_timer_slack(1000)
        if period and period != self.coalesce:
            log.info("coalesce: under load, drains every %.0f µs instead of one per burst", period * 1e6)
        self.coalesce = period
        if self.native is not None:
            self.native.set_coalesce(period, COALESCE_MIN, COALESCE_HOLD)

    def reader(self, port: Port) -> tuple[Callable[[Any], None], Any]:
        """The loop's callback for ``port``'s fd, and its argument: the flow cache itself when it
        runs (and the data plane's clock is the monotonic clock it reads), else ``_on_readable``."""
        if self.native is not None and self.clock is time.monotonic:
            return self.native.on_readable, port.native_idx
        return self._on_readable, port

    def _register_readers(self) -> None:
        if self.loop is None or not self._started:
            return
        for port in self.ports.values():
            cb, arg = self.reader(port)
            self.loop.add_reader(port.fd, cb, arg)

    # ------------------------------------------------------------------ native fast path

    def _set_native(self) -> None:
        """Start or stop the native fast path for ``cfg.dataplane.fastpath``."""
        want = self.cfg.dataplane.fastpath == "native"
        if not want or len(self.ports) != 2 or not hasattr(self.engine, "epoch"):
            if self.native is not None:
                self.close_native()
                log.info("native fast path off: every packet goes through Python")
            return
        if self.native is not None:
            return
        if _fastpath is None:
            if self.counters.get("fastpath_native_unavailable", 0) == 0:
                log.warning("dataplane.fastpath = native, but masqd was installed without its native "
                            "module (no C compiler?): every packet goes through Python")
            _bump(self.counters, "fastpath_native_unavailable")
            return
        fc = _fastpath.FlowCache()
        for idx, side in enumerate(("lan", "wan")):
            port = self.ports[side]
            fc.set_port(idx, port.fd, bool(port.hlen), port.l2 is not None,
                        port.l2.mac if port.l2 is not None else b"")
            fc.set_miss(idx, port.native_miss)
            port.native, port.native_idx = fc, idx
        # the cache empties itself (through _native_stale, which folds its counts) whenever a
        # cached decision could be void: the engine's epoch moved (a session removed or
        # rebound, a new config) or a neighbour table changed (TAP)
        fc.set_watch(self.engine, self.ports["lan"].l2, self.ports["wan"].l2, self._native_stale)
        fc.set_coalesce(self.coalesce, COALESCE_MIN, COALESCE_HOLD)
        fc.set_capture(self.ports["lan"].capture)
        self.native = fc
        self._set_traffic_hook()
        self._register_readers()
        log.info("native fast path on: established TCP/UDP flows and pings are forwarded without Python")

    def _native_stale(self) -> None:
        if self.native is not None:
            self._fold(self.native.clear())

    def _set_traffic_hook(self) -> None:
        """keep_warm needs to hear of traffic the flow cache forwarded without Python."""
        if self.native is not None:
            w = self.warmer
            self.native.set_traffic(w.poke if w is not None else None)

    def sync_native(self, clear: bool = False) -> None:
        """Fold what the flow cache counted into the engine (sessions' expiry, firewall hits,
        packet counters) and into the data plane's counters; ``clear``: forget its flows too."""
        fc = self.native
        if fc is None:
            return
        self._fold(fc.clear() if clear else fc.sync())
        lan_err, wan_err, full, rounds = fc.take_errors()
        if rounds:
            _bump(self.counters, "dp_coalesce_rounds", rounds)
        if lan_err:
            _bump(self.counters, "dp_lan_write_errors", lan_err)
        if wan_err:
            _bump(self.counters, "dp_wan_write_errors", wan_err)
        if full:
            _bump(self.counters, "fastpath_native_full", full)

    def _fold(self, rows: list[tuple[Any, int, int, int, int, float]]) -> None:
        total = self.engine.count_fast(rows)
        if total:
            _bump(self.counters, "fastpath_native_packets", total)

    def _learn(self, iface: str, ipkt: bytes | bytearray, oif: str, opkt: bytes | bytearray) -> None:
        """The engine forwarded ``ipkt`` (from ``iface``) as ``opkt`` (to ``oif``): if its flow is
        one the engine's fast path takes, teach the flow cache the same rewrite."""
        port = self.ports.get(oif)
        if port is None:
            return
        entry = self.engine.fast_entry(iface, ipkt)
        if entry is None:
            return
        # only when what was written is the flow's own packet (not an ICMP error back, a hairpin)
        d, key, new_addr = entry[0], entry[2], entry[4]
        if oif != ("wan" if d == 0 else "lan") or bytes(opkt[16:20]) != (key[4:8] if d == 0 else new_addr):
            return
        hdr: bytes | None = b""
        if port.l2 is not None:
            hdr = port.hcache.get(bytes(opkt[16:20]))  # the next hop is resolved (Port.send cached it)
            if hdr is None:
                return
        try:
            self.native.add(*entry, hdr)
        except RuntimeError:  # the key was another session's, with counts: fold them first
            self.sync_native()
            self.native.add(*entry, hdr)

    def _set_keep_warm(self) -> None:
        """Start, retune or stop the keep-warm shadow for ``cfg.dataplane.keep_warm``."""
        period = self.cfg.dataplane.keep_warm
        if not period:
            if self.warmer is not None:
                self.warmer.stop()
                self.warmer = None
                self._set_traffic_hook()
            return
        if self.warmer is None:
            self.warmer = Warmer(self.cfg, self.engine, period, self.clock, self.counters)
            log.info("keep_warm: a shadow exchange every %.2f ms while traffic is recent", period * 1e3)
        else:
            self.warmer.period = period
            self.warmer.rebuild(self.cfg, self.engine)
        if self.loop is not None:
            self.warmer.start(self.loop)
        self._set_traffic_hook()

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
                try:
                    self.loop.remove_reader(port.fd)
                except Exception:  # noqa: BLE001 - loop may be closing
                    pass

    def close(self) -> None:
        """Close the devices (non-persistent ones disappear)."""
        for port in self.ports.values():
            port.dev.close()
        self.ports.clear()

    # ------------------------------------------------------------------ packet path

    def _on_readable(self, port: Port) -> None:
        clock = self.clock
        port.super_seen = False
        passed = port.drain(clock())
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
        _bump(self.counters, "dp_coalesce_rounds", rounds)
        return total

    def _route_v(self, pkt: bytes | bytearray, vh: bytes, inport: Port, now: float) -> None:
        """A packet with offload work: the engine gives back the header to write with each output
        (``vh`` itself, relative to the input frame, or a new one relative to the IPv4 header)."""
        try:
            outs = self.engine.process_vnet(inport.iface, pkt, now, vh, inport.shift)
        except Exception:  # noqa: BLE001 - a bug must cost one packet, not the router
            _bump(self.counters, "drop_engine_error")
            if self.counters["drop_engine_error"] <= 10:
                log.exception("engine failed on a packet from %s", inport.iface)
            return
        ports, nh = self.ports, self.engine.next_hop
        for oif, out, oh in outs:
            port = ports.get(oif)
            if port is None:
                _bump(self.counters, "drop_no_port")
                continue
            if oh:
                if oh is vh:
                    if port.shift != inport.shift:
                        oh = vnet.shift(oh, port.shift - inport.shift)
                elif port.shift:
                    oh = vnet.shift(oh, port.shift)
            port.send(out, nh, now, oh)
        if self.native is not None and outs:
            self._learn(inport.iface, pkt, outs[0][0], outs[0][1])

    def _handle_lan(self, pkt: bytes | bytearray, now: float) -> None:
        self._route("lan", pkt, now)

    def _handle_wan(self, pkt: bytes | bytearray, now: float) -> None:
        self._route("wan", pkt, now)

    def _route(self, iface: str, pkt: bytes | bytearray, now: float) -> None:
        try:
            outs = self.engine.process(iface, pkt, now)
        except Exception:  # noqa: BLE001 - a bug must cost one packet, not the router
            _bump(self.counters, "drop_engine_error")
            if self.counters["drop_engine_error"] <= 10:
                log.exception("engine failed on a packet from %s", iface)
            return
        if outs:
            ports, nh = self.ports, self.engine.next_hop
            for oif, out in outs:
                port = ports.get(oif)
                if port is None:
                    _bump(self.counters, "drop_no_port")
                    continue
                port.send(out, nh, now)
            if self.native is not None:
                self._learn(iface, pkt, outs[0][0], outs[0][1])

    # ------------------------------------------------------------------ timers

    def _expire(self) -> None:
        if not self._started or self.loop is None:
            return
        try:
            self.sync_native()  # the flow cache's counts refresh the sessions' expiry
            self.engine.expire(self.clock())
        except Exception:  # noqa: BLE001
            _bump(self.counters, "dp_expire_errors")
            log.exception("engine.expire failed")
        self._timers["expire"] = self.loop.call_later(self.cfg.expire_interval, self._expire)

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
            _bump(self.counters, "dp_tick_errors")
            log.exception("engine.tick failed")
            return
        self._send_own(outs, now)

    def _l2_tick(self) -> None:
        if not self._started or self.loop is None:
            return
        now = self.clock()
        self._native_stale()  # neighbours age: every cached flow goes through Python again
        for port in self.ports.values():
            l2 = port.l2
            if l2 is None:
                continue
            l2.tick(now)
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
                        _bump(self.counters, "dp_icmp_host_unreachable")
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
            self.sync_native(clear=True)
            self.npkts += self.native.passed  # adaptive NAPI's count goes on
            self.native = None
            for port in self.ports.values():
                port.native = None
            self._register_readers()

    def set_capture(self, tap: CaptureTap | None) -> None:
        for port in self.ports.values():
            port.capture = tap
        if self.native is not None:  # while the tap is active every packet goes through Python
            self.native.set_capture(tap)

    def all_counters(self) -> dict[str, int]:
        """Engine counters plus the data plane's own (the flow cache's counts folded in first)."""
        self.sync_native()
        out = dict(getattr(self.engine, "counters", {}) or {})
        for k, v in self.counters.items():
            out[k] = out.get(k, 0) + v
        return out

    def snapshot(self) -> dict[str, Any]:
        """Table, counters and neighbours: what ``SIGUSR1`` dumps."""
        now = self.clock()
        self.sync_native()
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
        }
