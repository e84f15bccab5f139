#!/usr/bin/env python3
"""PPTP workload for bench/engine.py ("gre": an established PPTP call's GRE), and a standalone comparison.

bench/engine.py picks up ``WORKLOADS`` from this file. Run directly, it prints
ns/packet for an established enhanced-GRE call (set up through a real control
exchange on TCP 1723, Call ID masqueraded) against an established UDP flow
through ``Engine.process`` (same engine, interleaved rounds, best round kept)
and the ratio the PPTP brief bounds at 1.2.
Usage: python bench/workload_pptp.py [--iters N] [--rounds R]
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

from scapy.all import IP, TCP, UDP, raw  # noqa: E402

from masqd.config import loads  # noqa: E402
from masqd.engine import Engine  # noqa: E402
from masqd.wire import pptp as W  # noqa: E402
from masqd.wire.gre import build_pptp_gre  # noqa: E402

Flow = tuple[Callable[[], object], Callable[[], object]]
LAN, SRV, WAN = "10.0.0.2", "198.51.100.1", "203.0.113.200"


def gre_flow(eng: Engine) -> Flow:
    """10.0.0.2 places a call to 198.51.100.1 over TCP 1723; then GRE both ways, 32-byte PPP payload."""
    syn = raw(IP(src=LAN, dst=SRV) / TCP(sport=40000, dport=1723, flags="S", seq=0))
    o = eng.process("lan", syn, 1.0)
    wport = IP(o[0][1])[TCP].sport
    eng.process("wan", raw(IP(src=SRV, dst=WAN) / TCP(sport=1723, dport=wport, flags="SA", seq=0, ack=1)), 1.0)
    req = W.build(W.OUT_CALL_REQ, call_id=0x100)
    o = eng.process("lan", raw(IP(src=LAN, dst=SRV) / TCP(sport=40000, dport=1723, flags="PA", seq=1, ack=1) / req),
                    1.0)
    masq = int.from_bytes(bytes(IP(o[0][1])[TCP].payload)[12:14], "big")
    rep = W.build(W.OUT_CALL_REPLY, call_id=0x900, peer_call_id=masq)
    eng.process("wan", raw(IP(src=SRV, dst=WAN) / TCP(sport=1723, dport=wport, flags="PA", seq=1, ack=1 + len(req))
                           / rep), 1.0)
    ppp = b"\xff\x03\x00\x21" + b"g" * 28
    out_p = raw(IP(src=LAN, dst=SRV, proto=47) / build_pptp_gre(0x900, ppp, seq=1))
    in_p = raw(IP(src=SRV, dst=WAN, proto=47) / build_pptp_gre(masq, ppp, seq=1))
    for _ in range(2):  # the first pair takes the full path and caches the firewall decision
        if not eng.process("lan", out_p, 1.0) or not eng.process("wan", in_p, 1.0):
            raise RuntimeError("GRE flow did not establish")
    proc = eng.process
    return (lambda: proc("lan", out_p, 2.0)), (lambda: proc("wan", in_p, 2.0))


WORKLOADS: dict[str, tuple[str, Callable[[Engine], Flow]]] = {"gre": ("", gre_flow)}

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
    out_p = raw(IP(src=LAN, dst=SRV) / UDP(sport=5555, dport=53) / (b"q" * 32))
    o = eng.process("lan", out_p, 1.0)
    wport = IP(o[0][1])[UDP].sport
    in_p = raw(IP(src=SRV, dst=WAN) / UDP(sport=53, dport=wport) / (b"a" * 32))
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
    flows = {"udp": _udp_flow(eng), "gre": gre_flow(eng)}
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
        print(f"gre/udp {d:<12}{best[f'gre_{d}'] / best[f'udp_{d}']:>10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
