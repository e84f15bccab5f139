#!/usr/bin/env python3
"""In-process data-plane benchmark: the Python cost of one small packet from read to write.

Runs the real ``Dataplane``/``Port`` read and write path (TAP and TUN, with and
without virtio-net headers) around the real engine, with the device fd replaced
by an in-memory stand-in, so the figure is masqd's own Python work per packet
without the kernel's (the system calls themselves are not counted). The flow is
an established UDP flow LAN -> WAN with 64-byte payloads, as in bench/e2e.py.
Prints ns per packet for one packet per wake-up (low rate) and for batches of 64.
Usage: python bench/dataplane.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from scapy.all import IP, UDP, Ether, raw  # noqa: E402

from masqd.config import loads  # noqa: E402
from masqd.dataplane import port as pmod  # noqa: E402
from masqd.dataplane import router as rmod  # noqa: E402
from masqd.dataplane.device import Device  # noqa: E402
from masqd.dataplane.l2 import EthernetHost  # noqa: E402
from masqd.engine import Engine  # noqa: E402
from masqd.wire import vnet  # noqa: E402

CFG = """
[lan]
address = "10.0.0.1/8"
[wan]
address = "203.0.113.200/24"
gateway = "203.0.113.1"
"""
LAN_MAC = b"\x02\x00\x00\x00\x00\x01"
WAN_MAC = b"\x02\x00\x00\x00\x00\x02"
HOST_MAC = b"\x02\x00\x00\x00\x00\x0a"
GW_MAC = b"\x02\x00\x00\x00\x00\x0b"


class FakeOS:
    """``os`` for the port module: reads hand out the queued frames, writes are counted."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []
        self.written = 0

    def read(self, fd: int, n: int) -> bytes:
        if not self.queue:
            raise BlockingIOError
        return self.queue.pop()

    def write(self, fd: int, data: Any) -> int:
        self.written += 1
        return len(data)

    def writev(self, fd: int, bufs: Any) -> int:
        self.written += 1
        return 0


def build(mode: str, with_vnet: bool) -> tuple[rmod.Dataplane, bytes]:
    cfg = loads(CFG)
    eng = Engine(cfg)
    dp = rmod.Dataplane(cfg, eng)
    for side, mac, ip in (("lan", LAN_MAC, 0x0A000001), ("wan", WAN_MAC, 0xCB0071C8)):
        dev = Device(side, mode, 1500, None, False, None, fd=3, vnet=with_vnet)
        l2 = EthernetHost(side, mac, ip, 8 if side == "lan" else 24, dp.counters) if mode == "tap" else None
        dp.add_port(pmod.Port(side, dev, l2, dp.counters))
    pkt = raw(IP(src="10.0.0.2", dst="198.51.100.1", ttl=64) / UDP(sport=5000, dport=5201) / (b"x" * 64))
    if mode == "tap":
        wan_l2 = dp.ports["wan"].l2
        assert wan_l2 is not None
        arp_reply = raw(Ether(dst=WAN_MAC, src=GW_MAC, type=0x0806)) + (
            b"\x00\x01\x08\x00\x06\x04\x00\x02" + GW_MAC + bytes([203, 0, 113, 1]) + WAN_MAC
            + bytes([203, 0, 113, 200]))
        wan_l2.header(0xCB007101, pkt, 0.0)  # starts resolution
        wan_l2.rx(arp_reply, 0.0)
        wan_l2.out.clear()
        frame = LAN_MAC + HOST_MAC + b"\x08\x00" + pkt
    else:
        frame = pkt
    eng.process("lan", pkt, 0.0)  # the flow exists
    eng.process("wan", raw(IP(src="198.51.100.1", dst="203.0.113.200") / UDP(sport=5201, dport=5000) / b"r"),
                0.0)
    eng.process("lan", pkt, 0.0)  # its firewall decision is cached
    if with_vnet:
        q = bytearray(pkt)
        s = vnet.partial_seed(q, 20)
        q[26], q[27] = s >> 8, s & 0xFF  # a partial checksum, as a local sender with offload leaves it
        hdr = vnet.pack(vnet.F_NEEDS_CSUM, 0, 0, 0, 20 + (14 if mode == "tap" else 0), 6)
        frame = hdr + (frame[:-len(pkt)] + bytes(q) if mode == "tap" else bytes(q))
    return dp, frame


def run(mode: str, with_vnet: bool, batch: int, n: int = 100_000) -> float:
    dp, frame = build(mode, with_vnet)
    fake = FakeOS()
    real_os = pmod.os
    pmod.os = fake  # type: ignore[assignment]
    port = dp.ports["lan"]
    best = float("inf")
    try:
        for _ in range(5):
            wakeups = n // batch
            t0 = time.perf_counter()
            for _ in range(wakeups):
                fake.queue = [frame] * batch
                port.idle_at = -1.0 if batch == 1 else float("inf")  # low rate: one read; else batches
                dp._on_readable(port)
            dt = time.perf_counter() - t0
            best = min(best, dt / (wakeups * batch))
        assert fake.written >= n, (fake.written, dp.counters, dp.engine.counters)
    finally:
        pmod.os = real_os  # type: ignore[assignment]
    return best * 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res: dict[str, float] = {}
    for mode in ("tap", "tun"):
        for with_vnet in (True, False):
            for batch in (1, 64):
                key = f"{mode}_{'vnet' if with_vnet else 'plain'}_batch{batch}_ns"
                res[key] = run(mode, with_vnet, batch)
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        print("Python work per small packet, read to write (syscalls not included), best of 5:")
        for k, v in res.items():
            print(f"  {k:<28} {v:8.0f} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
