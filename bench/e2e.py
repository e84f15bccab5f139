#!/usr/bin/env python3
"""End-to-end benchmark: masqd against the kernel's own nftables masquerade, same lab, one run.

Both routers sit between the same bridges: masqd in ``{p}-fw`` (10.0.0.1 /
203.0.113.200) and the kernel in ``{p}-kfw`` (10.0.0.254 / 203.0.113.201,
nftables masquerade). Each workload runs once through each router by switching
lan2's default route. Workloads (bounded: ``--seconds`` each):

- iperf3 TCP, 1 and 4 streams, lan2 -> srv1 (Gbit/s received)
- small packets (92-byte IPv4 packets: UDP with 64 bytes of payload, raw ESP,
  PPTP's enhanced GRE), from bench/pktgen.c (built here with cc) in lan2 to a
  counter in srv1:
  - at a fixed offered rate (``--udp-pps``): delivered pps, loss, and the CPU
    per forwarded packet. masqd's own (utime+stime of its process, /proc/PID/stat)
    and, for both routers alike, the machine's kernel time (system + irq +
    softirq from /proc/stat, less what the same span of idle before the test
    took) per packet; for masqd that plus its user time. The kernel router has
    no process to charge, so the system-wide figure is the like-with-like one:
    ``*_vs_kernel`` is masqd's over the kernel's.
  - the highest rate forwarded with less than 0.1 % loss: doubling from
    ``--search-from`` then halving the interval (a failed rate is tried once more), trials of ``--trial`` seconds,
    at most ``--trials`` of them per router and workload (ESP and GRE: each
    with its own search).
  masqd's ESP pair is set up by one packet out and the peer's reply; its PPTP
  call by a control exchange on TCP 1723 (a stand-in server in srv1); the
  kernel forwards both by address (nftables masquerade), as its reference.
- ping at 100 Hz (low load), ``--pings`` per router in 4 blocks, the routers in
  turns (masqd, kernel, masqd, ...: bursts of the machine's own noise fall on
  both alike): RTT median and p99; "added" = masqd - kernel; masqd's CPU share
  meanwhile

Usage (root): ``.venv/bin/python bench/e2e.py [--seconds 5] [--udp-pps 50000] [--mode tap|tun]
[--rps auto|off|MASK] [--napi off|threaded|adaptive] [--keep-warm S] [--coalesce S] [--fastpath native|python]
[--queues N] [--no-offload] [--floor] [--no-search] [--runs N] [--json] [--record FILE [--label TEXT]] [--plot FILE.svg]``
(with ``--json``, one object per run and line, each with the date, the command line and the machine;
``--record`` adds the runs to a results file for docs/benchmark.md, see ``bench/record.py``;
``--plot`` draws the runs with matplotlib, the bench extra: ``bench/e2e.py --plot F.svg --from
bench/results/NAME.json`` draws a results file without running anything)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cbuild import compiled  # noqa: E402
from bench.floor import FLOOR_LAN, Floor  # noqa: E402
from bench.record import record, stamp  # noqa: E402
from masqd.lab import FW_LAN, FW_WAN, KFW_LAN, SRV1, Lab, MasqdProcess, stop_process  # noqa: E402

SMALL = 64  # UDP payload of the small-packet workloads: 92-byte IPv4 packets for all three
IP_PAYLOAD = {"udp": SMALL, "esp": SMALL + 8, "gre": SMALL + 8}
ESP_SPI_OUT, ESP_SPI_IN = 0x6B000001, 0x6B000002
GRE_SERVER_CALL = 0x4711  # the stand-in PPTP server's Call ID: the key of lan2's GRE
UDP_PORT = 5999
LOSS_OK = 0.1  # %: "without loss" in the search
WORKLOADS = ("udp", "esp", "gre")
RTT_BLOCKS = 4  # the pings go through masqd and the kernel in turns of this many blocks each


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


def build_pktgen() -> str:
    """bench/pktgen.c compiled once per version of its source (in the temporary directory)."""
    return compiled("pktgen.c")


def steal_ticks() -> tuple[int, int]:
    """(steal, all) of the whole machine in clock ticks: the time the hypervisor gave elsewhere."""
    with open("/proc/stat", encoding="ascii") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[7], sum(v[:8])


def proc_stat() -> tuple[float, float]:
    """(kernel time: system + irq + softirq, all time) of the whole machine, in CPU seconds."""
    with open("/proc/stat", encoding="ascii") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    tck = os.sysconf("SC_CLK_TCK")
    return (v[2] + v[5] + v[6]) / tck, sum(v[:8]) / tck


def arg_of(proto: str) -> int:
    return {"udp": UDP_PORT, "esp": ESP_SPI_OUT, "gre": GRE_SERVER_CALL}[proto]


def trial(lab: Lab, gen: str, proto: str, rate: float, seconds: float) -> dict[str, float]:
    """One bounded send from lan2 to srv1 at ``rate``: sent, received, loss %, delivered pps."""
    recv = lab.popen("srv1", [gen, "recv", proto, f"{seconds + 1.0:.3f}", str(UDP_PORT)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None
        ready = select.select([recv.stdout], [], [], 10)[0] and recv.stdout.readline().strip() == "ready"
        if not ready:
            raise RuntimeError(f"pktgen recv did not start: {recv.stderr.read() if recv.stderr else ''}")
        cp = lab.exec("lan2", [gen, "send", proto, SRV1, f"{rate:.0f}", f"{seconds:.3f}", str(IP_PAYLOAD[proto]),
                               str(arg_of(proto))], check=False, timeout=seconds + 20)
        out, _err = recv.communicate(timeout=seconds + 20)
    finally:
        stop_process(recv)
    try:
        sent = json.loads(cp.stdout.strip().splitlines()[-1])
        got = int(json.loads(out.strip().splitlines()[-1])["received"])
    except (ValueError, IndexError, KeyError):
        print(f"pktgen {proto} failed: {cp.stderr.strip()}", file=sys.stderr)
        return {"sent": 0.0, "received": 0.0, "loss_pct": 100.0, "pps": 0.0, "offered_pps": 0.0}
    n, dur = float(sent["sent"]), float(sent["seconds"]) or seconds
    return {"sent": n, "received": float(got), "loss_pct": 100.0 * (n - got) / n if n else 100.0,
            "pps": got / dur, "offered_pps": n / dur}


def fixed_rate(lab: Lab, gen: str, proto: str, rate: float, seconds: float, pid: int | None
               ) -> dict[str, float]:
    """A send at ``rate`` with the CPU it cost: the machine's kernel time (less what the same span
    of idle just before took) per delivered packet, and for a router process (masqd, the floor
    relay: ``pid``) its user and system time per packet (its user time added to the kernel time:
    the like-with-like total)."""
    k0, _ = proc_stat()
    time.sleep(1.0)
    k1, _ = proc_stat()
    idle_rate = k1 - k0  # kernel seconds per second with no traffic (other work on the machine)
    t0 = proc_times(pid) if pid is not None else (0.0, 0.0)
    s0, w0 = proc_stat()[0], time.monotonic()
    r = trial(lab, gen, proto, rate, seconds)
    s1, w1 = proc_stat()[0], time.monotonic()
    t1 = proc_times(pid) if pid is not None else (0.0, 0.0)
    got = r["received"] or float("nan")
    ksys = max(0.0, (s1 - s0) - idle_rate * (w1 - w0))
    r["sys_us_per_pkt"] = ksys / got * 1e6
    if pid is not None:
        r["proc_user_us_per_pkt"] = (t1[0] - t0[0]) / got * 1e6
        r["proc_sys_us_per_pkt"] = (t1[1] - t0[1]) / got * 1e6
        r["total_us_per_pkt"] = r["sys_us_per_pkt"] + r["proc_user_us_per_pkt"]
    else:
        r["total_us_per_pkt"] = r["sys_us_per_pkt"]
    return r


def max_rate(lab: Lab, gen: str, proto: str, start: float, seconds: float, trials: int) -> dict[str, float]:
    """The highest offered rate delivered with less than LOSS_OK % loss: doubling from ``start``
    while it holds, then bisecting; a rate that fails is tried once more before it counts as
    failed; at most ``trials`` sends. Returns the rate, the pps it
    delivered there and the trials made."""
    good, bad, n = 0.0, 0.0, 0
    good_pps = 0.0
    rate = start
    retried = -1.0
    while n < trials:
        r = trial(lab, gen, proto, rate, seconds)
        n += 1
        if r["sent"] and r["loss_pct"] < LOSS_OK and r["offered_pps"] >= 0.9 * rate:
            good, good_pps = rate, r["pps"]
        elif retried != rate and n < trials:
            # a rate fails only when it fails twice: one trial with a burst of loss from something
            # else on the machine once sent the kernel's search down to 2 000 pps
            retried = rate
            continue
        else:
            bad = rate
        if not bad:
            rate *= 2
        elif not good:
            rate /= 4
        elif bad / good < 1.08:
            break
        else:
            rate = (good + bad) / 2
    return {"max_pps": good_pps, "max_offered": good, "trials": float(n)}


def forwarded(snap: dict[str, Any]) -> int:
    c = snap["counters"]
    return int(c.get("rx_lan_udp_packets", 0)) + int(c.get("rx_wan_udp_packets", 0))


PPTP_SERVER = r"""
import socket, struct, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 1723)); s.listen(4)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
s.settimeout(max(0.1, end - time.monotonic()))
conns = []
while time.monotonic() < end:
    try:
        c, _ = s.accept()
    except OSError:
        break
    req = c.recv(4096)
    masq = struct.unpack_from("!H", req, 12)[0]  # Outgoing-Call-Request: the caller's (masqueraded) Call ID
    rep = bytearray(32)
    struct.pack_into("!HHIHH", rep, 0, 32, 1, 0x1A2B3C4D, 8, 0)
    struct.pack_into("!HHBB", rep, 12, int(sys.argv[2]), masq, 1, 0)
    c.sendall(bytes(rep))
    conns.append(c)
