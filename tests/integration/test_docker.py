"""The Docker image between two Docker networks: a LAN container reaches a WAN container through it.

A private dockerd runs inside a network namespace this test creates
(scripts/dockerd-ns), so its bridges and iptables rules never touch the
machine's network; its image store is cached in /var/cache/masqd-docker so a
second run only rebuilds the masqd layer. The image is built by
scripts/docker-build (debootstrap base + local wheels, no registry).

Topology (all inside the namespace):
  LAN network 10.88.0.0/24: masqd 10.88.0.2, client 10.88.0.10 (default route via masqd)
  WAN network 203.0.113.0/24: masqd 203.0.113.200, server 203.0.113.10
  management network 10.89.0.0/24: masqd 10.89.0.2 (metrics), kernel-owned
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCKER = "/usr/bin/docker"

SERVER = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(4)
while True:
    c, a = s.accept(); print("peer", a[0], flush=True)
    n = int(c.recv(64).decode().strip()); c.sendall(b"x" * n); c.close()
"""

CLIENT = r"""
ip route replace default via 10.88.0.2 || exit 3
ping -c 3 -W 2 203.0.113.10 || exit 4
python3 -c '
import socket, time
s = socket.create_connection(("203.0.113.10", 8080), timeout=10); s.sendall(b"4000000\n"); n = 0
while True:
    b = s.recv(65536)
    if not b: break
    n += len(b)
print("received", n)
'
"""


