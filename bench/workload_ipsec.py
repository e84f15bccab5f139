#!/usr/bin/env python3
"""IPsec workload for bench/engine.py ("esp": an established ESP pair), and a standalone comparison.

bench/engine.py picks up ``WORKLOADS`` from this file. Run directly, it prints
ns/packet for an established ESP pair against an established UDP flow
through ``Engine.process`` (same engine, same table, interleaved rounds,
best round kept) and the ratio the IPsec brief bounds at 1.2.
Usage: python bench/workload_ipsec.py [--iters N] [--rounds R]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable

if "__file__" in globals():  # run directly (bench/engine.py execs this file with the path already set)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scapy.all import IP, UDP, raw  # noqa: E402
from scapy.layers.ipsec import ESP  # noqa: E402

from masqd.config import loads  # noqa: E402
from masqd.engine import Engine  # noqa: E402

Flow = tuple[Callable[[], object], Callable[[], object]]


def esp_flow(eng: Engine) -> Flow:
    """An established ESP pair 10.0.0.2 <-> 198.51.100.1, 32-byte payload like the UDP/TCP flows."""
    out_p = raw(IP(src="10.0.0.2", dst="198.51.100.1") / ESP(spi=0x1000, seq=1, data=b"e" * 32))
    in_p = raw(IP(src="198.51.100.1", dst="203.0.113.200") / ESP(spi=0x2000, seq=1, data=b"e" * 32))
    for _ in range(2):  # initial packet, reply (pairs), then once more each way to cache the firewall decision
        if not eng.process("lan", out_p, 1.0) or not eng.process("wan", in_p, 1.0):
            raise RuntimeError("ESP flow did not establish")
    proc = eng.process
    return (lambda: proc("lan", out_p, 2.0)), (lambda: proc("wan", in_p, 2.0))


WORKLOADS: dict[str, tuple[str, Callable[[Engine], Flow]]] = {"esp": ("", esp_flow)}

_BASE = """
[lan]
address = "10.0.0.1/8"
[wan]
address = "203.0.113.200/24"
gateway = "203.0.113.1"
[masquerade]
inbound_filtering = "endpoint-independent"
"""


def _udp_flow(eng: Engine) -> Flow:
    out_p = raw(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=5555, dport=53) / (b"q" * 32))
    o = eng.process("lan", out_p, 1.0)
    wport = IP(o[0][1])[UDP].sport
    in_p = raw(IP(src="198.51.100.1", dst="203.0.113.200") / UDP(sport=53, dport=wport) / (b"a" * 32))
    eng.process("wan", in_p, 1.0)
    eng.process("lan", out_p, 1.0)
    proc = eng.process
    return (lambda: proc("lan", out_p, 2.0)), (lambda: proc("wan", in_p, 2.0))


def _ns(fn: Callable[[], object], n: int) -> float:
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e9


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    eng = Engine(loads(_BASE))
    flows = {"udp": _udp_flow(eng), "esp": esp_flow(eng)}
    best: dict[str, float] = {}
    for _ in range(max(1, a.rounds)):
        for name, (fo, fi) in flows.items():
            for d, fn in (("out", fo), ("in", fi)):
                k = f"{name}_{d}"
                best[k] = min(best.get(k, float("inf")), _ns(fn, a.iters))
    print(f"{'established flow':<20}{'ns/pkt':>10}{'pkts/s':>14}")
    for k, v in best.items():
        print(f"{k:<20}{v:>10.0f}{1e9 / v:>14,.0f}")
    for d in ("out", "in"):
        print(f"esp/udp {d:<12}{best[f'esp_{d}'] / best[f'udp_{d}']:>10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
