"""Port I/O: the only read and write path of a device (``Port``), and the capture tap it feeds.

A ``Port`` is one interface: its device fd, its Ethernet host in TAP mode
(:class:`~masqd.dataplane.l2.EthernetHost`: ARP, neighbour cache) and the
callbacks the data plane gives it (``handle`` for an ordinary IPv4 packet,
``handle_v`` for one with offload work). Nothing else reads or writes a device.

Design decisions:

- Reads go until the fd would block, with a cap per wake-up (``READ_BATCH``)
  so that one busy side cannot starve the other; at low rates a wake-up reads
  one packet (``BURST_GAP``, see ``Port.drain``).
- Writes are issued at once: a TUN/TAP write does not block; a failed write is
  counted (``dp_<iface>_write_errors``) and the packet dropped.
- With offloads (IFF_VNET_HDR) every read and write carries a virtio-net
  header: ordinary packets are written with a zero header; packets with offload
  work (partial checksums, TSO/USO super-packets up to 64 KiB) keep theirs, the
  kernel finishing checksums and segmenting on the way out.
- TAP: the Ethernet header of each destination (next hop resolved) is cached
  per port (``hcache``) and dropped whenever the neighbour table changes.
- With the native fast path the C flow cache does the reads (``Port.drain``
  through ``FlowCache.drain``, or the cache as the loop's reader) and hands back
  every frame it does not forward to ``Port.take``/``Port.native_miss``, in order.
- Non-IPv4 input (IPv6 router solicitations, LLDP, ...) is dropped and counted
  in ``counters["drop_non_ipv4"]``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

from masqd.dataplane.device import Device
from masqd.dataplane.l2 import EthernetHost
from masqd.wire import vnet

log = logging.getLogger("masqd.dataplane")

READ_BATCH = 512  # packets per wake-up and port, at most
BURST_GAP = 20e-6  # readable again this soon after a drain: packets are queueing, read in batches
HCACHE_MAX = 4096
VH = vnet.SIZE
ZERO_VH = vnet.ZERO
BUF_SIZE = VH + 14 + 65536  # virtio-net header, Ethernet header, largest IPv4 packet


class CaptureTap(Protocol):
    active: bool

    def record(self, iface: str, packet: bytes | bytearray | memoryview) -> None: ...


def bump(counters: dict[str, int], key: str, n: int = 1) -> None:
    """Add ``n`` to a data-plane counter (they start at zero when first counted)."""
    counters[key] = counters.get(key, 0) + n


def _no_handler(pkt: bytes | bytearray, now: float) -> None:
    raise RuntimeError("port read before Dataplane.start")


def _no_handler_v(pkt: bytes | bytearray, vh: bytes, port: Port, now: float) -> None:
    raise RuntimeError("port read before Dataplane.start")


class Port:
    """One interface: its device fd, its L2 host (TAP mode), and the read/write path."""

    def __init__(self, iface: str, dev: Device, l2: EthernetHost | None, counters: dict[str, int]) -> None:
        self.iface = iface
        self.dev = dev
        self.fd = dev.fd
        self.fds = list(dev.fds) or [dev.fd]  # one per queue (IFF_MULTI_QUEUE); fds[0] == fd
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
        # the native fast path (see masqd.dataplane.native): the flow cache and this port's index
        # in it (the cache itself empties when the engine's or the neighbours' state moved)
        self.native: Any = None
        self.native_idx = 0
        self.super_seen = False  # a TSO/USO super-packet was read (bulk TCP: no coalescing)

    def drain(self, now: float, fd: int | None = None) -> int:
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
        ``fd``: the queue to read (default: queue 0).
        """
        if fd is None or fd == self.fd:
            fd = self.fd
            native = self.native if self.capture is None or not self.capture.active else None
        else:  # another queue's fd (the flow cache's drain reads queue 0)
            native = None
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
            bump(self.counters, "drop_non_ipv4")
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
        bump(self.counters, f"dp_{self.iface}_read_errors")
        log.warning("read error on %s: %s", self.iface, exc)

    def send(self, pkt: bytes | bytearray, nexthop: Callable[[str, int], int], now: float,
             vh: bytes = b"") -> None:
        """Write one IPv4 packet (TAP: behind an Ethernet header, once the next hop is known).

        ``vh``: its virtio-net header in device-relative form (b"" for an
        ordinary packet; only meaningful on a device with headers).
        """
        l2 = self.l2
        fd = self.fd
        if self.native is not None and len(self.fds) > 1:
            # on the queue the packet that caused it came in on: tun's flow table then sends
            # the flow's replies to that queue, whose reader thread forwards them
            fd = self.fds[self.native.queue % len(self.fds)]
        try:
            if l2 is None:
                if self.vnet:
                    os.writev(fd, (vh or ZERO_VH, pkt))
                else:
                    os.write(fd, pkt)
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
                    os.writev(fd, (vh or ZERO_VH, hdr, pkt))
                else:
                    os.writev(fd, (hdr, pkt))
                if self.capture is not None and self.capture.active:
                    self.capture.record(self.iface, hdr + bytes(pkt))
            if l2.out or l2.out_offload:
                self.flush_l2()
        except OSError as exc:
            bump(self.counters, f"dp_{self.iface}_write_errors")
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
                    bump(self.counters, f"dp_{self.iface}_write_errors")
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
                bump(self.counters, f"dp_{self.iface}_write_errors")
                continue
            if cap is not None:
                cap.record(self.iface, frame)