class Docker:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.env = dict(os.environ)
        self.host = ""

    def start(self) -> None:
        out = subprocess.run([str(ROOT / "scripts/dockerd-ns"), "start", self.prefix], capture_output=True,
                             text=True, timeout=1200)
        assert out.returncode == 0, out.stderr
        self.host = out.stdout.strip()
        self.env["DOCKER_HOST"] = self.host

    def stop(self) -> None:
        subprocess.run([str(ROOT / "scripts/dockerd-ns"), "stop", self.prefix], capture_output=True, timeout=180)

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([DOCKER, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check:
            assert r.returncode == 0, f"docker {' '.join(args)}: {r.stdout}{r.stderr}"
        return r


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    if os.geteuid() != 0:
        pytest.fail("the docker test needs root (network namespace + dockerd)")
    for tool in ("dockerd", "debootstrap"):
        assert shutil.which(tool), f"{tool} missing: scripts/setup installs it"
    d = Docker(f"mqd{os.getpid() % 10000}")
    try:
        d.start()
        yield d
    finally:
        d.stop()
    assert not Path(f"/run/netns/{d.prefix}-dk").exists()


def netns_get(prefix: str, url: str) -> str:
    code = f"import urllib.request;print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    r = subprocess.run(["nsenter", f"--net=/run/netns/{prefix}-dk", "python3", "-c", code],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_lan_container_reaches_wan_container_through_masqd(docker: Docker) -> None:
    t0 = time.monotonic()
    env = dict(docker.env)
    build = subprocess.run([str(ROOT / "scripts/docker-build"), f"masqd:{docker.prefix}"], capture_output=True,
                           text=True, env=env, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    image = f"masqd:{docker.prefix}"
    p = docker.prefix
    docker("network", "create", "--subnet", "10.88.0.0/24", "--gateway", "10.88.0.1", f"{p}-lan")
    docker("network", "create", "--subnet", "203.0.113.0/24", "--gateway", "203.0.113.1", f"{p}-wan")
    docker("network", "create", "--subnet", "10.89.0.0/24", "--gateway", "10.89.0.1", f"{p}-mgmt")
    docker("create", "--name", f"{p}-masqd", "--cap-add", "NET_ADMIN", "--device", "/dev/net/tun",
           "--network", f"{p}-lan", "--ip", "10.88.0.2",
           "-e", "MASQD_LAN_SUBNET=10.88.0.0/24", "-e", "MASQD_WAN_SUBNET=203.0.113.0/24", image)
    docker("network", "connect", "--ip", "203.0.113.200", f"{p}-wan", f"{p}-masqd")
    docker("network", "connect", "--ip", "10.89.0.2", f"{p}-mgmt", f"{p}-masqd")
    docker("start", f"{p}-masqd")
    docker("run", "-d", "--name", f"{p}-srv", "--network", f"{p}-wan", "--ip", "203.0.113.10",
           "--entrypoint", "python3", image, "-c", SERVER)

    # masqd up: metrics answer on the management network
    deadline = time.monotonic() + 30
    while True:
        try:
            netns_get(p, "http://10.89.0.2:9598/healthz")
            break
        except AssertionError:
            if time.monotonic() > deadline:
                logs = docker("logs", f"{p}-masqd", check=False)
                pytest.fail(f"masqd container did not come up:\n{logs.stdout}{logs.stderr}")
            time.sleep(0.5)

    cli = docker("run", "--rm", "--name", f"{p}-cli", "--cap-add", "NET_ADMIN", "--network", f"{p}-lan",
                 "--ip", "10.88.0.10", "--entrypoint", "sh", image, "-c", CLIENT, check=False)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "3 packets transmitted, 3 received" in cli.stdout
    assert "ttl=63" in cli.stdout  # one routed hop: masqd
    assert "received 4000000" in cli.stdout
    # the server saw the masqueraded address, not the client's
    assert "peer 203.0.113.200" in docker("logs", f"{p}-srv").stdout

    metrics = netns_get(p, "http://10.89.0.2:9598/metrics")
    vals: dict[str, float] = {}
    for line in metrics.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            vals[name] = float(v)
    # 4 MB in: at least 4000000/1460 segments on the wire (a super-packet counts as its segments);
    # the client's ACKs go out (fewer than one per segment: it acknowledges super-packets)
    assert vals['masqd_packets_total{direction="rx",interface="wan",protocol="tcp"}'] > 2700
    assert vals['masqd_packets_total{direction="tx",interface="wan",protocol="tcp"}'] > 10
    assert vals['masqd_packets_total{direction="tx",interface="lan",protocol="icmp"}'] >= 3
    assert vals['masqd_bytes_total{direction="tx",interface="lan",protocol="tcp"}'] > 4_000_000

    # masqd runs unprivileged with only CAP_NET_ADMIN; the kernel holds no LAN/WAN address
    status = docker("exec", f"{p}-masqd", "cat", "/proc/1/status").stdout
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    cap_eff = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
    assert uid != "0" and int(cap_eff, 16) == 1 << 12  # CAP_NET_ADMIN only
    addrs = json.loads(docker("exec", f"{p}-masqd", "ip", "-j", "-4", "addr").stdout)
    owned = {a["local"] for i in addrs for a in i.get("addr_info", [])}
    assert "10.88.0.2" not in owned and "203.0.113.200" not in owned and "10.89.0.2" in owned

    # the operator CLI works through docker exec (root in the container may use the 0600 socket)
    table = docker("exec", f"{p}-masqd", "masqd", "table").stdout
    assert "IP masquerading entries:" in table and "ICMP" in table and "203.0.113.10" in table, table
    # the image holds what a user runs (the lab and the demo too), not the interop test harness
    found = docker("exec", f"{p}-masqd", "python3", "-c",
                   "import importlib.util as u; print([u.find_spec(m) is not None for m in "
                   "('masqd.interop', 'masqd.lab.topology', 'masqd.lab.demo')])").stdout.strip()
    assert found == "[False, True, True]", found
    # the container log is JSON lines throughout (entrypoint, data plane, ops)
    logs = docker("logs", f"{p}-masqd").stdout + docker("logs", f"{p}-masqd").stderr
    events = [json.loads(line) for line in logs.splitlines() if line.strip()]
    names = {e.get("event") for e in events}
    assert "entrypoint_ready" in names and "metrics_listening" in names
    assert any(str(e.get("event", "")).startswith("opened lan device") for e in events)

    # the Docker healthcheck turns healthy
    deadline = time.monotonic() + 40
    health = ""
    while time.monotonic() < deadline:
        health = docker("inspect", "-f", "{{.State.Health.Status}}", f"{p}-masqd").stdout.strip()
        if health == "healthy":
            break
        time.sleep(1)
    assert health == "healthy"
    docker("rmi", "-f", image, check=False)
    print(f"docker test took {time.monotonic() - t0:.0f} s")
