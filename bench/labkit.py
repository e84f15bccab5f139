"""What the lab stress tools share: more LAN hosts, traffic programs for the lab hosts, readings.

One job: the pieces of bench/soak.py, bench/flood.py and
tests/integration/test_flood.py that are not the scenario itself. Traffic
programs are Python sources run inside a lab namespace (``python -c``); each
one is bounded in time (and the flood in count), talks only to lab addresses
(198.51.100.0/24, 198.18.0.0/15, the lab's 203.0.113.0/24) and prints one JSON
line. Readings: masqd's RSS from /proc, its counters over the control socket,
ping's summary line, and whether this masqd has per-host limits.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

from masqd.lab import Lab, stop_process

# ------------------------------------------------------------------------------------------
# more LAN hosts


def add_lan_hosts(lab: Lab, count: int, first: int = 10) -> list[tuple[str, str]]:
    """``count`` more LAN hosts, ``{p}-lanN`` with 10.0.0.N/8 (N from ``first``), on the LAN bridge
    like lan2 and lan3, masqd (10.0.0.1) their default gateway. ``Lab.down`` removes them with the
    rest (it finds namespaces by prefix). Returns (role, address) pairs."""
    hosts = []
    for i in range(first, first + count):
        role, addr = f"lan{i}", f"10.0.0.{i}"
        ns = lab.ns(role)
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        subprocess.run(["ip", "-n", lab.ns("sw"), "link", "add", role, "type", "veth", "peer", "name", "eth0",
                        "netns", ns], check=True)
        subprocess.run(["ip", "-n", lab.ns("sw"), "link", "set", role, "master", "br-lan", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "-batch", "-"], check=True, text=True,
                       input=f"link set lo up\naddr add {addr}/8 dev eth0\nlink set eth0 up\n"
                             f"route add default via 10.0.0.1\n")
        hosts.append((role, addr))
    return hosts


# ------------------------------------------------------------------------------------------
# traffic programs (run with ``python -c``; argv as documented in each)

# flood SRC COUNT SECONDS [RATE]: UDP from random source ports of SRC to random addresses of
# 198.18.0.0/15 (port 9), as fast as one process can send (or RATE packets per second), at most
# COUNT packets and SECONDS.
FLOOD = r"""
import json, random, socket, struct, sys, time
src, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rate = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
buf = bytearray(struct.pack("!BBHHHBBH4s4sHHHH", 0x45, 0, 44, 0, 0, 64, 17, 0, socket.inet_aton(src),
                            bytes(4), 0, 9, 24, 0) + b"masqd-lab-flood!")
r = random.Random(18)
base = (198 << 24) | (18 << 16)  # 198.18.0.0/15: the benchmarking block, nothing else
t0 = time.monotonic()
end, n, errors = t0 + seconds, 0, 0
while n < count:
    if n & 255 == 0:
        now = time.monotonic()
        if now > end:
            break
        if rate and t0 + n / rate > now:
            time.sleep(t0 + n / rate - now)
    dst = base | r.getrandbits(17)
    struct.pack_into("!I", buf, 16, dst)
    struct.pack_into("!H", buf, 20, 1024 + r.randrange(64512))
    try:
        s.sendto(buf, (socket.inet_ntoa(struct.pack("!I", dst)), 0))
    except OSError:
        errors += 1
    n += 1
