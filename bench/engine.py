#!/usr/bin/env python3
"""In-process engine benchmark: packets per second through Engine.process.

Prints, for established UDP and TCP flows, ns per packet and packets per
second with 10 k and 1 M entries in the table, and the RSS cost per entry.
Other workloads (ESP, GRE, rule sets) register themselves in WORKLOADS.
Usage: python bench/engine.py [--quick] [--accounting] [--json] [--record FILE [--label TEXT]]
(``--accounting``: every engine with ``masquerade.accounting = true``; ``--json``
adds the date, the command line and the machine; ``--record`` adds the run to a results file
for docs/benchmark.md, see ``bench/record.py``)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from scapy.all import IP, TCP, UDP, raw  # noqa: E402

from bench.record import record, stamp  # noqa: E402
from masqd.config import loads  # noqa: E402
from masqd.engine import Engine  # noqa: E402
from masqd.wire.ipv4 import set_ip_checksum  # noqa: E402

BASE = """
[lan]
address = "10.0.0.1/8"
[wan]
address = "203.0.113.200/24"
gateway = "203.0.113.1"
[masquerade]
inbound_filtering = "endpoint-independent"
max_entries = 4000000
[limits]
host_mapping_rate = 0  # fill() makes 40,000 mappings of 10 hosts at once: no home host's rate
"""


PAIRED_ROUNDS = 6  # alternating rounds of the 10 k / big table comparison


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(eng: Engine, n: int) -> None:
    """n distinct UDP sessions: up to 40,000 LAN endpoints, each talking to several remote ports
    (one WAN address has only 64 k ports, so a million sessions share mappings)."""
    base = bytearray(raw(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=1, dport=53) / b"x"))
    for i in range(n):
        j = i % 40_000
        host = 0x0A010000 + (j >> 12)
        port = 20000 + (j & 0xFFF)
        base[12:16] = host.to_bytes(4, "big")
        base[20:22] = port.to_bytes(2, "big")
        base[22:24] = (1 + i // 40_000).to_bytes(2, "big")
        set_ip_checksum(base, 20)
        eng.process("lan", bytes(base), 1.0)


def time_loop(fn: Callable[[], object], n: int) -> float:
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e9


def udp_flow(eng: Engine) -> tuple[Callable[[], object], Callable[[], object]]:
    out_p = raw(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=5555, dport=53) / (b"q" * 32))
    o = eng.process("lan", out_p, 1.0)
    wport = IP(o[0][1])[UDP].sport
    in_p = raw(IP(src="198.51.100.1", dst="203.0.113.200") / UDP(sport=53, dport=wport) / (b"a" * 32))
    eng.process("wan", in_p, 1.0)
    proc = eng.process
    return (lambda: proc("lan", out_p, 2.0)), (lambda: proc("wan", in_p, 2.0))


def tcp_flow(eng: Engine) -> tuple[Callable[[], object], Callable[[], object]]:
    syn = raw(IP(src="10.0.0.2", dst="198.51.100.1") / TCP(sport=40000, dport=80, flags="S"))
    o = eng.process("lan", syn, 1.0)
    wport = IP(o[0][1])[TCP].sport
    eng.process("wan", raw(IP(src="198.51.100.1", dst="203.0.113.200") / TCP(sport=80, dport=wport, flags="SA")), 1.0)
    out_p = raw(IP(src="10.0.0.2", dst="198.51.100.1") / TCP(sport=40000, dport=80, flags="A") / (b"d" * 32))
    in_p = raw(IP(src="198.51.100.1", dst="203.0.113.200") / TCP(sport=80, dport=wport, flags="A") / (b"d" * 32))
    eng.process("lan", out_p, 1.0)
    eng.process("wan", in_p, 1.0)
    proc = eng.process
    return (lambda: proc("lan", out_p, 2.0)), (lambda: proc("wan", in_p, 2.0))


# name -> (extra config, flow builder). Helpers add their own workloads here.
WORKLOADS: dict[str, tuple[str, Callable[[Engine], tuple[Callable[[], object], Callable[[], object]]]]] = {
    "udp": ("", udp_flow),
    "tcp": ("", tcp_flow),
}


def compare_with_udp(name: str, build: Callable[[Engine], tuple[Callable[[], object], Callable[[], object]]],
                     argv: list[str] | None = None) -> int:
    """Print ns/packet of workload ``name`` against an established UDP flow in the same engine
    (interleaved rounds, best round kept) and their ratio. Used by the workload files when run directly."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    eng = Engine(loads(BASE))
    flows = {"udp": udp_flow(eng), name: build(eng)}
    best: dict[str, float] = {}
    for _ in range(max(1, a.rounds)):
        for fname, (fo, fi) in flows.items():
            for d, fn in (("out", fo), ("in", fi)):
                k = f"{fname}_{d}"
                best[k] = min(best.get(k, float("inf")), time_loop(fn, a.iters))
    print(f"{'established flow':<20}{'ns/pkt':>10}{'pkts/s':>14}")
    for k, v in best.items():
        print(f"{k:<20}{v:>10.0f}{1e9 / v:>14,.0f}")
    for d in ("out", "in"):
        print(f"{name}/udp {d:<12}{best[f'{name}_{d}'] / best[f'udp_{d}']:>10.2f}x")
    return 0


