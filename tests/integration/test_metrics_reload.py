"""Operations on the real masqd process in the lab: a real Prometheus scrapes it during
traffic, and SIGHUP / control-socket reloads swap the config without losing connections.

One lab (TAP mode) for the module; masqd runs in ``{p}-fw`` with metrics on
127.0.0.1:9598 there, and Debian's ``prometheus`` runs in the same namespace
scraping every second. The control socket is a unix socket on this machine's
filesystem, so the test talks to it directly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from masqd.lab import FW_WAN, SRV1, Lab, LabError, MasqdProcess, stop_process
from masqd.ops.control import ControlError, request

pytestmark = pytest.mark.integration

# A TCP stream that lasts a while (``chunks`` x 8 KiB every ``gap`` s), checked end to end.
SLOW = r"""
import hashlib, socket, sys, time
mode = sys.argv[1]
if mode == "server":
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(sys.argv[2]))); srv.listen(16); srv.settimeout(60)
    print("ready", flush=True)
    while True:
        c, peer = srv.accept(); c.settimeout(60)
        h = hashlib.sha256(); n = 0
        while True:
            b = c.recv(65536)
            if not b: break
            h.update(b); n += len(b)
        c.sendall(f"{n} {h.hexdigest()} {peer[0]}\n".encode()); c.close()
elif mode == "client":
    host, port, chunks, gap = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    s = socket.create_connection((host, port), timeout=30); h = hashlib.sha256(); n = 0
    print("connected", flush=True)
    for i in range(chunks):
        b = bytes([i % 251]) * 8192; s.sendall(b); h.update(b); n += len(b); time.sleep(gap)
    s.shutdown(socket.SHUT_WR)
    r = b""
    while True:
        b = s.recv(4096)
        if not b: break
        r += b
    got_n, got_h, peer = r.decode().split()
    print(f"done {int(got_n) == n and got_h == h.hexdigest()} {peer}", flush=True)
elif mode == "echo-server":
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(sys.argv[2]))); srv.listen(64)
    import threading
    def serve(c):
        while True:
            b = c.recv(4096)
            if not b: return
            c.sendall(b)
    print("ready", flush=True)
    deadline = time.monotonic() + 120
    srv.settimeout(5)
    while time.monotonic() < deadline:
        try:
            c, _ = srv.accept()
        except OSError:
            continue
        threading.Thread(target=serve, args=(c,), daemon=True).start()
elif mode == "holders":
    # N connections opened now, then one echo per connection each time a line arrives on stdin
    host, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    socks = [socket.create_connection((host, port), timeout=10) for _ in range(n)]
    print("open", flush=True)
    for line in sys.stdin:
        ok = 0
        for i, s in enumerate(socks):
            msg = f"{line.strip()}-{i}".encode(); s.sendall(msg)
            if s.recv(4096) == msg: ok += 1
        print(f"echoed {ok}", flush=True)
"""

ESP = r"""
import socket, struct, sys, time
mode = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
if mode == "responder":
    s.settimeout(20)
    print("ready", flush=True)
    for _ in range(int(sys.argv[2])):
        data, (src, _) = s.recvfrom(2048)
        spi, seq = struct.unpack_from("!II", data, 20)
        s.sendto(struct.pack("!II", 0x5000 + spi, seq) + b"r" * 32, (src, 0))
else:
    dst, spi, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    for i in range(n):
        s.sendto(struct.pack("!II", spi, i + 1) + b"q" * 32, (dst, 0))
        time.sleep(0.05)
    print("sent", flush=True)
