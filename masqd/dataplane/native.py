"""The native fast path's glue: the C flow cache (``_fastpath.FlowCache``) started, taught, folded and stopped.

With ``dataplane.fastpath = "native"`` the loop's reader callbacks are the C
flow cache (masqd/dataplane/_fastpath.c): it forwards the flows the engine's
fast path has already handled and hands every other packet to ``Port.take``,
in order. ``NativeCache`` is the data plane's handle on it; the ``Dataplane``
owns one and decides when it runs.

Design decisions:

- The engine makes every decision; the cache only repeats one. After the
  engine forwarded a packet, ``learn`` asks ``engine.fast_entry`` whether its
  flow is one the engine's fast path takes and, if what was written is the
  flow's own packet (not an ICMP error back, not a hairpin) and its next hop
  is resolved (TAP), teaches the cache the same rewrite.
- The engine is never called back from the cache's counts: the data plane
  pulls. ``sync`` folds what the cache counted (sessions' expiry, firewall
  hits, packet counters) into the engine before anyone reads or changes it.
- The cache empties itself (through ``stale``, which folds its counts first)
  whenever a cached decision could be void: the engine's epoch moved (a
  session rebound, a new config) or a neighbour table changed. A session the
  engine removes (expired, closed, replaced, dropped early) voids its own
  flows only: the engine lists it in ``gone`` and the cache forgets the keys
  it was taught for it (``forget_gone``), the other flows staying cached.
- Reader threads (``threads`` at start; the data plane asks for them when its
  clock is the monotonic clock the C code reads): one per device queue, each
  reading queue q of both devices and forwarding the flows the cache knows
  without the GIL. A packet the cache does not forward waits in its thread while
  the event loop's reader of an eventfd (``FlowCache.service``) hands it to
  Python, in order, and reads what queued up behind it on that queue (a batch
  per wake-up under a flood of new flows); the cache's decisions are protected by exclusive sections
  (see the header comment of _fastpath.c): ``sync`` and ``stale`` hold the
  threads (``FlowCache.hold``) until the end of the current loop iteration, so
  whatever the caller then does to the engine is done while no thread forwards,
  and the cache empties itself before they go on if a decision could change;
  ``sync(hold=False)`` is for a caller that only reads. Each section's length
  is counted (``take_sections``: ``dp_reader_stops`` and its time): it is
  latency every packet in flight meanwhile takes.
- The engine's budget for the flow-opening packets of hosts over their mapping
  rate (``masqd.engine.limits.Mutes``) is applied by the cache to its misses
  (``set_policer``): a flood of new flows from one host is dropped in the reader
  thread, not in Python; the drops are folded into the engine by ``sync``.
- Without the compiled module (installed without a C compiler) every packet
  goes through Python, with one warning and a counter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from masqd.dataplane.port import Port, bump
from masqd.dataplane.tuning import COALESCE_HOLD, COALESCE_MIN
from masqd.engine.nat import Session

try:
    from masqd.dataplane import _fastpath  # type: ignore[attr-defined]
except ImportError:  # installed without a C compiler: the Python fast path only
    _fastpath = None

log = logging.getLogger("masqd.dataplane")

# sessions removed at once beyond which the cache empties rather than forgets them one by one
FORGET_MAX = 4096


class NativeCache:
    """The flow cache of a data plane's two ports (``fc``: the FlowCache, None while off)."""

    def __init__(self, engine: Any, ports: dict[str, Port], counters: dict[str, int]) -> None:
        self.engine = engine
        self.ports = ports  # the data plane's own dict
        self.counters = counters
        self.fc: Any = None
        self.efd: int | None = None  # reader threads run: their eventfd (the loop calls fc.service)
        self.loop: Any = None
        self.longest_stop = 0.0  # seconds: the reader threads' longest stop so far (folded by sync)
        # the keys taught for each session, to forget them when the engine removes it (forget_gone)
        self.taught: dict[Any, set[tuple[int, int, bytes]]] = {}

    def possible(self) -> bool:
        """Whether the cache can run at all here: two ports, an engine with an epoch to watch."""
        return len(self.ports) == 2 and hasattr(self.engine, "epoch")

    def start(self, coalesce: float, traffic: Callable[[float], None] | None, loop: Any = None,
              threads: bool = False) -> Any:
        """Build the cache over both ports and return it (None, counted, without the module).
        ``threads``: one reader thread per queue of the devices (``loop`` calls their
        ``service``: the caller registers ``efd``)."""
        if _fastpath is None:
            if self.counters.get("fastpath_native_unavailable", 0) == 0:
                log.warning("dataplane.fastpath = native, but masqd was installed without its native "
                            "module (no C compiler?): every packet goes through Python")
            bump(self.counters, "fastpath_native_unavailable")
            return None
        fc = _fastpath.FlowCache()
        for idx, side in enumerate(("lan", "wan")):
            port = self.ports[side]
            fc.set_port(idx, port.fd, bool(port.hlen), port.l2 is not None,
                        port.l2.mac if port.l2 is not None else b"")
            fc.set_miss(idx, port.native_miss)
            port.native, port.native_idx = fc, idx
        # the cache empties itself (through stale, which folds its counts) whenever a
        # cached decision could be void: the engine's epoch moved (a session rebound, a new
        # config) or a neighbour table changed (TAP)
        fc.set_watch(self.engine, self.ports["lan"].l2, self.ports["wan"].l2, self.stale)
        nat = getattr(self.engine, "nat", None)
        if nat is not None and hasattr(nat, "watch_gone"):
            # a removed session (expired, closed, replaced, dropped early) voids its own flows
            # only: the engine lists it in gone instead of moving the epoch, the cache forgets them
            self.taught = {}
            nat.watch_gone()
            fc.set_gone(self.forget_gone)
        if hasattr(self.engine, "mute_rows"):
            # the hosts over their mapping rate: the cache drops their flow-opening misses beyond
            # the budget before Python, the engine no longer applies it
            fc.set_policer(self.engine.mute_rows)
            self.engine.police_openers = False
        fc.set_coalesce(coalesce, COALESCE_MIN, COALESCE_HOLD)
        fc.set_capture(self.ports["lan"].capture)
        self.fc = fc
        self.set_traffic(traffic)
        what = "established TCP/UDP flows, pings, ESP pairs and PPTP calls' GRE"
        if threads:
            for idx, side in enumerate(("lan", "wan")):
                for fd in self.ports[side].fds[1:]:
                    fc.add_queue(idx, fd)
            n = max(len(self.ports[side].fds) for side in ("lan", "wan"))
            try:
                self.efd = fc.start_workers(n)
            except OSError as exc:
                log.warning("native fast path: no reader threads (%s): the event loop reads queue 0", exc)
                threads = False
        if threads:
            self.loop = loop
            log.info("native fast path on: %s are forwarded without Python, by %d reader thread%s (one per "
                     "device queue)", what, n, "" if n == 1 else "s")
        else:
            if any(len(self.ports[side].fds) > 1 for side in ("lan", "wan")):
                log.info("native fast path: the loop reads the devices' other queues through Python")
            log.info("native fast path on: %s are forwarded without Python", what)
        return fc

    def stop(self) -> int:
        """Fold the last counts and drop the cache; returns the packets it passed on in all."""
        fc = self.fc
        if fc is None:
            return 0
        if self.efd is not None:
            fc.stop_workers()  # (a hold in force ends with them)
            self.efd = None
        self.sync(clear=True)
        fc.set_policer(None)
        fc.set_gone(None)
        nat = getattr(self.engine, "nat", None)
        if nat is not None and hasattr(nat, "unwatch_gone"):
            nat.unwatch_gone()
        if hasattr(self.engine, "police_openers"):
            self.engine.police_openers = True
        self.fc = None
        for port in self.ports.values():
            port.native = None
        return int(fc.passed)

    def reader(self, port: Port, clock: Callable[[], float]) -> tuple[Callable[[Any], None], Any] | None:
        """The loop's callback for ``port``'s fd and its argument when the cache runs and the
        data plane's clock is the monotonic clock it reads; None: the Python reader."""
        if self.fc is not None and clock is time.monotonic and self.efd is None:
            return self.fc.on_readable, port.native_idx
        return None

    def hold(self) -> None:
        """Reader threads: none forwards from now until the end of this loop iteration (then the
        cache empties itself first if a decision could have changed). Nothing without them."""
        fc = self.fc
        if fc is not None and self.efd is not None and fc.hold():
            if self.loop is not None:
                self.loop.call_soon(self.release)
            else:  # (no loop to end it: the caller must)
                pass

    def release(self) -> None:
        """End a hold at once (the loop does it at the end of the iteration that took it)."""
        if self.fc is not None and self.efd is not None:
            self.fc.release()

    def stale(self) -> None:
        """Forget every cached flow (their counts folded first)."""
        if self.fc is not None:
            self.hold()
            self.taught.clear()
            self._fold(self.fc.clear())

    def forget_gone(self) -> None:
        """The sessions the engine removed leave the cache (their counts folded), the other flows
        stay; many at once (a flush, an address change): the cache empties instead."""
        gone = self.engine.nat.take_gone()
        if not gone:
            return
        fc = self.fc
        if fc is None:
            return
        if len(gone) > FORGET_MAX:
            self.stale()
            return
        rows: list[tuple[int, int, bytes, Session]] = []
        taught = self.taught
        for s in gone:
            keys = taught.pop(s, None)
            if keys:
                rows.extend((d, p, k, s) for d, p, k in keys)
        if rows:
            self._fold(fc.forget(rows))
            bump(self.counters, "dp_cache_forgotten", len(rows))

    def set_traffic(self, traffic: Callable[[float], None] | None) -> None:
        """keep_warm needs to hear of traffic the flow cache forwarded without Python."""
        if self.fc is not None:
            self.fc.set_traffic(traffic)

    def set_coalesce(self, period: float) -> None:
        if self.fc is not None:
            self.fc.set_coalesce(period, COALESCE_MIN, COALESCE_HOLD)

    def set_capture(self, tap: Any) -> None:
        """While the tap is active every packet goes through Python."""
        if self.fc is not None:
            self.fc.set_capture(tap)

    def sync(self, clear: bool = False, hold: bool = True) -> None:
        """Fold what the flow cache counted into the engine (sessions' expiry, firewall hits,
        packet counters) and into the data plane's counters; ``clear``: forget its flows too.
        ``hold``: the reader threads stay stopped until the end of this loop iteration, for a
        caller that changes the engine next; a caller that only reads passes False (the fold
        itself is one short exclusive section)."""
        fc = self.fc
        if fc is None:
            return
        if hold:
            self.hold()  # what the caller does next to the engine is done while no thread forwards
        if clear:
            self.taught.clear()
        self._fold(fc.clear() if clear else fc.sync())
        policed = fc.take_policed()
        if policed:
            self.engine.count_policed(policed)
        supers, segments = fc.take_supers()
        if supers:  # as Engine.process_vnet counts the super-packets it forwards
            bump(self.counters, "rx_super_packets", supers)
            bump(self.counters, "rx_super_segments", segments)
        lan_err, wan_err, full, rounds = fc.take_errors()
        if rounds:
            bump(self.counters, "dp_coalesce_rounds", rounds)
        if lan_err:
            bump(self.counters, "dp_lan_write_errors", lan_err)
        if wan_err:
            bump(self.counters, "dp_wan_write_errors", wan_err)
        if full:
            bump(self.counters, "fastpath_native_full", full)
        stops, seconds, longest, slow = fc.take_sections()
        if stops:  # how long the reader threads stood still for Python (misses, holds)
            bump(self.counters, "dp_reader_stops", stops)
            bump(self.counters, "dp_reader_stopped_us", round(seconds * 1e6))
            if slow:
                bump(self.counters, "dp_reader_stops_over_1ms", slow)
            self.longest_stop = max(self.longest_stop, longest)

    def _fold(self, rows: list[tuple[Any, ...]]) -> None:
        total = self.engine.count_fast(rows)
        if total:
            bump(self.counters, "fastpath_native_packets", total)

    def learn(self, iface: str, ipkt: bytes | bytearray, oif: str, opkt: bytes | bytearray) -> None:
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
            added = self.fc.add(*entry, hdr)
        except RuntimeError:  # the key was another session's, with counts: fold them first
            self.sync()
            added = self.fc.add(*entry, hdr)
        if added:  # (any token: a helper's entries go when its removal moves the epoch, which clears this)
            keys = self.taught.get(entry[3])
            if keys is None:
                self.taught[entry[3]] = {(d, entry[1], key)}
            else:
                keys.add((d, entry[1], key))  # (a flow taught again: the same key, once)
