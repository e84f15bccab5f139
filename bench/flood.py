#!/usr/bin/env python3
"""One LAN host floods masqd with new flows; what is left for another host's TCP and pings.

In the lab (TAP mode, the real masqd process, its default configuration), twice
for the same time: first quiet, then while lan2 sends UDP from random source
ports to random addresses of 198.18.0.0/15 as fast as one process can (every
packet a new flow; bounded by ``--count`` and the phase's time; or paced at
``--rate``), lan3 runs an
iperf3 TCP transfer to srv1 and pings srv1 every 20 ms. Reports lan3's
throughput and ping loss in both phases, the flood's rate, how many of its
packets masqd read, masqd's table and RSS after, and, where this masqd has
per-host limits (a ``drop_host_*`` counter in ``masqd stats``), what they
refused.

Usage (root): ``.venv/bin/python bench/flood.py [--seconds 10] [--count 3000000] [--rate PPS]
[--quick] [--json FILE]`` (``--quick``: 5 s phases; ``--rate``: pace the flood, e.g. 50000 as
tests/integration/test_flood.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import labkit  # noqa: E402
from bench.record import stamp  # noqa: E402
from masqd.lab import LAN2, SRV1, Lab, MasqdProcess, stop_process  # noqa: E402
from masqd.ops.control import request  # noqa: E402


def stats(lab: Lab) -> dict[str, Any]:
    return dict(request(f"/run/masqd/{lab.prefix}.sock", {"cmd": "stats"}))


def phase(lab: Lab, m: MasqdProcess, seconds: float, flood_count: int, rate: float = 0.0) -> dict[str, Any]:
    """lan3's iperf3 and pings for ``seconds``; with ``flood_count``, lan2's flood meanwhile."""
    c0 = stats(lab)["counters"]
    ping = lab.popen("lan3", ["ping", "-n", "-i", "0.02", "-W", "1", "-w", str(int(seconds)), SRV1],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    iperf = lab.popen("lan3", ["iperf3", "-c", SRV1, "-t", str(int(seconds)), "-J"], stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True)
    flood: dict[str, Any] = {}
    if flood_count:
        time.sleep(0.3)  # iperf3 has connected: the flood starts on a running transfer
        fl = labkit.start(lab, "lan2", labkit.FLOOD, LAN2, flood_count, max(1.0, seconds - 0.6), rate)
        flood = labkit.result(fl, seconds + 30)
    try:
        out, _ = iperf.communicate(timeout=seconds + 30)
        tcp = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    except (subprocess.TimeoutExpired, ValueError, KeyError):
        stop_process(iperf)
        tcp = 0.0
    try:
        pout, _ = ping.communicate(timeout=seconds + 10)
    except subprocess.TimeoutExpired:
        stop_process(ping)
        pout = ""
    s1 = stats(lab)
    c1 = s1["counters"]
    return {"tcp_gbps": round(tcp, 4), "ping": labkit.ping_summary(pout), "flood": flood,
            "masqd_read_udp": int(c1.get("rx_lan_udp_packets", 0)) - int(c0.get("rx_lan_udp_packets", 0)),
            "entries_after": s1["entries"], "rss_kib_after": labkit.rss_kib(m.pid),
            "drops": {k: int(v) - int(c0.get(k, 0)) for k, v in c1.items()
                      if k.startswith("drop_") and int(v) != int(c0.get(k, 0))}}


def run(seconds: float, count: int, rate: float = 0.0) -> dict[str, Any]:
    lab = Lab(f"fl{os.getpid()}"[:10], mode="tap")
    lab.down()
    res: dict[str, Any] = {**stamp(), "seconds": seconds, "count": count, "rate": rate,
                           "limits_key": labkit.host_limits_key()}
    m: MasqdProcess | None = None
    srv = None
    try:
        lab.up()
        m = lab.start_masqd(lab.masqd_config(extra='\n[logging]\nlevel = "warning"\n'))
        srv = lab.popen("srv1", ["iperf3", "-s"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        lab.exec("lan3", ["ping", "-c", "3", "-i", "0.2", "-W", "2", SRV1])
        res["rss_kib_start"] = labkit.rss_kib(m.pid)
        res["quiet"] = phase(lab, m, seconds, 0)
        res["flood"] = phase(lab, m, seconds, count, rate)
        counters = stats(lab)["counters"]
        res["host_limit_drops"] = labkit.host_limit_drops(counters)
        res["masqd_alive"] = m.proc.poll() is None
    finally:
        if srv is not None:
            stop_process(srv)
        if m is not None:
            m.stop()
        lab.down()
    return res


def table(r: dict[str, Any]) -> str:
    q, f = r["quiet"], r["flood"]
    fl = f["flood"]
    out = [f"lan3 beside lan2's flood of new flows ({r['seconds']:g} s each phase; TAP lab, masqd's defaults)",
           f"{'':<34}{'quiet':>12}{'flood':>12}",
           f"{'lan3 TCP (iperf3, Gbit/s)':<34}{q['tcp_gbps']:>12.3f}{f['tcp_gbps']:>12.3f}",
           f"{'lan3 pings lost (%)':<34}{q['ping']['loss_pct']:>12.1f}{f['ping']['loss_pct']:>12.1f}",
           f"{'lan3 pings sent':<34}{q['ping']['sent']:>12}{f['ping']['sent']:>12}",
           f"lan2's flood: {fl.get('sent', 0):,} packets in {fl.get('seconds', 0)} s ({fl.get('pps', 0):,} pps, "
           f"send errors {fl.get('errors', 0)}); masqd read {f['masqd_read_udp']:,} of them",
           f"masqd after the flood: {f['entries_after']:,} entries, RSS {f['rss_kib_after'] / 1024:.0f} MiB "
           f"(at start {r['rss_kib_start'] / 1024:.0f} MiB); drops: {f['drops'] or 'none'}"]
    if r["limits_key"]:
        out.append(f"per-host limits ({r['limits_key']}): refused {r['host_limit_drops'] or 'nothing'}")
    else:
        out.append("per-host limits: this masqd has none (no such configuration key)")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase (2-60)")
    p.add_argument("--count", type=int, default=3_000_000,
                   help="the flood's packets at most (the default outlasts the phase at this machine's rate)")
    p.add_argument("--rate", type=float, default=0.0, help="the flood's packets per second (0: as fast as it can)")
    p.add_argument("--quick", action="store_true", help="5 s phases")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = p.parse_args()
    if a.quick:
        a.seconds = 5.0
    a.seconds = min(max(a.seconds, 2.0), 60.0)
    a.count = min(max(a.count, 1000), 10_000_000)
    a.rate = max(a.rate, 0.0)
    if os.geteuid() != 0:
        print("bench/flood.py: needs root (network namespaces)", file=sys.stderr)
        return 1
    res = run(a.seconds, a.count, a.rate)
    print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0 if res.get("masqd_alive") else 1


if __name__ == "__main__":
    sys.exit(main())
