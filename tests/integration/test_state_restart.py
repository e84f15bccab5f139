"""A restart keeps the table (issue 17, part 1): masqd is stopped with SIGTERM and started again
in the middle of a 100 MB TCP transfer, a UDP flow, a 100 Hz ping and a port-forwarded TCP
transfer to a LAN server; every one of them goes on (the transfers complete with the same
hash and no reset, the UDP flow keeps its external port). A state file corrupted on purpose
leaves masqd empty with one log line and a counter.

The flows are made so that losing the table would show: the LAN ports they use are already
mapped (by lan3), so their WAN ports are not their own, and a new mapping after a restart
would give them another port (the server would answer a stranger with a reset, the echo
server would see another address); the forwarded transfer's segments after the restart are
not SYNs, which the port forward alone refuses.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from masqd.lab import FW_WAN, LAN3, SRV1, Lab, MasqdProcess, stop_process

pytestmark = pytest.mark.integration

LabFactory = Callable[[str, str], Lab]
PORTFW = '\n[[forwarding.portfw]]\nproto = "tcp"\nport = 8080\nto = "10.0.0.3"\nto_port = 8080\n'
MB = 1 << 20


class Bg:
    """A nettool (or any) client running in the background in a lab namespace."""

    def __init__(self, lab: Lab, role: str, argv: list[str]) -> None:
        self.proc = lab.popen(role, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self, timeout: float) -> tuple[int, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            out, err = self.proc.communicate()
            return -1, out + err
        return self.proc.returncode, out + err

    def json(self, timeout: float) -> dict[str, Any]:
        rc, text = self.result(timeout)
        try:
            return {"rc": rc, **json.loads(text.strip().splitlines()[-1])}
        except (ValueError, IndexError):
            return {"rc": rc, "ok": False, "output": text}


def nettool(*args: str, timeout: float = 60.0) -> list[str]:
    return [sys.executable, "-m", "masqd.lab.nettool", "--timeout", str(timeout), *args]


def table(m: MasqdProcess) -> list[dict[str, Any]]:
    return list(m.snapshot()["table"])


def restart(lab: Lab, m: MasqdProcess, cfg: str) -> tuple[MasqdProcess, float]:
    """SIGTERM, wait for the exit, start again; returns the new process and the seconds between."""
    t0 = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(15) == 0, m.log()
    new = lab.start_masqd(cfg)
    return new, time.monotonic() - t0


def test_sigterm_and_start_keep_every_flow(own_lab: LabFactory) -> None:
    lab = own_lab("tap", "s")
    cfg = lab.masqd_config(extra=PORTFW)
    m = lab.start_masqd(cfg)
    servers = [lab.tool_server("srv1", ["tcp-server", "9000"], timeout=90),
               lab.tool_server("srv1", ["udp-echo", "9001"], timeout=90),
               lab.tool_server("lan3", ["tcp-server", "8080"], timeout=90)]
    clients: list[Bg] = []
    m2 = None
    try:
        # lan3 holds the LAN ports lan2 is about to use: lan2's flows get WAN ports of their own
        lab.tool("lan3", ["udp-client", SRV1, "9001", "1", "--sport", "7000"])
        lab.tool("lan3", ["tcp-refused", SRV1, "9", "--sport", "7001"])
        tcp = Bg(lab, "lan2", nettool("tcp-client", SRV1, "9000", str(100 * MB), "--sport", "7001",
                                      "--rate", str(20 * MB), timeout=60))
        udp = Bg(lab, "lan2", nettool("udp-flow", SRV1, "9001", "7", "--sport", "7000", "--interval", "0.02"))
        fwd = Bg(lab, "srv1", nettool("tcp-client", FW_WAN, "8080", str(20 * MB), "--rate", str(4 * MB),
                                      timeout=60))
        ping = Bg(lab, "lan2", ["ping", "-n", "-q", "-i", "0.01", "-c", "700", "-W", "1", SRV1])
        clients = [tcp, udp, fwd, ping]
        time.sleep(2.0)
        before = table(m)
        tcp_row = next(r for r in before if r["proto"] == "tcp" and r["lan"].endswith(":7001")
                       and r["state"] == "ESTABLISHED")
        udp_row = next(r for r in before if r["proto"] == "udp" and r["lan"] == "10.0.0.2:7000")
        assert not tcp_row["wan"].endswith(":7001") and not udp_row["wan"].endswith(":7000")
        m2, gap = restart(lab, m, cfg)
        after = table(m2)
        assert any(r["wan"] == tcp_row["wan"] and r["remote"] == tcp_row["remote"] for r in after), after
        snap = m2.snapshot()
        assert snap["counters"].get("state_restored_entries", 0) >= 4, snap["counters"]
        assert "state_file_refused" not in snap["counters"]
        res_tcp, res_udp, res_fwd = tcp.json(60), udp.json(30), fwd.json(60)
        rc, ping_out = ping.result(30)
    finally:
        for c in clients:
            stop_process(c.proc)
        for s in servers:
            stop_process(s)
        if m2 is not None:
            m2.stop()
        m.stop()
    print(f"restart gap {gap:.2f} s; tcp {res_tcp}; udp {res_udp}; portfw {res_fwd}; ping {ping_out.strip()}")
    assert res_tcp["ok"] and res_tcp["bytes"] == 100 * MB, res_tcp
    assert res_tcp["seen_as"].endswith(tcp_row["wan"].rsplit(":", 1)[1]), (res_tcp, tcp_row)
    assert res_fwd["ok"], res_fwd
    assert res_udp["seen_as"] == [f"{FW_WAN}:{udp_row['wan'].rsplit(':', 1)[1]}"], res_udp
    sent, got = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", ping_out).groups())  # type: ignore[union-attr]
    assert got >= sent // 2, ping_out  # the ping went on after the restart (the loss is the downtime)
    assert "Traceback" not in m.log() + m2.log()


def test_a_corrupted_state_file_starts_empty_with_one_line_and_a_counter(own_lab: LabFactory) -> None:
    lab = own_lab("tap", "c")
    cfg = lab.masqd_config()
    m = lab.start_masqd(cfg)
    lab.tool("lan2", ["udp-client", SRV1, "9", "1"], timeout=2)  # an entry (no echo server: not ok)
    assert m.stop() == 0
    path = f"/run/masqd/{lab.prefix}.state"
    with open(path, "r+b") as f:
        f.seek(70)
        f.write(b"\xff" * 16)
    m = lab.start_masqd(cfg)
    try:
        snap = m.snapshot()
        assert snap["counters"].get("state_file_refused") == 1
        assert snap["counters"].get("state_file_refused_corrupt") == 1
        assert [r for r in snap["table"] if r["proto"] in ("udp", "tcp", "icmp")] == []
        lab.exec("lan2", ["ping", "-c", "1", "-W", "2", SRV1])  # and it routes
    finally:
        assert m.stop() == 0
    lines = [ln for ln in m.log().splitlines() if "state file" in ln and "refused" in ln]
    assert len(lines) == 1 and "empty table" in lines[0], m.log()
    assert "Traceback" not in m.log()
    assert LAN3


def test_masqd_save_and_the_interval_write_the_state_file_while_running(own_lab: LabFactory) -> None:
    from pathlib import Path

    from masqd.ops import statefile

    lab = own_lab("tap", "v")
    path = Path(f"/run/masqd/{lab.prefix}.state")
    m = lab.start_masqd(lab.masqd_config().replace("[state]\n", "[state]\ninterval = 1\n"))
    try:
        assert not path.exists()
        lab.tool("lan2", ["udp-client", SRV1, "9", "1", "--sport", "4444"], timeout=1)
        deadline = time.monotonic() + 5
        while not path.exists():  # the interval's save
            assert time.monotonic() < deadline, m.log()
            time.sleep(0.1)
        path.unlink()
        cp = subprocess.run([sys.executable, "-m", "masqd.cli", "save", "--socket", f"/run/masqd/{lab.prefix}.sock"],
                            capture_output=True, text=True, timeout=20)
        assert cp.returncode == 0 and f"state saved to {path}" in cp.stdout, cp.stdout + cp.stderr
        doc = statefile.read(path, 1 << 24)
        assert doc is not None
        assert any(r["k"] == "session" and r["lp"] == 4444 for r in doc["records"]), doc["records"]
    finally:
        assert m.stop() == 0
    assert "Traceback" not in m.log()
