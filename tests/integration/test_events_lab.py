"""``masqd events`` and ``masqd table``'s conntrack-style filters on the real masqd in the lab.

masqd runs in a private TAP lab with accounting on and short UDP and TCP-RST
timeouts. Three real ``masqd events`` processes listen on its control socket
(all events as text; UDP only as JSON; a filter nothing matches) while a LAN
host talks to the remote server: a UDP exchange that times out, a TCP
connection (20000 bytes sent, then held open) removed by ``masqd flush``, and a
TCP connection the server refuses (RST), which goes with reason "reset". The
listeners must show each flow's NEW and DESTROY with the right reason and
counters; ``masqd table`` filters and ``--count`` are checked on the way.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from masqd.lab import FW_WAN, LAN2, SRV1, Lab, stop_process
from masqd.ops.control import request

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# connect, send 20000 bytes, say so, stay connected (bounded)
HOLD = ("import socket, sys, time\ns = socket.create_connection((sys.argv[1], 8080), timeout=10)\n"
        "s.sendall(b'x' * 20000)\nprint('sent', flush=True)\ntime.sleep(60)\n")
EXTRA = "\n[masquerade]\naccounting = true\n[masquerade.timeouts]\nudp = 6\ntcp_rst = 4\n"


def cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "masqd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_events_show_new_and_destroy_with_reasons_and_counters(own_lab: Callable[[str, str], Lab]) -> None:
    lab = own_lab("tap", "j")
    m = lab.start_masqd(lab.masqd_config(extra=EXTRA))
    sock = f"/run/masqd/{lab.prefix}.sock"
    listeners: list[subprocess.Popen[str]] = []
    servers: list[subprocess.Popen[str]] = []
    try:
        for args in ([], ["--json", "-p", "udp"], ["--dport", "9999"]):
            listeners.append(subprocess.Popen(
                [sys.executable, "-m", "masqd.cli", "events", "--socket", sock, "--duration", "90", *args],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO))
        wait_until(lambda: request(sock, {"cmd": "stats"})["events"].get("events_listeners") == 3, 15,
                   "three listeners")
        servers.append(lab.tool_server("srv1", ["udp-echo", "5300"], timeout=60))
        servers.append(lab.tool_server("srv1", ["tcp-server", "8080"], timeout=60))

        rc, rep = lab.tool("lan2", ["udp-client", SRV1, "5300", "3", "--sport", "45300"])
        assert rc == 0, rep
        # a TCP connection that stays open (sent 20000 bytes, then idle) until masqd flush removes it
        servers.append(lab.popen("lan2", [sys.executable, "-c", HOLD, SRV1], stdout=subprocess.PIPE, text=True))
        assert servers[-1].stdout is not None and servers[-1].stdout.readline().strip() == "sent"
        lab.tool("lan2", ["tcp-client", SRV1, "9", "10"], timeout=5)  # refused: srv1 answers with a RST

        # masqd table with conntrack-style filters, while the entries are there
        t = cli("table", "--socket", sock, "-p", "tcp", "--dport", "8080", "--json")
        assert t.returncode == 0, t.stderr
        (row,) = json.loads(t.stdout)
        assert row["lan"].startswith(f"{LAN2}:") and row["packets_out"] >= 3 and row["bytes_out"] > 20000  # (super-packets count once)
        c = cli("table", "--socket", sock, "-s", "10.0.0.0/8", "-d", SRV1, "-p", "6", "--state", row["state"],
                "--dport", "8080", "--count")
        assert c.returncode == 0 and int(c.stdout) == 1, (row, c.stdout + c.stderr)
        assert int(cli("table", "--socket", sock, "-s", SRV1, "--count").stdout) == 0
        assert cli("table", "--socket", sock, "--sport", "45300").stdout.count("UDP ") == 1
        bad = cli("table", "--socket", sock, "--dport", "http")
        assert bad.returncode == 1 and "not a port" in bad.stderr and "Traceback" not in bad.stderr

        # the refused connection goes tcp_rst (4 s) after the RST; then flush the TCP entries
        wait_until(lambda: not request(sock, {"cmd": "table", "filter": "dport=9"}), 20, "the reset entry to go")
        fl = cli("flush", "--socket", sock, "proto=tcp")
        assert fl.returncode == 0 and fl.stdout.strip() == "removed 1 entries", fl.stdout + fl.stderr
        # the UDP entry times out (6 s)
        wait_until(lambda: not request(sock, {"cmd": "table"}), 20, "the table to empty")
        time.sleep(0.5)
    finally:
        outs = []
        for p in listeners:
            stop_process(p, sig=signal.SIGINT)
            out, err = p.communicate(timeout=10)
            outs.append((out, err))
        for srv in servers:
            stop_process(srv)
        m.stop()
    (text, err0), (js, err1), (none, err2) = outs
    assert "Traceback" not in err0 + err1 + err2
    lines = text.splitlines()
    udp_new = f"[NEW] udp 17 6 src={LAN2} dst={SRV1} sport=45300 dport=5300 [UNREPLIED] src={SRV1} dst={FW_WAN}"
    assert any(x.startswith(udp_new) for x in lines), text
    udp_end = [x for x in lines if x.startswith(f"[DESTROY] udp 17 src={LAN2} dst={SRV1} sport=45300 dport=5300 ")]
    assert len(udp_end) == 1 and udp_end[0].endswith("reason=timeout"), text
    assert re.search(r"dport=5300 packets=3 bytes=\d+ src=", udp_end[0]) and " packets=3 bytes=" in \
        udp_end[0].split(f"src={SRV1}", 1)[1], udp_end[0]
    tcp_new = [x for x in lines if x.startswith("[NEW] tcp 6 ") and "dport=8080 " in x]
    tcp_end = [x for x in lines if x.startswith("[DESTROY] tcp 6 ") and "dport=8080 " in x]
    assert len(tcp_new) == 1 and "SYN_SENT" in tcp_new[0] and "[UNREPLIED]" in tcp_new[0], text
    assert len(tcp_end) == 1 and tcp_end[0].endswith("reason=flush"), text
    rst = [x for x in lines if x.startswith("[DESTROY] tcp 6 ") and "dport=9 " in x]
    assert len(rst) == 1 and rst[0].endswith("reason=reset"), text
    assert any(x.startswith("[UPDATE] tcp 6 4 RST ") and "dport=9 " in x for x in lines), text
    # the JSON listener: UDP only, every line parses
    events = [json.loads(x) for x in js.splitlines()]
    assert events and {e["proto"] for e in events} == {"udp"}
    assert [e["event"] for e in events] == ["new", "update", "destroy"]
    assert events[-1]["reason"] == "timeout" and events[-1]["packets_out"] == 3 and events[-1]["packets_in"] == 3
    assert none == ""  # nothing to port 9999
