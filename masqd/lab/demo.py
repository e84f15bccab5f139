"""``masqd demo``: build the lab, run masqd in it, show a short tour of it working, clean up.

Every step is checked (content hashes, addresses seen by the server, the
ICMP error the LAN host receives); the exit status is 0 only if all passed.
The lab is removed on every path out unless ``keep`` is set.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable

from masqd.lab.topology import (
    FW_LAN,
    FW_WAN,
    ISP_WAN,
    LAN2,
    LAN3,
    SRV1,
    Lab,
    LabError,
    MasqdProcess,
    stop_process,
)


class Tour:
    """Runs the steps, prints one line per step, remembers failures."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.t0 = time.monotonic()

    def step(self, title: str, fn: Callable[[], str]) -> None:
        t = time.monotonic()
        try:
            detail = fn()
            ok = True
        except (LabError, AssertionError, OSError, subprocess.SubprocessError) as exc:
            detail, ok = str(exc) or type(exc).__name__, False
        mark = "ok  " if ok else "FAIL"
        print(f"[{mark}] {title} ({time.monotonic() - t:.1f} s)")
        for line in detail.splitlines():
            print(f"       {line}")
        if not ok:
            self.failed.append(title)


def _ping(lab: Lab, role: str, dst: str) -> str:
    out = lab.exec(role, ["ping", "-c", "3", "-i", "0.2", "-W", "2", dst], check=False).stdout
    assert " 0% packet loss" in out, out
    return [ln for ln in out.splitlines() if "rtt" in ln][0]


def _traceroute(lab: Lab) -> str:
    out = lab.exec("lan2", ["traceroute", "-n", "-q", "1", "-w", "2", "-m", "6", SRV1], check=False).stdout
    hops = [ln.split()[1] for ln in out.splitlines()[1:] if ln.strip()]
    assert hops == [FW_LAN, ISP_WAN, SRV1], out
    return out.strip()


def _http(lab: Lab) -> str:
    www = lab.rundir / "www"
    www.mkdir(parents=True, exist_ok=True)
    blob = os.urandom(2 * 1024 * 1024)
    (www / "blob").write_bytes(blob)
    log = lab.rundir / "http.log"
    with open(log, "wb") as logf:
        srv = lab.popen("srv1", [sys.executable, "-m", "http.server", "8000", "--bind", SRV1,
                                 "--directory", str(www)], stdout=logf, stderr=subprocess.STDOUT)
    try:
        fetch = ("import urllib.request,hashlib,time,sys\n"
                 "for i in range(50):\n"
                 "  try:\n"
                 f"    d=urllib.request.urlopen('http://{SRV1}:8000/blob',timeout=10).read(); break\n"
                 "  except OSError: time.sleep(0.1)\n"
                 "else: sys.exit(1)\n"
                 "print(hashlib.sha256(d).hexdigest(), len(d))")
        t = time.monotonic()
        out = lab.exec("lan2", [sys.executable, "-c", fetch], timeout=40).stdout.split()
        dt = time.monotonic() - t
    finally:
        stop_process(srv)
    digest, size = out[0], int(out[1])
    assert digest == hashlib.sha256(blob).hexdigest(), "content differs"
    seen = [ln.split()[0] for ln in log.read_text(errors="replace").splitlines() if "GET /blob" in ln]
    assert seen and seen[-1] == FW_WAN, f"server saw {seen}"
    return (f"lan2 fetched http://{SRV1}:8000/blob: {size} bytes, sha256 matches ({dt:.2f} s)\n"
            f"srv1's http.server saw the client as {seen[-1]} (masqueraded)")


def _udp(lab: Lab) -> str:
    srv = lab.tool_server("srv1", ["udp-echo", "5353"])
    try:
        rc, rep = lab.tool("lan3", ["udp-client", SRV1, "5353", "20"])
    finally:
        stop_process(srv)
    assert rc == 0 and rep.get("ok"), rep
    return f"lan3 <-> srv1:5353: {rep['echoed']}/{rep['sent']} datagrams echoed intact, srv1 saw {rep['seen_as']}"


def _refused(lab: Lab) -> str:
    rc, rep = lab.tool("lan2", ["udp-refused", SRV1, "9"], timeout=5)
    assert rc == 0 and rep.get("refused"), rep
    return f"lan2 -> {SRV1}:9/udp: ICMP port unreachable translated back, socket got ECONNREFUSED"