dt = time.monotonic() - t0
print(json.dumps({"sent": n, "errors": errors, "seconds": round(dt, 3), "pps": round(n / dt) if dt else 0}))
"""

# servers SECONDS TCP_PORT UDP_PORT: a TCP server (each connection: read to EOF, answer the
# sha256 of what came) and a UDP echo, both for SECONDS at most. Prints "ready" once listening.
SERVERS = r"""
import hashlib, json, socket, socketserver, sys, threading, time
seconds, tport, uport = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
class H(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(20)
        h = hashlib.sha256()
        try:
            while True:
                b = self.request.recv(65536)
                if not b:
                    break
                h.update(b)
            self.request.sendall(h.hexdigest().encode())
        except OSError:
            pass
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128
tcp = S(("0.0.0.0", tport), H)
threading.Thread(target=tcp.serve_forever, daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
u.bind(("0.0.0.0", uport))
u.settimeout(0.2)
print("ready", flush=True)
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end:
    try:
        d, peer = u.recvfrom(65535)
    except OSError:
        continue
    u.sendto(d, peer)
    n += 1
tcp.shutdown()
print(json.dumps({"udp_echoed": n}), flush=True)
"""

# churn SECONDS SERVER TCP_PORT UDP_PORT SEED: short TCP connections (1 B - 64 KiB, the answer
# must be their sha256) and short UDP flows (a new source port each, 3 datagrams, each echoed)
# back to back with short pauses, until SECONDS. Prints counts and the failures' times.
CHURN = r"""
import hashlib, json, os, random, socket, sys, time
seconds, server, tport, uport, seed = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
r = random.Random(seed)
end = time.monotonic() + seconds
res = {"tcp_ok": 0, "tcp_fail": 0, "udp_ok": 0, "udp_fail": 0, "failures": []}
def fail(kind, err):
    res[kind + "_fail"] += 1
    if len(res["failures"]) < 2000:
        res["failures"].append([round(time.time(), 3), kind, str(err)[:80]])
while time.monotonic() < end:
    t = time.time()
    if r.random() < 0.5:
        data = os.urandom(r.choice([1, 100, 1400, 8000, 65536]))
        try:
            with socket.create_connection((server, tport), timeout=5) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while True:
                    b = s.recv(4096)
                    if not b:
                        break
                    got += b
            if got.decode() == hashlib.sha256(data).hexdigest():
                res["tcp_ok"] += 1
            else:
                fail("tcp", "bad digest")
        except OSError as e:
            fail("tcp", e)
    else:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(1.0)
                s.connect((server, uport))
                for i in range(3):
                    msg = os.urandom(r.choice([8, 200, 1200]))
                    s.send(msg)
                    while s.recv(65535) != msg:
                        pass
            res["udp_ok"] += 1
        except OSError as e:
            fail("udp", e)
    time.sleep(r.random() * 0.05)
print(json.dumps(res), flush=True)
"""

# probe SECONDS SERVER UDP_PORT RATE: datagrams numbered 0, 1, ... at RATE per second from one
# socket (one long-lived flow) to the UDP echo; prints how many were sent and, for each one
# whose echo never came, its number and the wall-clock time it was sent.
PROBE = r"""
import json, socket, struct, sys, threading, time
seconds, server, uport, rate = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
s.connect((server, uport))
s.settimeout(0.2)
sent_at = []
got = set()
stop = threading.Event()
def rx():
    while not stop.is_set():
        try:
            d = s.recv(2048)
        except OSError:
            continue
        if len(d) >= 4:
            got.add(struct.unpack_from("!I", d)[0])
threading.Thread(target=rx, daemon=True).start()
t0 = time.monotonic()
n = 0
while True:
    due = t0 + n / rate
    now = time.monotonic()
    if now - t0 > seconds:
        break
    if due > now:
        time.sleep(due - now)
    sent_at.append(time.time())
    try:
        s.send(struct.pack("!I", n) + b"probe" * 8)
    except OSError:
        pass
    n += 1
time.sleep(2.0)  # the last echoes
stop.set()
lost = [[i, round(sent_at[i], 4)] for i in range(n) if i not in got]
print(json.dumps({"sent": n, "echoed": n - len(lost), "lost": lost[:200000], "rate": rate,
                  "t0": sent_at[0] if sent_at else 0.0}), flush=True)
"""


def start(lab: Lab, role: str, script: str, *args: object, ready: bool = False) -> subprocess.Popen[str]:
    """Run a traffic program in ``role``; with ``ready``, wait for its "ready" line."""
    p = lab.popen(role, [sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
    if ready:
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        if line != "ready":
            stop_process(p)
            raise RuntimeError(f"traffic program in {role} did not start: {line!r} "
                               f"{p.stderr.read() if p.stderr else ''}")
    return p


def result(p: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The JSON line a traffic program printed last (stopped by PID if it outlives ``timeout``)."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(p)
        out, err = p.communicate()
    for line in reversed((out or "").splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    return {"error": (err or out or "").strip()[-500:]}


# ------------------------------------------------------------------------------------------
# readings


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS), KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def ping_summary(text: str) -> dict[str, float]:
    """transmitted, received and loss % from ping's summary line (zeros if there is none)."""
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    if not m:
        return {"sent": 0, "received": 0, "loss_pct": 100.0}
    sent, recv = int(m.group(1)), int(m.group(2))
    return {"sent": sent, "received": recv, "loss_pct": round(100.0 * (sent - recv) / sent, 2) if sent else 100.0}


def host_limits_key() -> str | None:
    """The configuration key of per-host limits (issue 18), when this masqd has one: the first
    key whose dotted path names both a host and a limit (``masquerade.per_host_limit``,
    ``[limits] per_host...``, ``host_limits``...). None on a masqd without per-host limits."""
    from pydantic import BaseModel

    from masqd.config import Config

    def walk(model: type[BaseModel], path: str) -> str | None:
        for name, field in model.model_fields.items():
            p = f"{path}.{name}" if path else name
            if "host" in p.lower() and "limit" in p.lower():
                return p
            ann = field.annotation
            for t in (ann, *getattr(ann, "__args__", ())):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    found = walk(t, p)
                    if found:
                        return found
        return None

    return walk(Config, "")


def host_limit_drops(counters: dict[str, Any]) -> dict[str, int]:
    """The per-host limits' drop counters (``drop_host_*``) that moved."""
    return {k: int(v) for k, v in counters.items() if k.startswith("drop_host_") and v}
