#!/usr/bin/env python3
"""Soak: masqd in the lab for a long time under churning traffic, reloads and WAN address changes.

The lab (TAP mode) with the real masqd process and more LAN hosts than lan2 and
lan3 (``--hosts`` extra ones, 10.0.0.10 and up). For ``--minutes``:

- every LAN host opens short TCP connections (1 B - 64 KiB, answered with their
  sha256) and short UDP flows (a new source port each, every datagram echoed)
  back to back, to srv1 and rem2 in turn, and pings srv1 twice a second;
- lan2 also sends a steady numbered UDP probe (``--probe-rate`` per second, one
  long-lived flow) to srv1's echo: each datagram whose echo never came is lost;
- every ``--reload-every`` seconds masqd gets SIGHUP with its configuration
  file rewritten: a good one (two variants of the firewall rules in turn) and
  a bad one (a TOML syntax error, an unknown key, a bad rule line in turn)
  alternate; the good ones must be taken and the bad ones refused;
- every ``--wan-every`` seconds (half-way between two reloads) its WAN address
  changes over the control socket (``masqd wan-address set``, as a PPP ip-up
  script would), between
  203.0.113.200 and 203.0.113.210 (``wan.address_source = "control"``, so that a
  reload keeps the live address).

masqd's RSS is sampled from /proc (with the table's size, over the control
socket) every ``--sample`` seconds. The configuration sets SHORT TIMEOUTS
(10 s for UDP, ICMP and TCP that is not established, 30 s for established TCP)
so that, once the traffic stops, the table must be back to zero within a
minute. Reported: the RSS curve and its growth after the first tenth of the
run; probe datagrams lost within a second after a reload, after an address
change, and elsewhere; TCP/UDP exchanges and pings that failed (by the same
windows); reloads taken and refused; error lines in masqd's log; the time the
table took to empty.

Usage (root): ``.venv/bin/python bench/soak.py [--minutes 30] [--hosts 4] [--reload-every 5]
[--wan-every 60] [--sample 10] [--probe-rate 200] [--quick] [--json FILE]`` (``--quick``: about a
minute: 40 s of traffic, 2 extra hosts, reloads every 3 s, an address change every 10 s).
Exit status 0 when the table emptied, every good reload was taken and every bad one refused,
masqd logged no error and kept running.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import labkit  # noqa: E402
from bench.record import stamp  # noqa: E402
from masqd.lab import REM2, SRV1, Lab, MasqdProcess, stop_process  # noqa: E402
from masqd.ops.control import ControlError, request  # noqa: E402

TCP_PORT, UDP_PORT = 5001, 5353
WAN_ADDRS = ["203.0.113.210", "203.0.113.200"]
TIMEOUTS = """
[masquerade.timeouts]
tcp_established = 30.0
tcp_transitory = 10.0
tcp_fin = 10.0
tcp_rst = 10.0
udp = 10.0
icmp = 10.0
other = 10.0
"""
LONGEST_TIMEOUT = 30.0
RULES = {
    "a": 'rules = """\nipchains -A forward -p udp -d 198.51.100.3 7 -j DENY\nipchains -A forward -j MASQ\n"""\n',
    "b": 'rules = """\nipchains -A forward -p tcp -d 198.51.100.3 7 -j REJECT\nipchains -A forward -j MASQ\n"""\n',
}
BAD = [
    ("toml syntax", "\nthis is not = = toml\n"),
    ("unknown key", "\n[dataplane]\nno_such_setting = 1\n"),
    ("bad rule line", None),
]
RELOAD_WINDOW = 1.0  # seconds after a SIGHUP in which a loss counts as the reload's
WAN_WINDOW = 1.5  # ... after an address change


def config(lab: Lab, variant: str) -> str:
    """The soak's configuration: the lab's, short timeouts, the WAN address from the control socket."""
    text = lab.masqd_config(extra=TIMEOUTS + '\n[logging]\nlevel = "info"\n')
    text = text.replace('gateway = "203.0.113.1"\n', 'gateway = "203.0.113.1"\naddress_source = "control"\n', 1)
    return text + "\n[firewall]\n" + RULES[variant]


def bad_config(lab: Lab, n: int) -> tuple[str, str]:
    name, extra = BAD[n % len(BAD)]
    good = config(lab, "a")
    if extra is None:
        return name, good.replace("-j MASQ\n", "-j MASQ\nipchains -A forward -p udp --no-such-option -j DENY\n", 1)
    return name, good + extra


def window(t: float, starts: list[float], length: float) -> bool:
    return any(s - 0.05 <= t <= s + length for s in starts)


def classify(t: float, reloads: list[float], wans: list[float]) -> str:
    """The window a moment belongs to. An address change may lose what is in flight to the old
    address, a reload must lose nothing: where the two windows overlap (in the quick mode, the
    change at 21.5 s comes half a second after the reload at 21 s), the change owns the moment."""
    if window(t, wans, WAN_WINDOW):
        return "wan"
    if window(t, reloads, RELOAD_WINDOW):
        return "reload"
    return "other"


def slope_mib_per_hour(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KiB) points, in MiB per hour."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    den = sum((p[0] - mx) ** 2 for p in points)
    if den == 0:
        return 0.0
    return sum((p[0] - mx) * (p[1] - my) for p in points) / den * 3600 / 1024


def run(a: argparse.Namespace) -> dict[str, Any]:
    lab = Lab(f"sk{os.getpid()}"[:10], mode="tap")
    lab.down()
    seconds = a.minutes * 60
    res: dict[str, Any] = {**stamp(), "minutes": a.minutes, "hosts_extra": a.hosts, "reload_every": a.reload_every,
                           "wan_every": a.wan_every, "timeouts": "udp/icmp/tcp-transitory 10 s, tcp established 30 s"}
    m: MasqdProcess | None = None
    procs: list[subprocess.Popen[str]] = []
    try:
        lab.up()
        hosts = [("lan2", "10.0.0.2"), ("lan3", "10.0.0.3"), *labkit.add_lan_hosts(lab, a.hosts)]
        m = lab.start_masqd(config(lab, "a"))
        sock = f"/run/masqd/{lab.prefix}.sock"
        servers = [labkit.start(lab, role, labkit.SERVERS, seconds + 60, TCP_PORT, UDP_PORT, ready=True)
                   for role in ("srv1", "rem2")]
        procs += servers
        for role, _addr in hosts:
            lab.exec(role, ["ping", "-c", "1", "-W", "2", SRV1], check=False)
        t_start = time.time()
        churn = [labkit.start(lab, role, labkit.CHURN, seconds, (SRV1, REM2)[i % 2], TCP_PORT, UDP_PORT, i)
                 for i, (role, _addr) in enumerate(hosts)]
        pings = [lab.popen(role, ["ping", "-n", "-i", "0.5", "-W", "1", "-w", str(int(seconds)), SRV1],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for role, _addr in hosts]
        probe = labkit.start(lab, "lan2", labkit.PROBE, seconds, SRV1, UDP_PORT, a.probe_rate)
        procs += churn + pings + [probe]
        reloads: list[float] = []
        wans: list[float] = []
        rss: list[tuple[float, int, int]] = []
        good = bad = 0
        bad_kinds: dict[str, int] = {}
        # address changes half-way between two reloads: each loss belongs to one of them
        next_reload, next_wan, next_sample = (t_start + a.reload_every, t_start + a.wan_every + a.reload_every / 2,
                                              t_start)
        end = t_start + seconds
        while time.time() < end:
            now = time.time()
            if now >= next_sample:
                next_sample += a.sample
                try:
                    entries = int(request(sock, {"cmd": "stats"})["entries"])
                except (ControlError, OSError):
                    entries = -1
                rss.append((round(now - t_start, 1), labkit.rss_kib(m.pid), entries))
            if now >= next_reload:
                next_reload += a.reload_every
                n = good + bad
                if n % 2 == 0:
                    m.cfg_path.write_text(config(lab, "ab"[(n // 2) % 2]), encoding="utf-8")
                    good += 1
                else:
                    kind, text = bad_config(lab, bad)
                    m.cfg_path.write_text(text, encoding="utf-8")
                    bad += 1
                    bad_kinds[kind] = bad_kinds.get(kind, 0) + 1
                reloads.append(time.time())
                os.kill(m.pid, signal.SIGHUP)
            if now >= next_wan:
                next_wan += a.wan_every
                addr = WAN_ADDRS[len(wans) % 2]
                wans.append(time.time())
                request(sock, {"cmd": "wan-address", "action": "set", "address": f"{addr}/24"})
            time.sleep(max(0.0, min(next_reload, next_wan, next_sample, end) - time.time()))
        # the traffic stops by itself; collect it
        churned = [labkit.result(p, 90) for p in churn]
        probed = labkit.result(probe, 30)
        pinged = []
        for p in pings:
            try:
                out, _ = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process(p)
                out = ""
            pinged.append(labkit.ping_summary(out))
        st = request(sock, {"cmd": "stats"})
        res["reloads"] = {"good_sent": good, "bad_sent": bad, "bad_kinds": bad_kinds, "taken": st["reloads"]["success"],
                          "refused": st["reloads"]["failure"]}
        res["wan_changes"] = {"sent": len(wans), "counted": int(st["counters"].get("wan_address_changes", 0))}
        # the table after the timeouts
        t_stop = time.time()
        drained = None
        while time.time() - t_stop < LONGEST_TIMEOUT + 30:
            n = int(request(sock, {"cmd": "stats"})["entries"])
            rss.append((round(time.time() - t_start, 1), labkit.rss_kib(m.pid), n))
            if n == 0:
                drained = round(time.time() - t_stop, 1)
                break
            time.sleep(1.0)
        res["table_drained_after_s"] = drained
        res["entries_end"] = int(request(sock, {"cmd": "stats"})["entries"])
        res["rss"] = rss
        warm = [(t, k) for t, k, _ in rss if t >= seconds * 0.1 and t <= seconds]
        res["rss_kib"] = {"start": rss[0][1] if rss else 0, "after_warmup": warm[0][1] if warm else 0,
                          "end": rss[-1][1] if rss else 0, "max": max((k for _, k, _ in rss), default=0),
                          "slope_mib_per_hour": round(slope_mib_per_hour(warm[len(warm) // 2:]), 2)}
        # losses by window
        lost = probed.get("lost", [])
        t0 = probed.get("t0") or t_start
        windows: dict[str, dict[str, int]] = {k: {"sent": 0, "lost": 0} for k in ("reload", "wan", "other")}
        rate = float(probed.get("rate", a.probe_rate))
        for i in range(int(probed.get("sent", 0))):
            windows[classify(t0 + i / rate, reloads, wans)]["sent"] += 1
        for _i, t in lost:
            windows[classify(t, reloads, wans)]["lost"] += 1
        res["probe"] = {"sent": probed.get("sent", 0), "lost": len(lost), "by_window": windows,
                        "error": probed.get("error"), "lost_at": [round(t - t_start, 3) for _i, t in lost][:1000]}
        res["reload_at"] = [round(t - t_start, 3) for t in reloads]
        res["wan_change_at"] = [round(t - t_start, 3) for t in wans]
        fails: dict[str, int] = {"reload": 0, "wan": 0, "other": 0}
        for c in churned:
            for t, _kind, _err in c.get("failures", []):
                fails[classify(t, reloads, wans)] += 1
        res["churn"] = {k: sum(int(c.get(k, 0)) for c in churned) for k in ("tcp_ok", "tcp_fail", "udp_ok", "udp_fail")}
        res["churn"]["failures_by_window"] = fails
        res["churn"]["errors"] = [c["error"] for c in churned if "error" in c]
        res["churn"]["failure_samples"] = [f for c in churned for f in c.get("failures", [])][:10]
        res["pings"] = {"sent": sum(int(p["sent"]) for p in pinged), "received": sum(int(p["received"]) for p in pinged)}
        log = m.log()
        res["masqd_log_errors"] = [  # (a refused reload's own lines are errors by design: not counted)
            ln[:300] for ln in log.splitlines() if ("Traceback" in ln or '"level": "error"' in ln
                                                    or '"level": "critical"' in ln) and "config_reload_error" not in ln][:20]
        res["masqd_alive"] = m.proc.poll() is None
        res["counters_end"] = {k: v for k, v in st["counters"].items() if k.startswith("drop_") or "error" in k}
    finally:
        for p in procs:
            stop_process(p)
        if m is not None:
            m.stop()
        lab.down()
    r = res
    r["ok"] = bool(r.get("masqd_alive") and r.get("entries_end") == 0 and not r.get("masqd_log_errors")
                   and r["reloads"]["taken"] == r["reloads"]["good_sent"]
                   and r["reloads"]["refused"] == r["reloads"]["bad_sent"])
    return r


def table(r: dict[str, Any]) -> str:
    k = r["rss_kib"]
    pr = r["probe"]
    w = pr["by_window"]
    ch = r["churn"]
    out = [f"soak: {r['minutes']:g} min, {2 + r['hosts_extra']} LAN hosts, SIGHUP every {r['reload_every']:g} s, "
           f"WAN address change every {r['wan_every']:g} s; short timeouts ({r['timeouts']})",
           "masqd RSS (MiB) over time: " + ", ".join(f"{t:g}s {kib / 1024:.1f}" for t, kib, _ in
                                                     r["rss"][:: max(1, len(r["rss"]) // 12)]),
           f"  start {k['start'] / 1024:.1f}, after the first tenth {k['after_warmup'] / 1024:.1f}, "
           f"end {k['end'] / 1024:.1f}, max {k['max'] / 1024:.1f}; slope over the second half "
           f"{k['slope_mib_per_hour']:+.1f} MiB/h",
           f"{'probe datagrams (lan2 -> srv1)':<34}{'sent':>10}{'lost':>8}",
           f"{'  within 1 s after a reload':<34}{w['reload']['sent']:>10}{w['reload']['lost']:>8}",
           f"{'  within 1.5 s after a WAN change':<34}{w['wan']['sent']:>10}{w['wan']['lost']:>8}",
           f"{'  elsewhere':<34}{w['other']['sent']:>10}{w['other']['lost']:>8}",
           f"churn: TCP {ch['tcp_ok']:,} ok / {ch['tcp_fail']} failed, UDP flows {ch['udp_ok']:,} ok / "
           f"{ch['udp_fail']} failed (failures after a reload {ch['failures_by_window']['reload']}, after a WAN "
           f"change {ch['failures_by_window']['wan']}, elsewhere {ch['failures_by_window']['other']})",
           f"pings: {r['pings']['received']:,} of {r['pings']['sent']:,} answered",
           f"reloads: {r['reloads']['good_sent']} good sent, {r['reloads']['taken']} taken; {r['reloads']['bad_sent']} "
           f"bad sent {r['reloads']['bad_kinds']}, {r['reloads']['refused']} refused; WAN changes "
           f"{r['wan_changes']['sent']} sent, {r['wan_changes']['counted']} counted",
           f"table back to 0 entries {r['table_drained_after_s']} s after the traffic stopped "
           f"(entries at the end: {r['entries_end']})",
           f"masqd error log lines: {len(r['masqd_log_errors'])}; drop/error counters: {r['counters_end']}"]
    for f in ch["failure_samples"][:5]:
        out.append(f"  failure sample: {f}")
    for e in r["masqd_log_errors"][:5]:
        out.append(f"  masqd: {e}")
    out.append("OK" if r["ok"] else "FAILED")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--hosts", type=int, default=4, help="LAN hosts besides lan2 and lan3 (0-20)")
    p.add_argument("--reload-every", type=float, default=5.0, help="seconds between SIGHUPs")
    p.add_argument("--wan-every", type=float, default=60.0, help="seconds between WAN address changes")
    p.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    p.add_argument("--probe-rate", type=float, default=200.0, help="probe datagrams per second (10-1000)")
    p.add_argument("--quick", action="store_true", help="about a minute (40 s of traffic)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = p.parse_args()
    if a.quick:
        a.minutes, a.hosts, a.reload_every, a.wan_every, a.sample = 40 / 60, 2, 3.0, 10.0, 2.0
    a.minutes = min(max(a.minutes, 0.25), 24 * 60)
    a.hosts = min(max(a.hosts, 0), 20)
    a.reload_every = max(a.reload_every, 1.0)
    a.wan_every = max(a.wan_every, 2.0)
    a.sample = max(a.sample, 1.0)
    a.probe_rate = min(max(a.probe_rate, 10.0), 1000.0)
    if os.geteuid() != 0:
        print("bench/soak.py: needs root (network namespaces)", file=sys.stderr)
        return 1
    res = run(a)
    print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