"""


@dataclass
class Env:
    lab: Lab
    masqd: MasqdProcess
    prom: subprocess.Popen[Any]
    sock: str
    tmp: Path


def _popen_ready(lab: Lab, role: str, script: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
    p = lab.popen(role, [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, text=True)
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line not in ("ready", "connected", "open"):
        stop_process(p)
        raise AssertionError(f"helper in {role} did not start: {line!r} {p.stderr.read() if p.stderr else ''}")
    return p


def _http(lab: Lab, url: str) -> str:
    code = f"import urllib.request;print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    return lab.exec("fw", [sys.executable, "-c", code], timeout=20).stdout


def promql(env: Env, query: str) -> float:
    """Value of an instant PromQL query (sum of the vector), 0.0 if empty."""
    from urllib.parse import quote

    out = json.loads(_http(env.lab, f"http://127.0.0.1:9090/api/v1/query?query={quote(query)}"))
    assert out["status"] == "success", out
    return sum(float(r["value"][1]) for r in out["data"]["result"])


def wait_promql(env: Env, query: str, pred: Any, timeout: float = 20.0) -> float:
    deadline = time.monotonic() + timeout
    v = promql(env, query)
    while not pred(v) and time.monotonic() < deadline:
        time.sleep(0.5)
        v = promql(env, query)
    return v


def config(lab: Lab, udp: int = 300, extra: str = "") -> str:
    return lab.masqd_config(extra=f"\n[masquerade.timeouts]\nudp = {udp}\n{extra}")


@pytest.fixture(scope="module")
def env(stale_labs_removed: None) -> Iterator[Env]:
    lab = Lab(f"t{os.getpid()}m", mode="tap")
    lab.down()
    tmp = Path(tempfile.mkdtemp(prefix="masqd-prom-"))
    prom: subprocess.Popen[Any] | None = None
    mp: MasqdProcess | None = None
    try:
        lab.up()
        mp = lab.start_masqd(config(lab))
        (tmp / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n  - job_name: masqd\n    static_configs: [{targets: ['127.0.0.1:9598']}]\n")
        prom = lab.popen("fw", ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp / 'data'}", "--web.listen-address=127.0.0.1:9090"],
                         stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "wb"))
        e = Env(lab, mp, prom, f"/run/masqd/{lab.prefix}.sock", tmp)
        deadline = time.monotonic() + 30
        while True:
            try:
                if promql(e, 'up{job="masqd"}') == 1.0:
                    break
            except (LabError, AssertionError, ValueError):
                pass
            if time.monotonic() > deadline or prom.poll() is not None:
                raise AssertionError("prometheus did not scrape masqd:\n"
                                     + (tmp / "prometheus.log").read_text(errors="replace")[-2000:])
            time.sleep(0.5)
        yield e
    finally:
        if prom is not None:
            stop_process(prom)
        if mp is not None:
            mp.stop()
        lab.down()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def test_prometheus_sees_forwarded_packets_and_esp_pairs(env: Env) -> None:
    lab = env.lab
    srv = _popen_ready(lab, "srv1", SLOW, "server", "8301")
    try:
        cli = _popen_ready(lab, "lan2", SLOW, "client", SRV1, "8301", "200", "0")
        out, _ = cli.communicate(timeout=30)
        assert out.split()[:3] == ["done", "True", FW_WAN], out
    finally:
        stop_process(srv)
    tx_wan = 'sum(masqd_packets_total{job="masqd", interface="wan", direction="tx", protocol="tcp"})'
    v = wait_promql(env, tx_wan, lambda x: x >= 200)
    assert v >= 200  # 1.6 MB in segments of at most 1460 bytes leave on the WAN side
    b = wait_promql(env, 'sum(masqd_bytes_total{interface="lan", direction="rx", protocol="tcp"})',
                    lambda x: x > 1_600_000)
    assert b > 1_600_000

    # ESP: two LAN hosts' initial packets, the remote's replies -> learned pairs
    resp = _popen_ready(lab, "srv1", ESP, "responder", "6")
    try:
        for host, spi in (("lan2", 0x1001), ("lan3", 0x2002)):
            lab.exec(host, [sys.executable, "-c", ESP, "initiator", SRV1, str(spi), "3"], timeout=30)
    finally:
        stop_process(resp)
    counters = {k: v for k, v in env.masqd.snapshot()["counters"].items() if k.startswith("esp_")}
    assert counters, "the engine exports no ESP counters"
    learned = wait_promql(env, 'sum(masqd_esp_events_total{event="learned"})', lambda x: x >= 1)
    pending = wait_promql(env, 'sum(masqd_esp_events_total{event="pending"})', lambda x: x >= 1)
    assert learned >= 1 and pending >= 1
    assert learned == counters.get("esp_learned", 0)


def test_valid_reload_keeps_running_transfer(env: Env) -> None:
    lab = env.lab
    srv = _popen_ready(lab, "srv1", SLOW, "server", "8302")
    ok_before = promql(env, 'masqd_reloads_total{result="success"}')
    try:
        cli = _popen_ready(lab, "lan2", SLOW, "client", SRV1, "8302", "60", "0.05")  # ~3 s
        time.sleep(0.5)
        env.masqd.cfg_path.write_text(config(lab, udp=200), encoding="utf-8")
        os.kill(env.masqd.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert request(env.sock, {"cmd": "reload"})["ok"] is True  # and once more over the control socket
        out, err = cli.communicate(timeout=30)
        assert out.split()[:3] == ["done", "True", FW_WAN], out + err
    finally:
        stop_process(srv)
    v = wait_promql(env, 'masqd_reloads_total{result="success"}', lambda x: x >= ok_before + 2)
    assert v == ok_before + 2
    # the new UDP timeout applies to new entries
    lab.exec("lan3", [sys.executable, "-c",
                      "import socket;s=socket.socket(2,2);s.sendto(b'x',('198.51.100.1',5999))"])
    rows = [r for r in request(env.sock, {"cmd": "table", "filter": "proto=udp"}) if r["remote"].endswith(":5999")]
    assert rows and 0 < rows[0]["expires_in"] <= 200


def test_invalid_reload_refused_running_config_intact(env: Env) -> None:
    lab = env.lab
    env.masqd.cfg_path.write_text(config(lab, udp=200), encoding="utf-8")
    request(env.sock, {"cmd": "reload"})
    fail_before = promql(env, 'masqd_reloads_total{result="failure"}')
    bad = config(lab, udp=123, extra='\n[firewall]\nrules = """\nipfwadm -0 -a accept -P tcp\n"""\n')
    env.masqd.cfg_path.write_text(bad, encoding="utf-8")
    with pytest.raises(ControlError, match="reload refused"):
        request(env.sock, {"cmd": "reload"})
    os.kill(env.masqd.pid, signal.SIGHUP)  # the SIGHUP path refuses it too
    v = wait_promql(env, 'masqd_reloads_total{result="failure"}', lambda x: x >= fail_before + 2)
    assert v == fail_before + 2
    assert wait_promql(env, "masqd_config_last_reload_successful", lambda x: x == 0) == 0
    log = env.masqd.log()
    errs = [json.loads(x) for x in log.splitlines() if '"config_reload_error"' in x]
    assert errs and all(e["source"] == str(env.masqd.cfg_path) for e in errs)
    assert any("firewall.rules:1" in e["error"] and "'-0'" in e["error"] for e in errs), errs
    # still routing, with the old timeout (200, not 123)
    lab.exec("lan3", [sys.executable, "-c",
                      "import socket;s=socket.socket(2,2);s.sendto(b'x',('198.51.100.1',5998))"])
    rows = [r for r in request(env.sock, {"cmd": "table", "filter": "proto=udp"}) if r["remote"].endswith(":5998")]
    assert rows and 123 < rows[0]["expires_in"] <= 200
    env.masqd.cfg_path.write_text(config(lab, udp=200), encoding="utf-8")
    request(env.sock, {"cmd": "reload"})


def test_hundred_reloads_under_traffic_lose_no_entry(env: Env) -> None:
    lab = env.lab
    echo = _popen_ready(lab, "srv1", SLOW, "echo-server", "8303")
    holders = _popen_ready(lab, "lan2", SLOW, "holders", SRV1, "8303", "8", stdin=True)
    stream_srv = _popen_ready(lab, "srv1", SLOW, "server", "8304")
    try:
        assert holders.stdin is not None and holders.stdout is not None
        before = {(r["lan"], r["wan"]) for r in request(env.sock, {"cmd": "table", "filter": "proto=tcp"})
                  if r["remote"] == f"{SRV1}:8303"}
        assert len(before) == 8
        stream = _popen_ready(lab, "lan3", SLOW, "client", SRV1, "8304", "150", "0.02")
        t0 = time.monotonic()
        for i in range(100):
            env.masqd.cfg_path.write_text(config(lab, udp=200 + (i % 2)), encoding="utf-8")
            assert request(env.sock, {"cmd": "reload"})["ok"]
            if i % 10 == 0:
                holders.stdin.write(f"ping{i}\n")
                holders.stdin.flush()
                assert holders.stdout.readline().strip() == "echoed 8"
            assert time.monotonic() - t0 < 120, "reloads too slow"
        out, err = stream.communicate(timeout=60)
        assert out.split()[:2] == ["done", "True"], out + err
        holders.stdin.write("last\n")
        holders.stdin.flush()
        assert holders.stdout.readline().strip() == "echoed 8"
        after = {(r["lan"], r["wan"]) for r in request(env.sock, {"cmd": "table", "filter": "proto=tcp"})
                 if r["remote"] == f"{SRV1}:8303"}
        assert after == before  # same entries, same WAN ports
        stats = request(env.sock, {"cmd": "stats"})
        assert stats["reloads"]["success"] >= 100
    finally:
        for p in (holders, echo, stream_srv):
            stop_process(p)
    text = _http(lab, "http://127.0.0.1:9598/metrics")
    assert re.search(r'^masqd_reloads_total\{result="success"\} (\d+)', text, re.M)


def _masqd(env: Env, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "masqd.cli", *args, "--socket", env.sock],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_table_rules_stats_flush_capture_and_wan_address(env: Env) -> None:
    lab = env.lab
    lab.exec("lan2", ["ping", "-c", "2", "-i", "0.2", "-W", "2", SRV1])
    t = _masqd(env, "table")
    assert t.returncode == 0 and "IP masquerading entries:" in t.stdout and "ICMP" in t.stdout, t.stderr
    rows = json.loads(_masqd(env, "table", "--json", "proto=icmp").stdout)
    assert rows and all(r["proto"] == "icmp" for r in rows)
    r = _masqd(env, "rules", "list")
    assert r.returncode == 0 and "policy MASQ" in r.stdout, r.stdout + r.stderr
    s = json.loads(_masqd(env, "stats", "--json").stdout)
    assert s["counters"]["tx_wan_icmp_packets"] >= 2 and s["wan_address"] == FW_WAN
    bad = _masqd(env, "flush", "colour=red")
    assert bad.returncode == 1 and "unknown field 'colour'" in bad.stderr and "Traceback" not in bad.stderr
    f = _masqd(env, "flush", "proto=icmp")
    assert f.returncode == 0 and f.stdout.startswith("removed "), f.stderr
    assert json.loads(_masqd(env, "table", "--json", "proto=icmp").stdout) == []

    # capture the WAN side while pinging; tshark decodes the Ethernet frames (TAP mode)
    pcap = env.tmp / "wan.pcap"
    cap = subprocess.Popen([sys.executable, "-m", "masqd.cli", "capture", "--iface", "wan", "-w", str(pcap),
                            "--duration", "3", "--socket", env.sock], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    lab.exec("lan2", ["ping", "-c", "3", "-i", "0.2", "-W", "2", SRV1])
    out, err = cap.communicate(timeout=30)
    assert cap.returncode == 0 and "packets written" in out, out + err
    ts = subprocess.run(["tshark", "-r", str(pcap), "-Y", "icmp", "-T", "fields", "-e", "eth.type",
                         "-e", "ip.src", "-e", "ip.dst", "-e", "icmp.type"], capture_output=True, text=True,
                        timeout=60)
    lines = [ln.split("\t") for ln in ts.stdout.splitlines()]
    assert [FW_WAN, SRV1, "8"] in [x[1:] for x in lines], ts.stdout + ts.stderr  # masqueraded echo request
    assert [SRV1, FW_WAN, "0"] in [x[1:] for x in lines]  # and its reply, as read from the WAN

    # the WAN address moves; new traffic uses it; then it moves back
    w = _masqd(env, "wan-address", "set", "203.0.113.201")
    assert w.returncode == 0 and "203.0.113.201/24" in w.stdout, w.stderr
    try:
        srv = lab.tool_server("srv1", ["udp-echo", "5355"])
        try:
            rc, rep = lab.tool("lan2", ["udp-client", SRV1, "5355", "3"])
        finally:
            stop_process(srv)
        assert rc == 0 and [p.split(":")[0] for p in rep["seen_as"]] == ["203.0.113.201"], rep
        assert wait_promql(env, "masqd_wan_address_changes_total", lambda x: x >= 1) >= 1
    finally:
        assert _masqd(env, "wan-address", "set", FW_WAN).returncode == 0
