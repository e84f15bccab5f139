"""Packet capture: write what masqd reads and writes on each side as a pcap file.

Classic libpcap format (microsecond timestamps, native byte order written
explicitly as little-endian magic). The link type follows the device: TUN
carries bare IPv4 packets (LINKTYPE_RAW, 101) and TAP carries Ethernet frames
(LINKTYPE_ETHERNET, 1). tcpdump, tshark and Wireshark read it.

The data plane calls :meth:`Capture.record` only when ``Capture.active`` is
true, so an idle capture costs one attribute test per batch.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from typing import BinaryIO

from masqd.ops.metrics import OpsCounters

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
_MAGIC = 0xA1B2C3D4
_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")


def linktype_for_mode(mode: str) -> int:
    return LINKTYPE_ETHERNET if mode == "tap" else LINKTYPE_RAW


class PcapWriter:
    """Append-only pcap writer. ``snaplen`` bounds the bytes kept per packet."""

    def __init__(self, path: str, linktype: int, snaplen: int = 65535,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.linktype = linktype
        self.snaplen = snaplen
        self.clock = clock
        self.packets = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._f: BinaryIO | None = os.fdopen(fd, "wb", buffering=1 << 16)
        self._f.write(_GLOBAL.pack(_MAGIC, 2, 4, 0, 0, snaplen, linktype))

    def write(self, packet: bytes | bytearray | memoryview, ts: float | None = None) -> None:
        f = self._f
        if f is None:
            return
        t = self.clock() if ts is None else ts
        sec = int(t)
        usec = int((t - sec) * 1_000_000)
        n = len(packet)
        cap = min(n, self.snaplen)
        f.write(_RECORD.pack(sec, usec, cap, n))
        f.write(packet[:cap] if cap < n else packet)
        self.packets += 1

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    @property
    def closed(self) -> bool:
        return self._f is None


class Capture:
    """One optional writer per side ("lan", "wan"); what the data plane taps into."""

    def __init__(self, counters: OpsCounters | None = None, clock: Callable[[], float] = time.time) -> None:
        self.writers: dict[str, PcapWriter] = {}
        self.counters = counters if counters is not None else OpsCounters()
        self.clock = clock
        self.active = False

    def start(self, iface: str, path: str, mode: str) -> PcapWriter:
        if iface not in ("lan", "wan"):
            raise ValueError(f"interface must be lan or wan, not {iface!r}")
        self.stop(iface)
        w = PcapWriter(path, linktype_for_mode(mode), clock=self.clock)
        self.writers[iface] = w
        self.active = True
        return w

    def stop(self, iface: str | None = None) -> dict[str, int]:
        """Close one side (or both); returns packets written per closed side."""
        done: dict[str, int] = {}
        for name in [iface] if iface is not None else list(self.writers):
            w = self.writers.pop(name, None) if name is not None else None
            if w is not None and name is not None:
                w.close()
                done[name] = w.packets
        self.active = bool(self.writers)
        return done

    def record(self, iface: str, packet: bytes | bytearray | memoryview) -> None:
        w = self.writers.get(iface)
        if w is not None:
            w.write(packet)
            self.counters.bump(self.counters.capture_packets, iface)

    def flush(self) -> None:
        for w in self.writers.values():
            w.flush()

    def status(self) -> dict[str, dict[str, object]]:
        return {k: {"path": w.path, "packets": w.packets, "linktype": w.linktype}
                for k, w in self.writers.items()}
