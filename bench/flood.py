#!/usr/bin/env python3
"""One LAN host floods masqd with new flows; what is left for another host's TCP and pings.

In the lab (TAP mode, the real masqd process, its default configuration), twice
for the same time: first quiet, then while lan2 sends UDP from random source
ports to random addresses of 198.18.0.0/15 as fast as one process can (every
packet a new flow; bounded by ``--count`` and the phase's time; or paced at
``--rate``), lan3 runs an
iperf3 TCP transfer to srv1 and pings srv1 every 20 ms. Reports lan3's
throughput and ping loss in both phases, the flood's rate, how many of its
packets masqd read (through its engine, or dropped before it: the host is over
its mapping rate), masqd's table and RSS after, and, where this masqd has
per-host limits (a ``drop_host_*`` counter in ``masqd stats``), what they
refused.

Then the same two phases through the kernel's own nftables masquerade in the
same lab (lan2 and lan3 routed through ``{p}-kfw``), the reference
(``--no-kernel``: without them).

Usage (root): ``.venv/bin/python bench/flood.py [--seconds 10] [--count 3000000] [--rate PPS]
[--quick] [--no-kernel] [--json FILE]`` (``--quick``: 5 s phases; ``--rate``: pace the flood, e.g. 50000 as
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
from masqd.lab import KFW_LAN, LAN2, SRV1, Lab, MasqdProcess, stop_process  # noqa: E402
from masqd.ops.control import request  # noqa: E402


def stats(lab: Lab) -> dict[str, Any]:
    return dict(request(f"/run/masqd/{lab.prefix}.sock", {"cmd": "stats"}))


def phase(lab: Lab, m: MasqdProcess | None, seconds: float, flood_count: int, rate: float = 0.0) -> dict[str, Any]:
    """lan3's iperf3 and pings for ``seconds``; with ``flood_count``, lan2's flood meanwhile.
    ``m``: masqd is the router (its counters are read); None: the kernel is."""
    c0 = stats(lab)["counters"] if m is not None else {}
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
    res: dict[str, Any] = {"tcp_gbps": round(tcp, 4), "ping": labkit.ping_summary(pout), "flood": flood}
    if m is None:
        return res
    s1 = stats(lab)
    c1 = s1["counters"]
    return {**res,
            "masqd_read_udp": int(c1.get("rx_lan_udp_packets", 0)) - int(c0.get("rx_lan_udp_packets", 0)),
            # (dropped where it was read, before the engine: a host over its mapping rate)
            "masqd_policed": (int(c1.get("drop_host_slowpath_limit", 0))
                              - int(c0.get("drop_host_slowpath_limit", 0))),
            "entries_after": s1["entries"], "rss_kib_after": labkit.rss_kib(m.pid),
            "drops": {k: int(v) - int(c0.get(k, 0)) for k, v in c1.items()
                      if k.startswith("drop_") and int(v) != int(c0.get(k, 0))}}


def run(seconds: float, count: int, rate: float = 0.0, kernel: bool = True) -> dict[str, Any]:
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
        if kernel:  # the same through the kernel's own masquerade (nftables, conntrack), same lab
            lab.kernel_router_up()
            for role in ("lan2", "lan3"):
                lab.use_gateway(role, KFW_LAN)
            lab.exec("lan3", ["ping", "-c", "3", "-i", "0.2", "-W", "2", SRV1])
            res["kernel_quiet"] = phase(lab, None, seconds, 0)
            res["kernel_flood"] = phase(lab, None, seconds, count, rate)
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
    kq, kf = r.get("kernel_quiet"), r.get("kernel_flood")
    cols = [("masqd quiet", q), ("masqd flood", f)] + ([("kernel quiet", kq), ("kernel flood", kf)] if kq else [])
    out = [f"lan3 beside lan2's flood of new flows ({r['seconds']:g} s each phase; TAP lab, masqd's defaults; "
           "the kernel's nftables masquerade in the same lab as the reference)",
           f"{'':<30}" + "".join(f"{name:>14}" for name, _ in cols),
           f"{'lan3 TCP (iperf3, Gbit/s)':<30}" + "".join(f"{c['tcp_gbps']:>14.3f}" for _, c in cols),
           f"{'lan3 pings lost (%)':<30}" + "".join(f"{c['ping']['loss_pct']:>14.1f}" for _, c in cols),
           f"{'lan3 pings sent':<30}" + "".join(f"{c['ping']['sent']:>14}" for _, c in cols),
           f"lan2's flood: {fl.get('sent', 0):,} packets in {fl.get('seconds', 0)} s ({fl.get('pps', 0):,} pps, "
           f"send errors {fl.get('errors', 0)}); masqd read {f['masqd_read_udp'] + f.get('masqd_policed', 0):,} "
           f"of them ({f.get('masqd_policed', 0):,} dropped before the engine, host over its mapping rate)"]
    if kf:
        kfl = kf["flood"]
        out.append(f"through the kernel: {kfl.get('sent', 0):,} packets in {kfl.get('seconds', 0)} s "
                   f"({kfl.get('pps', 0):,} pps)")
    out.append(f"masqd after the flood: {f['entries_after']:,} entries, RSS {f['rss_kib_after'] / 1024:.0f} MiB "
               f"(at start {r['rss_kib_start'] / 1024:.0f} MiB); drops: {f['drops'] or 'none'}")
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
    p.add_argument("--no-kernel", action="store_true", help="without the kernel's phases (the reference)")
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
    res = run(a.seconds, a.count, a.rate, not a.no_kernel)
    print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0 if res.get("masqd_alive") else 1


if __name__ == "__main__":
    sys.exit(main())