time.sleep(max(0.0, end - time.monotonic()))
"""

PPTP_CLIENT = r"""
import socket, struct, sys, time
c = socket.create_connection((sys.argv[1], 1723), timeout=5)
req = bytearray(168)
struct.pack_into("!HHIHH", req, 0, 168, 1, 0x1A2B3C4D, 7, 0)
struct.pack_into("!H", req, 12, 0x100)
c.sendall(bytes(req))
rep = c.recv(4096)
ok = len(rep) >= 17 and rep[16] == 1 and struct.unpack_from("!H", rep, 14)[0] == 0x100  # its own ID back
print("up" if ok else "refused", flush=True)
time.sleep(float(sys.argv[2]))
"""


def vpn_setup(lab: Lab, gen: str, hold: float) -> list[subprocess.Popen[Any]]:
    """masqd's ESP pair (one packet out, the peer's reply) and a PPTP call (a control exchange on
    TCP 1723 with a stand-in server in srv1), kept up for ``hold`` seconds."""
    procs: list[subprocess.Popen[Any]] = []
    lab.exec("lan2", [gen, "send", "esp", SRV1, "100", "0.05", str(IP_PAYLOAD["esp"]), str(ESP_SPI_OUT)])
    lab.exec("srv1", [gen, "send", "esp", FW_WAN, "100", "0.05", str(IP_PAYLOAD["esp"]), str(ESP_SPI_IN)])
    srv = lab.popen("srv1", [sys.executable, "-c", PPTP_SERVER, str(hold), str(GRE_SERVER_CALL)],
                    stdout=subprocess.PIPE, text=True)
    procs.append(srv)
    assert srv.stdout is not None
    if not (select.select([srv.stdout], [], [], 10)[0] and srv.stdout.readline().strip() == "ready"):
        raise RuntimeError("the stand-in PPTP server did not start")
    cli = lab.popen("lan2", [sys.executable, "-c", PPTP_CLIENT, SRV1, str(hold)], stdout=subprocess.PIPE, text=True)
    procs.append(cli)
    assert cli.stdout is not None
    if not (select.select([cli.stdout], [], [], 10)[0] and cli.stdout.readline().strip() == "up"):
        raise RuntimeError("the PPTP call did not come up through masqd")
    return procs


def run(args: argparse.Namespace) -> dict[str, Any]:
    lab = Lab(f"b{os.getpid()}"[:10], mode=args.mode)
    lab.down()
    gen = build_pktgen()
    res: dict[str, Any] = {**stamp(), "mode": args.mode, "seconds": args.seconds}
    steal0 = steal_ticks()
    m: MasqdProcess | None = None
    srv = None
    vpn: list[subprocess.Popen[Any]] = []
    try:
        lab.up()
        lab.kernel_router_up()
        cfg = lab.masqd_config().replace("[metrics]\n", "[metrics]\nenabled = false\n")
        cfg += '\n[logging]\nlevel = "warning"\n'
        cfg += "\n[dataplane]\n"  # only what was asked for: masqd's own defaults otherwise
        for key, val in (("rps", args.rps), ("napi", args.napi), ("fastpath", args.fastpath)):
            if val is not None:
                cfg += f'{key} = "{val}"\n'
        for key, num in (("keep_warm", args.keep_warm), ("coalesce", args.coalesce), ("queues", args.queues)):
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
                vpn = vpn_setup(lab, gen, 3600)
            mm = m.pid if name == "masqd" else None
            for proto in WORKLOADS:
                trial(lab, gen, proto, 2000, 0.2)  # the flow's first packets: session and cache
                if name == "masqd" and proto == "udp":
                    snap0 = m.snapshot()
                f = fixed_rate(lab, gen, proto, args.udp_pps, args.seconds, mm)
                pre = f"udp_small_{name}" if proto == "udp" else f"{proto}_{name}"
                res[f"{pre}_offered_pps"] = f["offered_pps"]
                res[f"{pre}_pps"] = f["pps"]
                res[f"{pre}_loss_pct"] = f["loss_pct"]
                res[f"{pre}_sys_us_per_pkt"] = f["sys_us_per_pkt"]
                res[f"{pre}_total_us_per_pkt"] = f["total_us_per_pkt"]
                if name == "masqd":
                    res[f"{pre}_proc_us_per_pkt"] = f["proc_user_us_per_pkt"] + f["proc_sys_us_per_pkt"]
                if name == "masqd" and proto == "udp":
                    snap1 = m.snapshot()
                    fwd = forwarded(snap1) - forwarded(snap0)
                    res["udp_small_masqd_forwarded"] = fwd
                    res["udp_small_cpu_us_per_pkt"] = f["proc_user_us_per_pkt"] + f["proc_sys_us_per_pkt"]
                    res["udp_small_user_us_per_pkt"] = f["proc_user_us_per_pkt"]
                    res["udp_small_sys_us_per_pkt"] = f["proc_sys_us_per_pkt"]
                    for k in ("offload", "rps", "napi", "keep_warm", "fastpath", "coalesce"):
                        res[k] = snap1.get(k)
                    res["queues"] = snap1.get("queues")
                    nat = [int(x["counters"].get("fastpath_native_packets", 0)) for x in (snap0, snap1)]
                    res["udp_small_native_pct"] = (nat[1] - nat[0]) / fwd * 100 if fwd else float("nan")
                if args.search:
                    mr = max_rate(lab, gen, proto, args.search_from, args.trial, args.trials)
                    res[f"{proto}_max_{name}_pps"] = mr["max_pps"]
                    res[f"{proto}_max_{name}_trials"] = mr["trials"]
        if args.floor:
            floor_run(lab, gen, args, res)
        rtt_blocks(lab, m, args.pings, res)
        derive(res)
        res["masqd_errors"] = {k: v for k, v in m.snapshot()["counters"].items()
                               if ("error" in k or k.startswith("drop_engine")) and v}
        res["loadavg"] = os.getloadavg()[0]
        steal1 = steal_ticks()  # a noisy machine: its bursts land in the tails and the searches
        res["steal_pct"] = 100 * (steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1])
    finally:
        for pr in vpn:
            stop_process(pr)
        if srv is not None:
            stop_process(srv)
        if m is not None:
            m.stop()
        lab.down()
    return res


def floor_run(lab: Lab, gen: str, args: argparse.Namespace, res: dict[str, Any]) -> None:
    """``--floor``: TCP 1 and 4 streams and the small UDP packets (fixed rate, search) through
    the TUN/TAP floor relay (bench/floor.py), its process's CPU per packet measured as masqd's."""
    fl = Floor(lab)
    try:
        fl.start()
        lab.use_gateway("lan2", FLOOR_LAN)
        lab.exec("lan2", ["ping", "-c", "2", "-i", "0.2", "-W", "2", SRV1])
        fl.napi(False)  # as masqd's adaptive NAPI under bulk TCP
        res["tcp1_floor_gbps"] = tcp_gbps(lab, 1, args.seconds)
        res["tcp4_floor_gbps"] = tcp_gbps(lab, 4, args.seconds)
        fl.napi(True)  # ... and under small packets
        trial(lab, gen, "udp", 2000, 0.2)
        f = fixed_rate(lab, gen, "udp", args.udp_pps, args.seconds, fl.pid)
        for k in ("offered_pps", "pps", "loss_pct", "sys_us_per_pkt", "total_us_per_pkt"):
            res[f"udp_small_floor_{k}"] = f[k]
        res["udp_small_floor_user_us_per_pkt"] = f["proc_user_us_per_pkt"]
        res["udp_small_floor_cpu_us_per_pkt"] = f["proc_user_us_per_pkt"] + f["proc_sys_us_per_pkt"]
        if args.search:
            mr = max_rate(lab, gen, "udp", args.search_from, args.trial, args.trials)
            res["udp_max_floor_pps"] = mr["max_pps"]
            res["udp_max_floor_trials"] = mr["trials"]
    finally:
        lab.use_gateway("lan2", FW_LAN)
        res["floor_relay"] = fl.stop()


def derive(res: dict[str, Any]) -> None:
    """The ratios the performance goals are stated in."""
    def q(a: str, b: str) -> float:
        x, y = res.get(a), res.get(b)
        return x / y if isinstance(x, int | float) and isinstance(y, int | float) and y else float("nan")

    res["rtt_added_median_ms"] = res["rtt_masqd_median_ms"] - res["rtt_kernel_median_ms"]
    res["rtt_added_p99_ms"] = res["rtt_masqd_p99_ms"] - res["rtt_kernel_p99_ms"]
    res["tcp1_ratio"] = q("tcp1_masqd_gbps", "tcp1_kernel_gbps")
    res["tcp4_ratio"] = q("tcp4_masqd_gbps", "tcp4_kernel_gbps")
    res["udp_small_cpu_vs_kernel"] = q("udp_small_masqd_total_us_per_pkt", "udp_small_kernel_total_us_per_pkt")
    for proto in WORKLOADS:
        res[f"{proto}_max_ratio"] = q(f"{proto}_max_masqd_pps", f"{proto}_max_kernel_pps")
    for proto in ("esp", "gre"):  # VPN paths against plain UDP through masqd: rate and CPU
        res[f"{proto}_max_vs_udp"] = q(f"{proto}_max_masqd_pps", "udp_max_masqd_pps")
        res[f"{proto}_cpu_vs_udp"] = q(f"{proto}_masqd_total_us_per_pkt", "udp_small_masqd_total_us_per_pkt")
    if "tcp1_floor_gbps" in res:  # --floor: the TUN/TAP floor against the kernel, masqd against the floor
        for t in ("tcp1", "tcp4"):
            res[f"{t}_floor_ratio"] = q(f"{t}_floor_gbps", f"{t}_kernel_gbps")
            res[f"{t}_masqd_vs_floor"] = q(f"{t}_masqd_gbps", f"{t}_floor_gbps")
        res["udp_small_masqd_over_floor_us"] = res["udp_small_cpu_us_per_pkt"] - res["udp_small_floor_cpu_us_per_pkt"]
        res["udp_max_floor_ratio"] = q("udp_max_floor_pps", "udp_max_kernel_pps")


def rtt_blocks(lab: Lab, m: MasqdProcess, pings: int, res: dict[str, Any]) -> None:
    """Ping at 100 Hz through each router in turn, RTT_BLOCKS blocks each, alternating: a tail of
    a few milliseconds comes from the machine (steal time, other work) in bursts, and blocks in
    turn give both routers the same share of them. Median and p99 over all of a router's pings,
    and what the pings cost masqd's process."""
    per = max(1, pings // RTT_BLOCKS)
    got: dict[str, list[float]] = {"masqd": [], "kernel": []}
    cpu = span = 0.0
    for _ in range(RTT_BLOCKS):
        for name, gw in (("masqd", FW_LAN), ("kernel", KFW_LAN)):
            lab.use_gateway("lan2", gw)
            lab.exec("lan2", ["ping", "-c", "2", "-i", "0.2", "-W", "2", SRV1])  # the new route in use
            tp0, w0 = proc_times(m.pid), time.monotonic()
            got[name] += rtts(lab, per)
            if name == "masqd":  # what the 100 Hz ping costs masqd (keep_warm shows here)
                cpu += sum(proc_times(m.pid)) - sum(tp0)
                span += time.monotonic() - w0
    res["rtt_masqd_cpu_pct"] = 100 * cpu / span if span else float("nan")
    for name, r in got.items():
        res[f"rtt_{name}_median_ms"] = statistics.median(r) if r else float("nan")
        res[f"rtt_{name}_p99_ms"] = pct(r, 99)
        res[f"rtt_{name}_samples"] = len(r)


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


def ratio(a: float, b: float) -> str:
    return f"{a / b:6.2f}" if b else "   n/a"


def table(r: dict[str, Any]) -> str:
    rows = [
        ("TCP 1 stream (Gbit/s)", r["tcp1_masqd_gbps"], r["tcp1_kernel_gbps"], "{:.3f}"),
        ("TCP 4 streams (Gbit/s)", r["tcp4_masqd_gbps"], r["tcp4_kernel_gbps"], "{:.3f}"),
    ]
    for proto, pre in (("UDP", "udp_small"), ("ESP", "esp"), ("GRE", "gre")):
        rows += [
            (f"{proto} 92 B offered (pps)", r[f"{pre}_masqd_offered_pps"], r[f"{pre}_kernel_offered_pps"], "{:.0f}"),
            (f"{proto} 92 B delivered (pps)", r[f"{pre}_masqd_pps"], r[f"{pre}_kernel_pps"], "{:.0f}"),
            (f"{proto} 92 B loss (%)", r[f"{pre}_masqd_loss_pct"], r[f"{pre}_kernel_loss_pct"], "{:.2f}"),
            (f"{proto} CPU/pkt (us)", r[f"{pre}_masqd_total_us_per_pkt"], r[f"{pre}_kernel_total_us_per_pkt"],
             "{:.2f}"),
        ]
        key = proto.lower()
        if f"{key}_max_masqd_pps" in r:
            rows.append((f"{proto} max at <0.1% loss", r[f"{key}_max_masqd_pps"], r[f"{key}_max_kernel_pps"],
                         "{:.0f}"))
    rows += [
        ("RTT median (ms)", r["rtt_masqd_median_ms"], r["rtt_kernel_median_ms"], "{:.3f}"),
        ("RTT p99 (ms)", r["rtt_masqd_p99_ms"], r["rtt_kernel_p99_ms"], "{:.3f}"),
    ]
    out = [f"masqd vs kernel nftables masquerade ({r['mode']} mode, {r['seconds']} s per test, "
           f"load average {r.get('loadavg', float('nan')):.2f} at the end, steal "
           f"{r.get('steal_pct', float('nan')):.1f} % of the CPU time)",
           f"{'workload':<30}{'masqd':>12}{'kernel':>12}{'ratio':>8}"]
    for name, a, b, fmt in rows:
        out.append(f"{name:<30}{fmt.format(a):>12}{fmt.format(b):>12}  {ratio(a, b)}")
    out.append("CPU/pkt: the machine's kernel time (system+irq+softirq, /proc/stat, idle rate subtracted) "
               "per delivered packet, plus masqd's user time for masqd")
    out.append(f"masqd's own CPU per forwarded small UDP packet: {r['udp_small_cpu_us_per_pkt']:.2f} us "
               f"(user {r['udp_small_user_us_per_pkt']:.2f}, system {r['udp_small_sys_us_per_pkt']:.2f}; "
               f"{r['udp_small_masqd_forwarded']} packets; offload {r.get('offload')}, rps {r.get('rps')}, "
               f"napi {r.get('napi')}, keep_warm {r.get('keep_warm')}, coalesce {r.get('coalesce')}, "
               f"queues {r.get('queues')}, fastpath {r.get('fastpath')}: "
               f"{r.get('udp_small_native_pct', float('nan')):.1f} % native)")
    out.append(f"RTT added by masqd at low load: median {r['rtt_added_median_ms']:+.3f} ms, "
               f"p99 {r['rtt_added_p99_ms']:+.3f} ms (masqd's CPU meanwhile: {r['rtt_masqd_cpu_pct']:.1f} %)")
    out.append("masqd through ESP / GRE against UDP: max rate " + ", ".join(
        f"{p} {r.get(f'{p}_max_vs_udp', float('nan')):.2f}" for p in ("esp", "gre")) + "; CPU/pkt " + ", ".join(
        f"{p} {r.get(f'{p}_cpu_vs_udp', float('nan')):.2f}" for p in ("esp", "gre")))
    if "tcp1_floor_gbps" in r:
        out.append(f"TUN/TAP floor (bench/tapfloor.c: read, new MACs, write): TCP 1 stream {r['tcp1_floor_gbps']:.3f} "
                   f"Gbit/s ({r['tcp1_floor_ratio']:.2f} of the kernel; masqd {r['tcp1_masqd_vs_floor']:.2f} of it), "
                   f"TCP 4 {r['tcp4_floor_gbps']:.3f} ({r['tcp4_floor_ratio']:.2f}; masqd "
                   f"{r['tcp4_masqd_vs_floor']:.2f}); own CPU per small UDP packet "
                   f"{r['udp_small_floor_cpu_us_per_pkt']:.2f} us (user {r['udp_small_floor_user_us_per_pkt']:.2f}; "
                   f"masqd {r['udp_small_masqd_over_floor_us']:+.2f} us over it), loss "
                   f"{r['udp_small_floor_loss_pct']:.2f} %, max at <0.1% loss "
                   f"{r.get('udp_max_floor_pps', float('nan')):.0f} pps")
    if r.get("masqd_errors"):
        out.append(f"masqd error counters: {r['masqd_errors']}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each iperf3 and fixed-rate test (max 30)")
    p.add_argument("--udp-pps", type=int, default=50000, help="offered rate of the fixed-rate small-packet tests")
    p.add_argument("--pings", type=int, default=1000,
                   help="pings at 100 Hz per router for the RTT figures, in 4 blocks taken in turns (max 2000)")
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
    p.add_argument("--queues", type=int, help="masqd's dataplane.queues (default 0: one per CPU)")
    p.add_argument("--no-offload", dest="offload", action="store_false", help="run masqd with offload = false")
    p.add_argument("--floor", action="store_true",
                   help="also measure the TUN/TAP floor: bench/tapfloor.c, a relay that only reads and writes "
                        "frames on devices opened as masqd's (TCP and small UDP; bench/floor.py)")
    p.add_argument("--no-search", dest="search", action="store_false",
                   help="skip the search for the highest loss-free small-packet rates")
    p.add_argument("--search-from", type=float, default=100000.0, help="the search's first offered rate (pps)")
    p.add_argument("--trial", type=float, default=1.0, help="seconds per search trial")
    p.add_argument("--trials", type=int, default=12, help="search trials per router and workload, at most")
    p.add_argument("--runs", type=int, default=1, help="repeat everything N times (max 10; a summary follows)")
    p.add_argument("--record", metavar="FILE",
                   help="also add the runs to this results file (bench/results/NAME.json; docs/benchmark.md)")
    p.add_argument("--label", help="the setting's name in docs/benchmark.md (default: the options given)")
    p.add_argument("--plot", metavar="FILE.svg", help="draw the runs: bars per workload, masqd vs kernel")
    p.add_argument("--from", dest="source", metavar="RESULTS.json",
                   help="with --plot: draw this results file instead of running")
    args = p.parse_args()
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        # said before the runs, not after them
        print("bench/e2e.py: --plot needs matplotlib, the bench extra: .venv/bin/pip install -e '.[bench]' "
              "(scripts/setup installs it)", file=sys.stderr)
        return 2
    if args.source:
        if not args.plot:
            p.error("--from needs --plot")
        data = json.loads(Path(args.source).read_text(encoding="utf-8"))
        from bench.plot import plot

        plot(data["runs"], args.plot, f"{data.get('label', '')} ({data.get('date', '')[:10]})")
        return 0
    args.seconds = min(max(args.seconds, 1.0), 30.0)
    args.pings = min(max(args.pings, 10), 2000)
    args.runs = min(max(args.runs, 1), 10)
    args.trials = min(max(args.trials, 1), 12)
    args.trial = min(max(args.trial, 0.3), 5.0)
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
    if args.plot:
        from bench.plot import plot

        plot(results, args.plot, default_label(args))
    return 0


def default_label(args: argparse.Namespace) -> str:
    """``defaults, TAP`` or the options that differ from masqd's defaults."""
    opts = [f"--{k.replace('_', '-')} {v}" for k, v in (("napi", args.napi), ("fastpath", args.fastpath),
            ("coalesce", args.coalesce), ("keep_warm", args.keep_warm), ("rps", args.rps),
            ("queues", args.queues)) if v is not None]
    opts += [] if args.offload else ["--no-offload"]
    return f"{' '.join(opts) or 'defaults'}, {args.mode.upper()}"


SUMMARY_KEYS = ("tcp1_masqd_gbps", "tcp1_kernel_gbps", "tcp1_ratio", "tcp4_masqd_gbps", "tcp4_kernel_gbps",
                "tcp4_ratio", "udp_small_cpu_us_per_pkt", "udp_small_masqd_total_us_per_pkt",
                "udp_small_kernel_total_us_per_pkt", "udp_small_cpu_vs_kernel", "udp_max_masqd_pps",
                "udp_max_kernel_pps", "udp_max_ratio", "esp_max_vs_udp", "gre_max_vs_udp", "esp_cpu_vs_udp",
                "gre_cpu_vs_udp", "rtt_added_median_ms", "rtt_added_p99_ms", "loadavg", "steal_pct",
                "tcp1_floor_ratio", "tcp1_masqd_vs_floor", "tcp4_floor_ratio", "tcp4_masqd_vs_floor",
                "udp_small_floor_cpu_us_per_pkt", "udp_small_masqd_over_floor_us", "udp_max_floor_ratio")


def summary(results: list[dict[str, Any]]) -> str:
    """Min / median / max over the runs of the figures the performance goals are stated in."""
    out = [f"over {len(results)} runs: {'figure':<34}{'min':>11}{'median':>11}{'max':>11}"]
    for k in SUMMARY_KEYS:
        vals = [float(r[k]) for r in results if isinstance(r.get(k), int | float) and r[k] == r[k]]
        if vals:
            out.append(f"{'':<15}{k:<34}{min(vals):11.3f}{statistics.median(vals):11.3f}{max(vals):11.3f}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