def _same_port(lab: Lab, m: MasqdProcess) -> str:
    srv = lab.tool_server("srv1", ["udp-echo", "5400"])
    try:
        r2 = lab.tool("lan2", ["udp-client", SRV1, "5400", "2", "--sport", "40000"])[1]
        r3 = lab.tool("lan3", ["udp-client", SRV1, "5400", "2", "--sport", "40000"])[1]
    finally:
        stop_process(srv)
    assert r2.get("ok") and r3.get("ok") and r2["seen_as"] != r3["seen_as"], (r2, r3)
    return (f"{LAN2}:40000 -> seen as {r2['seen_as'][0]}\n"
            f"{LAN3}:40000 -> seen as {r3['seen_as'][0]}")


def _show_state(m: MasqdProcess) -> str:
    # the table through the control socket, as an operator would ask for it
    cp = subprocess.run([sys.executable, "-m", "masqd.cli", "table", "-c", str(m.cfg_path)],
                        capture_output=True, text=True, timeout=15)
    assert cp.returncode == 0 and FW_WAN in cp.stdout, cp.stderr or cp.stdout
    # counters (engine + data plane) from the SIGUSR1 snapshot
    snap = m.snapshot()
    counters = {k: v for k, v in sorted(snap["counters"].items()) if v and not k.startswith("pool_")}
    packets = {k: v for k, v in counters.items() if k.endswith("_packets")}
    other = {k: v for k, v in counters.items() if not k.endswith("_packets") and not k.endswith("_bytes")}
    return (f"$ masqd table -c {m.cfg_path}\n" + cp.stdout.rstrip()
            + "\npackets: " + ", ".join(f"{k}={v}" for k, v in packets.items())
            + "\nother:   " + ", ".join(f"{k}={v}" for k, v in other.items()))


def demo(prefix: str = "mqdemo", mode: str = "tap", keep: bool = False) -> int:
    """Run the tour; 0 if every step worked."""
    if os.geteuid() != 0:
        print("masqd demo: needs root (network namespaces)", file=sys.stderr)
        return 1
    tour = Tour()
    try:
        lab = Lab(prefix, mode=mode)
    except LabError as exc:
        print(f"masqd demo: {exc}", file=sys.stderr)
        return 1
    lab.down()  # leftovers of an interrupted demo
    m: MasqdProcess | None = None
    try:
        print(f"masqd demo: lab {prefix!r}, {mode.upper()} mode")
        print(f"  LAN 10.0.0.0/8: lan2 {LAN2}, lan3 {LAN3} -- masqd {FW_LAN} | {FW_WAN} -- "
              f"isp {ISP_WAN} -- remote 198.51.100.0/24: srv1 {SRV1}")
        lab.up()
        m = lab.start_masqd()
        print(f"  masqd running in {lab.ns('fw')} as PID {m.pid}\n")
        tour.step("lan2 pings masqd's LAN address", lambda: _ping(lab, "lan2", FW_LAN))
        tour.step("isp pings masqd's WAN address", lambda: _ping(lab, "isp", FW_WAN))
        tour.step("lan2 pings srv1 on the remote network", lambda: _ping(lab, "lan2", SRV1))
        tour.step("traceroute lan2 -> srv1", lambda: _traceroute(lab))
        tour.step("TCP: HTTP download through the masquerade", lambda: _http(lab))
        tour.step("UDP exchange", lambda: _udp(lab))
        tour.step("ICMP error back through the NAT", lambda: _refused(lab))
        tour.step("two LAN hosts, same source port: two mappings", lambda: _same_port(lab, m))  # type: ignore[arg-type]
        tour.step("masqd's table and counters", lambda: _show_state(m))  # type: ignore[arg-type]
    except LabError as exc:
        print(f"masqd demo: {exc}", file=sys.stderr)
        tour.failed.append("setup")
    finally:
        if keep and not tour.failed:
            print(f"\nkept: lab {prefix!r} and masqd PID {m.pid if m else '-'}; "
                  f"remove with: masqd lab down --prefix {prefix}")
        else:
            if m is not None:
                rc = m.stop()
                if rc != 0:
                    print(f"masqd exited with {rc}:\n{m.log()}", file=sys.stderr)
                    tour.failed.append("masqd exit status")
            lab.down()
    total = time.monotonic() - tour.t0
    if tour.failed:
        print(f"\ndemo FAILED ({len(tour.failed)}: {', '.join(tour.failed)}) in {total:.1f} s")
        return 1
    print(f"\ndemo passed: every step worked, lab removed ({total:.1f} s)")
    return 0
