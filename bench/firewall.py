#!/usr/bin/env python3
"""Firewall micro-benchmark: ns per Ruleset.evaluate on a 30-rule strict set.

Times are CPU time of this process (min of 7 runs), so a busy machine
skews them less. The set is the HOWTO's strict ipchains client rules (ppp0) plus its public
server rules (stand-in addresses): 30 rules over the three chains. Each case
is a packet that matches the first rule, the last rule, or no rule (policy);
one more case walks a user chain, and a last one scales to 300 rules.
Usage: python bench/firewall.py [--json] [--number N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from masqd.firewall import compile_text  # noqa: E402
from masqd.firewall.parse import Env  # noqa: E402

EX = Path(__file__).resolve().parents[1] / "config" / "examples"


def ip(s: str) -> int:
    a, b, c, d = (int(x) for x in s.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def build(text: str):  # type: ignore[no-untyped-def]
    rs, errors = compile_text(text, "bench", Env(lan_ip=ip("10.0.0.1"), wan_ip=ip("203.0.113.200")))
    if errors:
        raise SystemExit("\n".join(errors))
    return rs


def time_call(fn, args: tuple, number: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(7):
        t0 = time.process_time_ns()
        for _ in range(number):
            fn(*args)
        best = min(best, (time.process_time_ns() - t0) / number)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--number", type=int, default=100_000)
    a = ap.parse_args()
    text = (EX / "client-strict-ipchains-ppp0.rules").read_text() + (EX / "server-public-ipchains.rules").read_text()
    text = "\n".join(ln for ln in text.splitlines() if "forward ACCEPT" not in ln and "-j MASQ -s 10.0.0.0/8" not in ln)
    rs = build(text)
    nrules = sum(len(c.rules) for c in rs.chains.values())
    wan, srv, host = ip("203.0.113.200"), ip("198.51.100.1"), ip("10.0.0.2")
    cases = {
        "input first rule (LAN)": ("input", "lan", 6, host, srv, 1025, 1723, 0),
        "input last rule (GRE from client .3)": ("input", "wan", 47, ip("198.51.100.3"), ip("198.18.0.2"), 0, 0, 0),
        "input no match -> policy": ("input", "wan", 6, ip("8.8.8.8"), wan, 80, 1025, 0),
        "forward MASQ ESP (2nd rule)": ("forward", "wan", 50, host, srv, 0, 0, 0),
        "forward no match -> policy": ("forward", "wan", 6, ip("10.0.0.3"), srv, 1025, 80, 1),
        "output no match -> policy": ("output", "wan", 17, wan, ip("8.8.8.8"), 1024, 53, 0),
    }
    results: dict[str, float] = {}
    number = a.number
    for name, args in cases.items():
        results[name] = time_call(rs.evaluate, args, number)
    # direct evaluator (what an engine can bind once per build)
    f = rs.evaluator("input")
    results["input no match, bound evaluator"] = time_call(f, cases["input no match -> policy"][1:], number)
    # a user chain: the general walker
    walker = build("ipchains -N vpn\n" + "\n".join(
        f"ipchains -A vpn -p udp -s 198.51.100.{i} 500 -j ACCEPT" for i in range(1, 9)
    ) + "\nipchains -A input -i wan -j vpn\nipchains -A input -p tcp -j DENY\n")
    results["user chain walk, 10 rules, policy"] = time_call(
        walker.evaluate, ("input", "wan", 17, ip("198.51.100.200"), wan, 500, 500, 0), number // 4)
    big = build("\n".join(f"ipchains -A input -p tcp -s 198.51.{i // 250}.{i % 250} 22 -j ACCEPT" for i in range(300)))
    results["300 rules, no match"] = time_call(
        big.evaluate, ("input", "wan", 6, ip("8.8.8.8"), wan, 22, 1025, 0), number // 10)
    t0 = time.perf_counter()
    for _ in range(20):
        build(text)
    build_us = (time.perf_counter() - t0) / 20 * 1e6
    if a.json:
        print(json.dumps({"rules": nrules, "ns_per_evaluate": results, "build_us": build_us}, indent=1))
        return
    print(f"strict set: {nrules} rules; build (parse + compile) {build_us:,.0f} us")
    for name, ns in results.items():
        print(f"{ns:8.0f} ns  {name}")


if __name__ == "__main__":
    main()
