#!/usr/bin/env python3
"""End-to-end benchmark: masqd against the kernel's own nftables masquerade, same lab, one run.

Both routers sit between the same bridges: masqd in ``{p}-fw`` (10.0.0.1 /
203.0.113.200) and the kernel in ``{p}-kfw`` (10.0.0.254 / 203.0.113.201,
nftables masquerade). Each workload runs once through each router by switching
lan2's default route. Workloads (bounded: ``--seconds`` each):

- iperf3 TCP, 1 and 4 streams, lan2 -> srv1 (Gbit/s received)
- iperf3 UDP, 64-byte payloads at a fixed offered rate: delivered pps, loss,
  and masqd's CPU time per forwarded packet (utime+stime from /proc/PID/stat
  over the packets masqd forwarded; the kernel's forwarding runs in softirq
  and has no PID to charge, so only masqd's figure is given)
- ping at 100 Hz (low load): RTT median and p99; "added" = masqd - kernel;
  masqd's CPU share meanwhile

Usage (root): ``.venv/bin/python bench/e2e.py [--seconds 5] [--udp-pps 50000] [--mode tap|tun]
[--rps auto|off|MASK] [--napi off|threaded|adaptive] [--keep-warm S] [--coalesce S] [--fastpath native|python] [--no-offload] [--runs N] [--json]
[--record FILE [--label TEXT]]`` (with ``--json``, one object per run and line, each with the date, the
command line and the machine; ``--record`` adds the runs to a results file for docs/benchmark.md,
see ``bench/record.py``)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import record, stamp  # noqa: E402
from masqd.lab import FW_LAN, KFW_LAN, SRV1, Lab, MasqdProcess, stop_process  # noqa: E402


def iperf(lab: Lab, args: list[str], seconds: float) -> dict[str, Any]:
    cp = lab.exec("lan2", ["iperf3", "-c", SRV1, "-t", str(seconds), "-J", *args], check=False,
                  timeout=seconds + 30)
    try:
        return dict(json.loads(cp.stdout))
    except ValueError:
        return {"error": cp.stderr or cp.stdout}


def tcp_gbps(lab: Lab, streams: int, seconds: float) -> float:
    r = iperf(lab, ["-P", str(streams)], seconds)
    if "end" not in r:
        print(f"iperf3 TCP failed: {r.get('error')}", file=sys.stderr)
        return 0.0
    return float(r["end"]["sum_received"]["bits_per_second"]) / 1e9


def udp_small(lab: Lab, pps: int, seconds: float) -> dict[str, float]:
    size = 64
    r = iperf(lab, ["-u", "-l", str(size), "-b", str(pps * size * 8)], seconds)
    if "end" not in r:
        print(f"iperf3 UDP failed: {r.get('error')}", file=sys.stderr)
        return {"offered_pps": 0.0, "pps": 0.0, "loss_pct": 100.0, "sent": 0.0}
    s = r["end"]["sum"]
    sent = float(s.get("packets", 0))
    lost = float(s.get("lost_packets", 0))
    dur = float(s.get("seconds", seconds)) or seconds
    return {"offered_pps": sent / dur, "pps": (sent - lost) / dur,
            "loss_pct": float(s.get("lost_percent", 0.0)), "sent": sent}


def rtts(lab: Lab, count: int) -> list[float]:
    out = lab.exec("lan2", ["ping", "-n", "-i", "0.01", "-c", str(count), "-W", "1", SRV1], check=False,
                   timeout=count * 0.05 + 20).stdout
    return [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def proc_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def forwarded(snap: dict[str, Any]) -> int:
    c = snap["counters"]
    return int(c.get("rx_lan_udp_packets", 0)) + int(c.get("rx_wan_udp_packets", 0))


def run(args: argparse.Namespace) -> dict[str, Any]:
    lab = Lab(f"b{os.getpid()}"[:10], mode=args.mode)
    lab.down()
    res: dict[str, Any] = {**stamp(), "mode": args.mode, "seconds": args.seconds}
    m: MasqdProcess | None = None
    srv = None
    try:
        lab.up()
        lab.kernel_router_up()
        cfg = lab.masqd_config().replace("[metrics]\n", "[metrics]\nenabled = false\n")
        cfg += '\n[logging]\nlevel = "warning"\n'
        cfg += "\n[dataplane]\n"  # only what was asked for: masqd's own defaults otherwise
        for key, val in (("rps", args.rps), ("napi", args.napi), ("fastpath", args.fastpath)):
            if val is not None:
                cfg += f'{key} = "{val}"\n'
        for key, num in (("keep_warm", args.keep_warm), ("coalesce", args.coalesce)):
            if num is not None:
                cfg += f"{key} = {num}\n"
        if not args.offload:
            cfg = cfg.replace('bridge = "br-lan"\n', 'bridge = "br-lan"\noffload = false\n')
            cfg = cfg.replace('name = "tun-lan"\n', 'name = "tun-lan"\noffload = false\n')
        m = lab.start_masqd(cfg)
        srv = lab.popen("srv1", ["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        for name, gw in (("masqd", FW_LAN), ("kernel", KFW_LAN)):
            lab.use_gateway("lan2", gw)
            lab.exec("lan2", ["ping", "-c", "2", "-i", "0.2", "-W", "2", SRV1])  # warm ARP/NAT state
            res[f"tcp1_{name}_gbps"] = tcp_gbps(lab, 1, args.seconds)
            res[f"tcp4_{name}_gbps"] = tcp_gbps(lab, 4, args.seconds)
            if name == "masqd":
                snap0, t0 = m.snapshot(), proc_times(m.pid)
            u = udp_small(lab, args.udp_pps, args.seconds)
            if name == "masqd":
                snap1, t1 = m.snapshot(), proc_times(m.pid)
                fwd = forwarded(snap1) - forwarded(snap0)
                cpu = (t1[0] - t0[0]) + (t1[1] - t0[1])
                res["udp_small_masqd_forwarded"] = fwd
                res["udp_small_cpu_us_per_pkt"] = cpu / fwd * 1e6 if fwd else float("nan")
                res["udp_small_user_us_per_pkt"] = (t1[0] - t0[0]) / fwd * 1e6 if fwd else float("nan")
                res["udp_small_sys_us_per_pkt"] = (t1[1] - t0[1]) / fwd * 1e6 if fwd else float("nan")
                res["masqd_cpu_s_udp"] = cpu
                res["offload"] = snap1.get("offload")
                res["rps"] = snap1.get("rps")
                res["napi"] = snap1.get("napi")
                res["keep_warm"] = snap1.get("keep_warm")
                res["fastpath"] = snap1.get("fastpath")
                res["coalesce"] = snap1.get("coalesce")
                nat = [int(x["counters"].get("fastpath_native_packets", 0)) for x in (snap0, snap1)]
                res["udp_small_native_pct"] = (nat[1] - nat[0]) / fwd * 100 if fwd else float("nan")
            res[f"udp_small_{name}_offered_pps"] = u["offered_pps"]
            res[f"udp_small_{name}_pps"] = u["pps"]
            res[f"udp_small_{name}_loss_pct"] = u["loss_pct"]
            tp0, w0 = proc_times(m.pid), time.monotonic()
            r = rtts(lab, args.pings)
            if name == "masqd":  # what the 100 Hz ping costs masqd (keep_warm shows here)
                tp1 = proc_times(m.pid)
                res["rtt_masqd_cpu_pct"] = 100 * (sum(tp1) - sum(tp0)) / (time.monotonic() - w0)
            res[f"rtt_{name}_median_ms"] = statistics.median(r) if r else float("nan")
            res[f"rtt_{name}_p99_ms"] = pct(r, 99)
            res[f"rtt_{name}_samples"] = len(r)
        res["rtt_added_median_ms"] = res["rtt_masqd_median_ms"] - res["rtt_kernel_median_ms"]
        res["rtt_added_p99_ms"] = res["rtt_masqd_p99_ms"] - res["rtt_kernel_p99_ms"]
        res["masqd_errors"] = {k: v for k, v in m.snapshot()["counters"].items()
                               if ("error" in k or k.startswith("drop_engine")) and v}
    finally:
        if srv is not None:
            stop_process(srv)
        if m is not None:
            m.stop()
        lab.down()
    return res


def ratio(a: float, b: float) -> str:
    return f"{a / b:6.2f}" if b else "   n/a"


def table(r: dict[str, Any]) -> str:
    rows = [
        ("TCP 1 stream (Gbit/s)", r["tcp1_masqd_gbps"], r["tcp1_kernel_gbps"], "{:.3f}"),
        ("TCP 4 streams (Gbit/s)", r["tcp4_masqd_gbps"], r["tcp4_kernel_gbps"], "{:.3f}"),
        ("UDP 64 B offered (pps)", r["udp_small_masqd_offered_pps"], r["udp_small_kernel_offered_pps"], "{:.0f}"),
        ("UDP 64 B delivered (pps)", r["udp_small_masqd_pps"], r["udp_small_kernel_pps"], "{:.0f}"),
        ("UDP 64 B loss (%)", r["udp_small_masqd_loss_pct"], r["udp_small_kernel_loss_pct"], "{:.2f}"),
        ("RTT median (ms)", r["rtt_masqd_median_ms"], r["rtt_kernel_median_ms"], "{:.3f}"),
        ("RTT p99 (ms)", r["rtt_masqd_p99_ms"], r["rtt_kernel_p99_ms"], "{:.3f}"),
    ]
    out = [f"masqd vs kernel nftables masquerade ({r['mode']} mode, {r['seconds']} s per test)",
           f"{'workload':<26}{'masqd':>12}{'kernel':>12}{'ratio':>8}"]
    for name, a, b, fmt in rows:
        out.append(f"{name:<26}{fmt.format(a):>12}{fmt.format(b):>12}  {ratio(a, b)}")
    out.append(f"masqd CPU per forwarded small UDP packet: {r['udp_small_cpu_us_per_pkt']:.2f} us "
               f"(user {r['udp_small_user_us_per_pkt']:.2f}, system {r['udp_small_sys_us_per_pkt']:.2f}; "
               f"{r['udp_small_masqd_forwarded']} packets; offload {r.get('offload')}, rps {r.get('rps')}, napi {r.get('napi')}, keep_warm {r.get('keep_warm')}, "
               f"coalesce {r.get('coalesce')}, fastpath {r.get('fastpath')}: {r.get('udp_small_native_pct', float('nan')):.1f} % native)")
    out.append(f"RTT added by masqd at low load: median {r['rtt_added_median_ms']:+.3f} ms, "
               f"p99 {r['rtt_added_p99_ms']:+.3f} ms (masqd's CPU meanwhile: {r['rtt_masqd_cpu_pct']:.1f} %)")
    if r.get("masqd_errors"):
        out.append(f"masqd error counters: {r['masqd_errors']}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each iperf3 test (max 30)")
    p.add_argument("--udp-pps", type=int, default=50000, help="offered rate of the small-UDP test")
    p.add_argument("--pings", type=int, default=300, help="pings at 100 Hz for the RTT figures (max 2000)")
    p.add_argument("--mode", choices=["tap", "tun"], default="tap")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--rps", help="masqd's dataplane.rps: off, auto or a hex CPU mask (default: masqd's)")
    p.add_argument("--napi", choices=["off", "threaded", "adaptive"],
                   help="masqd's dataplane.napi (default: masqd's, adaptive)")
    p.add_argument("--fastpath", choices=("native", "python"),
                   help="masqd's dataplane.fastpath (python: every packet through the engine; default native)")
    p.add_argument("--coalesce", type=float, metavar="SECONDS",
                   help="masqd's dataplane.coalesce (interrupt moderation under load; 0: off; default 0.0005)")
    p.add_argument("--keep-warm", type=float, metavar="SECONDS",
                   help="masqd's dataplane.keep_warm (0 = off, the default)")
    p.add_argument("--no-offload", dest="offload", action="store_false", help="run masqd with offload = false")
    p.add_argument("--runs", type=int, default=1, help="repeat everything N times (max 10; a summary follows)")
    p.add_argument("--record", metavar="FILE",
                   help="also add the runs to this results file (bench/results/NAME.json; docs/benchmark.md)")
    p.add_argument("--label", help="the setting's name in docs/benchmark.md (default: the options given)")
    args = p.parse_args()
    args.seconds = min(max(args.seconds, 1.0), 30.0)
    args.pings = min(max(args.pings, 10), 2000)
    args.runs = min(max(args.runs, 1), 10)
    if os.geteuid() != 0:
        print("bench/e2e.py: needs root (network namespaces)", file=sys.stderr)
        return 1
    results = []
    for _ in range(args.runs):
        res = run(args)
        results.append(res)
        print(json.dumps(res, sort_keys=True) if args.json else table(res) + "\n", flush=True)
    if args.runs > 1 and not args.json:
        print(summary(results))
    if args.record:
        record(args.record, "e2e", args.label or default_label(args), results)
    return 0


def default_label(args: argparse.Namespace) -> str:
    """``defaults, TAP`` or the options that differ from masqd's defaults."""
    opts = [f"--{k.replace('_', '-')} {v}" for k, v in (("napi", args.napi), ("fastpath", args.fastpath),
            ("coalesce", args.coalesce), ("keep_warm", args.keep_warm), ("rps", args.rps)) if v is not None]
    opts += [] if args.offload else ["--no-offload"]
    return f"{' '.join(opts) or 'defaults'}, {args.mode.upper()}"


SUMMARY_KEYS = ("tcp1_masqd_gbps", "tcp1_kernel_gbps", "tcp4_masqd_gbps", "tcp4_kernel_gbps",
                "udp_small_cpu_us_per_pkt", "rtt_added_median_ms", "rtt_added_p99_ms")


def summary(results: list[dict[str, Any]]) -> str:
    """Min / median / max over the runs of the figures the offload issue asks for."""
    out = [f"over {len(results)} runs: {'figure':<26}{'min':>9}{'median':>9}{'max':>9}"]
    ratios = [r["tcp1_masqd_gbps"] / r["tcp1_kernel_gbps"] for r in results if r["tcp1_kernel_gbps"]]
    rows = [(k, [float(r[k]) for r in results]) for k in SUMMARY_KEYS] + [("tcp1 ratio", ratios)]
    for name, vals in rows:
        if vals:
            out.append(f"{'':<15}{name:<26}{min(vals):9.3f}{statistics.median(vals):9.3f}{max(vals):9.3f}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