def _register_extra() -> None:
    here = os.path.dirname(__file__)
    for name in sorted(os.listdir(here)):
        if name.startswith("workload_") and name.endswith(".py"):
            ns: dict[str, object] = {}
            with open(os.path.join(here, name)) as f:
                exec(compile(f.read(), name, "exec"), ns)  # noqa: S102 - our own bench files
            extra = ns.get("WORKLOADS")
            if isinstance(extra, dict):
                WORKLOADS.update(extra)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="100 k entries instead of 1 M, fewer iterations")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--record", metavar="FILE",
                    help="also add this run to a results file (bench/results/NAME.json; docs/benchmark.md)")
    ap.add_argument("--label", help="the column's name in docs/benchmark.md (default: full or quick)")
    ap.add_argument("--accounting", action="store_true", help="per-entry packet/byte counters on")
    args = ap.parse_args()
    base = BASE + ("accounting = true\n" if args.accounting else "")
    _register_extra()
    iters = 50_000 if args.quick else 300_000
    big = 100_000 if args.quick else 1_000_000
    res: dict[str, float] = {}
    small: tuple[Callable[[], object], Callable[[], object]] | None = None
    for name, (extra, build) in WORKLOADS.items():
        eng = Engine(loads(base + extra))
        fill(eng, 10_000)
        out_fn, in_fn = build(eng)
        res[f"{name}_out_ns_10k"] = time_loop(out_fn, iters)
        res[f"{name}_in_ns_10k"] = time_loop(in_fn, iters)
        if name == "udp":
            small = (out_fn, in_fn)  # kept for the paired comparison with the big table below
    # 1 M entries: lookup cost and memory
    eng = Engine(loads(base))
    gc.collect()
    r0 = rss_bytes()
    fill(eng, big)
    gc.collect()
    r1 = rss_bytes()
    res["entries"] = eng.counters["sessions"]
    res["rss_bytes_per_entry"] = (r1 - r0) / max(1, eng.counters["sessions"])
    out_fn, in_fn = udp_flow(eng)
    res["udp_out_ns_big"] = time_loop(out_fn, iters)
    res["udp_in_ns_big"] = time_loop(in_fn, iters)
    # the scale figure: the same UDP flow in the 10 k and the big table, timed in alternating
    # rounds (best round of each), so that the machine's drift between two separate timings
    # does not pass for a cost of the table's size
    assert small is not None
    best_small = best_big = float("inf")
    for _ in range(PAIRED_ROUNDS):
        best_small = min(best_small, time_loop(small[0], iters // PAIRED_ROUNDS))
        best_big = min(best_big, time_loop(out_fn, iters // PAIRED_ROUNDS))
    res["big_over_10k"] = best_big / best_small
    t0 = time.perf_counter()
    eng.expire(1e6)
    res["expire_all_s"] = time.perf_counter() - t0
    figures = {k: round(v, 3) for k, v in res.items()}
    if args.record:
        record(args.record, "engine", args.label or ("quick" if args.quick else "full"), [{**stamp(), **figures}])
    if args.json:
        print(json.dumps({**stamp(), **figures}))
        return 0
    print(f"{'workload':<28}{'ns/pkt':>10}{'pkts/s':>14}")
    for k, v in res.items():
        if k.endswith(("_ns_10k", "_ns_big")):
            print(f"{k:<28}{v:>10.0f}{1e9 / v:>14,.0f}")
    print(f"entries in big table        {int(res['entries']):,}")
    print(f"RSS per entry               {res['rss_bytes_per_entry']:.0f} bytes")
    print(f"lookup cost big/10k         {res['big_over_10k']:.2f}x (UDP out, best of {PAIRED_ROUNDS} alternating rounds)")
    print(f"expire everything           {res['expire_all_s']:.2f} s")
    for k in list(res):
        if k.endswith("_out_ns_10k") and not k.startswith("udp"):
            print(f"{k[:-11]} vs udp (out)        {res[k] / res['udp_out_ns_10k']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
