#!/usr/bin/env python3
"""IPsec workload for bench/engine.py ("esp": an established ESP pair), and a standalone comparison.

bench/engine.py picks up ``WORKLOADS`` from this file. Run directly, it prints
ns/packet for an established ESP pair against an established UDP flow
through ``Engine.process`` (same engine, same table, interleaved rounds,
best round kept) and the ratio the IPsec brief bounds at 1.2.
Usage: python bench/workload_ipsec.py [--iters N] [--rounds R]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

if "__file__" in globals():  # run directly (bench/engine.py execs this file with the path already set)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scapy.all import IP, raw  # noqa: E402
from scapy.layers.ipsec import ESP  # noqa: E402

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



if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from engine import compare_with_udp  # bench/engine.py

    raise SystemExit(compare_with_udp("esp", esp_flow))
