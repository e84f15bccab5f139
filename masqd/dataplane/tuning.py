"""Device and process tuning around the packet path: rps steering, offloads, adaptive NAPI, coalescing.

Everything here sets how the kernel and the process treat masqd's packets; none
of it reads or writes a packet (that is ``masqd.dataplane.port``).

Design decisions:

- ``dataplane.rps`` (``steer``): masqd is pinned to one CPU and the kernel work
  that follows its writes (receive packet steering on the devices) goes to the
  others, so the two do not compete for one core.
- Offloads (``negotiate_offloads``): both devices get the same set, because a
  super-packet read on one side is written on the other; none at all when
  either side has them off in the config or the kernel refuses them.
- ``napi = "adaptive"`` (``AdaptiveNapi``): the packet rate is looked at every
  ``NAPI_TICK``; the devices' NAPI threads go on at ``NAPI_UP`` packets a tick
  and off after ``NAPI_QUIET`` ticks in a row under ``NAPI_DOWN``. A tick in
  which a super-packet was read (bulk TCP) counts as quiet: the threads are
  for high rates of small packets, and they slowed one TCP stream down (on the
  2-core build machine, eight interleaved runs each, `iperf3` through masqd
  over the kernel: median 0.70 with them, 0.83 inline; four streams alike). The switch
  is a sysfs write through ``ip netns exec`` (milliseconds), so it runs in a
  worker thread, one at a time.
- ``dataplane.coalesce`` (``apply_coalesce``): under load the data plane
  sleeps and drains both ports in rounds (``COALESCE_MIN``, ``COALESCE_HOLD``,
  ``BULK_QUIET``; the rounds themselves run on the read path, in
  ``masqd.dataplane.router`` or in the flow cache). A pause that short needs a
  fine timer slack: the default 50 µs would stretch it, so the process's slack
  is set to 1 µs once coalescing is on.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from masqd.dataplane.device import OFFLOAD_ALL, offload_names, set_offload, set_rps, set_threaded
from masqd.dataplane.port import bump

if TYPE_CHECKING:
    import asyncio

    from masqd.dataplane.port import Port

log = logging.getLogger("masqd.dataplane")

COALESCE_MIN = 2  # dataplane.coalesce: a drain that passes on this many packets means "under load"
COALESCE_HOLD = 0.002  # ... and the loop is held for at most this long before its other work runs
BULK_QUIET = 0.02  # ... and not within this long of a super-packet (bulk TCP: its ACKs are small)
NAPI_TICK = 0.1  # napi = "adaptive": the packet rate is looked at this often,
NAPI_UP = 2000  # threads on at this many packets in a tick (20 kpps),
NAPI_DOWN = 500  # off after NAPI_QUIET ticks in a row under this many (5 kpps)
NAPI_QUIET = 10


def set_timer_slack(ns: int) -> bool:
    """prctl(PR_SET_TIMERSLACK): how late the kernel may fire this process's timers (sleeps)."""
    try:
        import ctypes

        return int(ctypes.CDLL(None, use_errno=True).prctl(29, ns, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def steer(rps: str, ports: Iterable[Port]) -> tuple[int, int] | None:
    """``dataplane.rps``: pin masqd to one CPU, the kernel work after its writes to the others.
    Returns (masqd's CPU, the steering mask), or None when nothing was steered."""
    if rps == "off":
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if rps == "auto":
        if len(allowed) < 2:
            log.info("dataplane.rps = auto: one CPU only, nothing to steer")
            return None
        own = {allowed[0]}
        mask = sum(1 << c for c in allowed[1:])
    else:
        mask = int(rps, 16)
        own = {c for c in allowed if not mask >> c & 1} or set(allowed)
    os.sched_setaffinity(0, own)
    for port in ports:
        set_rps(port.dev.name, port.dev.netns, mask, len(port.dev.fds))
    log.info("masqd runs on CPU %s; kernel work after its writes on CPU mask %x",
             ",".join(map(str, sorted(own))), mask)
    return (min(own), mask)


def negotiate_offloads(ports: list[Port]) -> int:
    """Turn on the offloads both devices accept (a super-packet read on one side is written
    on the other, so they must agree); none at all if either side has them off or refused.
    Returns the TUN_F_* flags in force on both devices."""
    if not all(p.vnet for p in ports):
        off = [p.iface for p in ports if not p.vnet]
        log.info("offloads off (config: %s): packets are handled one by one", ", ".join(off))
        for p in ports:
            if p.vnet:
                set_offload(p.fd, 0)
        return 0
    got = [set_offload(p.fd, OFFLOAD_ALL) for p in ports]
    common = got[0]
    for g in got[1:]:
        common &= g
    if common != OFFLOAD_ALL:  # bring every device down to the set they all accept
        for p in ports:
            set_offload(p.fd, common)
    for p in ports:
        p.dev.offload = common
    if common:
        log.info("offloads on (%s): super-packets up to 64 KiB are rewritten once", offload_names(common))
    else:
        log.warning("offloads unavailable (the kernel refused TUNSETOFFLOAD on %s): packets are handled "
                    "one by one", ", ".join(p.iface for p, g in zip(ports, got, strict=True) if not g))
    return common


def apply_coalesce(period: float, current: float, slack_set: bool) -> bool:
    """Follow ``cfg.dataplane.coalesce`` (``period``; ``current``: the one in force): a short
    pause needs a fine timer slack (the default 50 µs would stretch it), so the process's slack
    is set to 1 µs while it is on. Returns whether that slack is set."""
    if period and not slack_set:
        slack_set = set_timer_slack(1000)
    if period and period != current:
        log.info("coalesce: under load, drains every %.0f µs instead of one per burst", period * 1e6)
    return slack_set


class AdaptiveNapi:
    """napi = "adaptive": threads on when the rate is high, off after a quiet second.

    ``tick`` is called every ``NAPI_TICK`` with the packets passed on so far
    (all ports, Python and the flow cache); ``ports`` is the data plane's own
    dict, so the switch reaches the devices attached later too.
    """

    def __init__(self, ports: dict[str, Port], counters: dict[str, int]) -> None:
        self.ports = ports
        self.counters = counters
        # packets at the last tick, quiet ticks in a row, whether the threads are on,
        # and a switch in progress (done in a worker thread)
        self.seen = 0
        self.quiet = 0
        self.threaded = False
        self.busy = False

    def tick(self, total: int, loop: asyncio.AbstractEventLoop, bulk: bool = False) -> None:
        """Look at the rate since the last tick; start a switch when it calls for one. ``bulk``:
        a super-packet was read in this tick (bulk TCP): the tick counts as quiet."""
        n, self.seen = total - self.seen, total
        if bulk:
            n = 0
        self.quiet = self.quiet + 1 if n < NAPI_DOWN else 0
        want = self.threaded
        if n >= NAPI_UP:
            want = True
        elif self.quiet >= NAPI_QUIET:
            want = False
        if want != self.threaded and not self.busy:
            self.busy = True
            fut = loop.run_in_executor(None, self._switch, want)
            fut.add_done_callback(functools.partial(self._switched, want))

    def _switch(self, on: bool) -> None:
        """In a worker thread (the sysfs write goes through ``ip netns exec``: milliseconds)."""
        for port in self.ports.values():
            if port.dev.napi == "adaptive":
                set_threaded(port.dev.name, port.dev.netns, on)

    def _switched(self, on: bool, fut: Any) -> None:
        self.busy = False
        exc = fut.exception()
        if exc is not None:
            bump(self.counters, "dp_napi_switch_errors")
            log.warning("napi = adaptive: cannot switch the NAPI threads %s: %s", "on" if on else "off", exc)
            return
        self.threaded = on
        bump(self.counters, "dp_napi_switches")
        log.info("napi = adaptive: NAPI threads %s", "on (high packet rate)" if on else "off (quiet)")
