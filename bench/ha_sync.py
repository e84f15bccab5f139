#!/usr/bin/env python3
"""What the active/backup sync costs the packet path: in-process, the same engine work with and
without an active masqd.ops.ha.HA subscribed to the change stream (batches turned into records,
JSON and HMAC'd datagrams, sent to a sink), and what the standby spends applying them.

Workloads (best of --runs, ns per packet; the batch sends are also timed on their own, which
reads better than a difference of two totals on a busy machine):
- new UDP sessions (each packet makes an entry: the sync's worst case), with the batch sent
  every 100 packets (about every 10 ms at 10 k new sessions/s);
- established UDP (no change: only the subscriber's "is there anything" costs).
Also: datagrams and bytes per new session on the sync link, and the standby's cost per record.
Usage: python bench/ha_sync.py [--sessions N] [--runs R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from scapy.all import IP, UDP, raw  # noqa: E402

from masqd.config import loads  # noqa: E402
from masqd.engine import Engine  # noqa: E402
from masqd.ops.ha import HA  # noqa: E402

CFG = """
[lan]
address = "10.0.0.1/8"
[wan]
address = "203.0.113.200/24"
gateway = "203.0.113.1"
[masquerade]
max_entries = 4000000
[ha]
listen = "10.254.0.1:7017"
peer = "10.254.0.2:7017"
"""


class Sink:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append(data)


class Log:
    def info(self, *a: Any, **k: Any) -> None: ...
    warning = error = info


def packets(n: int) -> list[bytes]:
    base = bytearray(raw(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=1, dport=53) / (b"x" * 64)))
    out = []
    for i in range(n):
        base[12:16] = (0x0A010000 + (i >> 12)).to_bytes(4, "big")
        base[20:22] = (20000 + (i & 0xFFF)).to_bytes(2, "big")
        base[10:12] = b"\0\0"
        out.append(bytes(base))
    return out


TICK = [0.0]  # seconds spent in the batch sends of the last run with sync


def run(n: int, sync: bool, established: bool) -> tuple[float, HA | None, Sink]:
    eng = Engine(loads(CFG))
    pk = packets(n)
    sink = Sink()
    ha = None
    if sync:
        ha = HA(eng, eng.cfg, b"k" * 32, clock=lambda: 1.0, set_active=lambda _a: None, sync=lambda: None,
                log=Log())
        ha.transport = sink  # type: ignore[assignment]
        ha.set_role("active", "bench")
    if established:
        for p in pk:
            eng.process("lan", p, 1.0)
        if ha is not None:
            ha.tick()
            sink.sent.clear()
    proc = eng.process
    t0 = time.perf_counter()
    if ha is not None:
        tick = ha.tick
        clock = time.perf_counter
        spent = 0.0
        for i, p in enumerate(pk):
            proc("lan", p, 1.0)
            if i % 100 == 99:
                t1 = clock()
                tick()
                spent += clock() - t1
        t1 = clock()
        tick()
        TICK[0] = spent + clock() - t1
    else:
        for p in pk:
            proc("lan", p, 1.0)
    return (time.perf_counter() - t0) / n * 1e9, ha, sink


def apply_cost(sink: Sink, n: int) -> float:
    """The standby: ns per record to check and apply the datagrams the active sent."""
    eng = Engine(loads(CFG.replace("10.254.0.2:7017", "X").replace("10.254.0.1:7017", "10.254.0.2:7017")
                       .replace("X", "10.254.0.1:7017")))
    b = HA(eng, eng.cfg, b"k" * 32, clock=lambda: 1.0, set_active=lambda _a: None, sync=lambda: None, log=Log())
    t0 = time.perf_counter()
    for d in sink.sent:
        b.received(d, ("10.254.0.1", 7017))
    dt = time.perf_counter() - t0
    assert len(eng.nat) == n, (len(eng.nat), n)
    return dt / n * 1e9


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res: dict[str, Any] = {"sessions": a.sessions}
    for name, est in (("new_sessions", False), ("established", True)):
        base: list[float] = []
        ticks: list[float] = []
        best: tuple[float, Any, Sink] | None = None
        for _ in range(a.runs):  # interleaved: a busy machine slows both alike
            base.append(run(a.sessions, False, est)[0])
            ns, ha, sink = run(a.sessions, True, est)
            if best is None or ns < best[0]:
                best = (ns, ha, sink)
            ticks.append(TICK[0] / a.sessions * 1e9)
        assert best is not None
        ns, _ha, sink = best
        b0 = min(base)
        res[name] = {"ns_per_packet_no_sync": round(b0), "ns_per_packet_sync": round(ns),
                     "sync_cost_ns": round(ns - b0), "sync_cost_pct": round((ns - b0) / b0 * 100, 1)}
        res[name]["batch_send_ns_per_packet"] = round(min(ticks))  # the sync's own work, timed directly
        if not est:
            res[name]["datagrams_per_session"] = round(len(sink.sent) / a.sessions, 3)
            res[name]["bytes_per_session"] = round(sum(map(len, sink.sent)) / a.sessions, 1)
            res[name]["standby_apply_ns_per_record"] = round(min(apply_cost(sink, a.sessions) for _ in range(2)))
    res["load_average"] = os.getloadavg()[0]
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
