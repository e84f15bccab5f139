"""TUN/TAP offloads end to end: super-packets and partial checksums through masqd, checked by a hop
that checksums in software (issue 10).

Between namespaces the kernel trusts a partial checksum and never verifies it,
so a wrong rewrite would still "work". Here the isp forwards with every offload
off on its links: each packet masqd wrote is completed (and cut, if a
super-packet) in software from the seed masqd left, and the receiver verifies
what arrives. Zero checksum errors at the receivers, content hashes equal, and
the far-side capture shows only correct checksums. A deliberately corrupted
packet proves the hop does catch errors.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from masqd.lab import FW_WAN, SRV1, Lab, stop_process

pytestmark = pytest.mark.integration

ALL = "csum,tso4,tso6,uso4,uso6"


def csum_errors(lab: Lab, role: str) -> int:
    """InCsumErrors of TCP and UDP in ``role`` (the kernel counts what it dropped)."""
    text = lab.exec(role, ["cat", "/proc/net/snmp"]).stdout
    total = 0
    for proto in ("Tcp", "Udp"):
        head, vals = [ln.split()[1:] for ln in text.splitlines() if ln.startswith(proto + ":")][:2]
        total += int(dict(zip(head, vals, strict=True)).get("InCsumErrors", 0))
    return total


def capture(lab: Lab, role: str, filt: str, count: int) -> subprocess.Popen[str]:
    proc = lab.popen(role, ["timeout", "60", "tcpdump", "-i", "eth0", "-n", "-vv", "-l", "-c", str(count),
                            *filt.split()], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(1.0)  # tcpdump is listening
    return proc


def upload(lab: Lab, nbytes: int, timeout: float = 30) -> dict[str, object]:
    """lan2 sends ``nbytes`` to srv1:8080 through masqd; both ends' sha256 must agree."""
    server = lab.tool_server("srv1", ["tcp-server", "8080"], timeout=timeout + 30)
    try:
        rc, rep = lab.tool("lan2", ["tcp-client", SRV1, "8080", str(nbytes)], timeout=timeout)
    finally:
        stop_process(server)
    assert rc == 0 and rep["ok"], rep
    return rep


def send_corrupted(lab: Lab, port: int) -> None:
    """A TCP segment with a wrong checksum from lan2 to srv1, through masqd (raw socket, scapy)."""
    script = (
        "from scapy.all import IP, TCP, send\n"
        f"send(IP(dst='{SRV1}')/TCP(sport=45678, dport={port}, flags='A', chksum=0x1234)/b'bad', verbose=0)\n"
    )
    lab.exec("lan2", [sys.executable, "-c", script], timeout=30)


@pytest.mark.parametrize("mode", ["tap", "tun"])
def test_transfers_with_offloads_arrive_with_correct_checksums(
        own_lab: Callable[[str, str], Lab], mode: str) -> None:
    lab = own_lab(mode, "o" if mode == "tap" else "p")
    lab.software_checksums("isp")
    m = lab.start_masqd()
    try:
        assert m.snapshot()["offload"] == ALL
        err0 = {r: csum_errors(lab, r) for r in ("srv1", "lan2")}
        dump = capture(lab, "srv1", f"dst host {SRV1} and tcp dst port 8080", 400)
        rep = upload(lab, 40 * 1024 * 1024, timeout=60)  # 40 MiB, sha256 equal on both ends
        assert str(rep["seen_as"]).split(":")[0] == FW_WAN
        # the other way: srv1 sends, lan2 receives (and verifies) through masqd
        iperf = lab.popen("srv1", ["iperf3", "-s", "-1", "-p", "5201"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        try:
            down = lab.exec("lan2", ["iperf3", "-c", SRV1, "-R", "-n", "40M", "-J"], timeout=60, check=False)
        finally:
            stop_process(iperf)
        assert '"sum_received"' in down.stdout, down.stdout[-2000:] + down.stderr
        snap = m.snapshot()
        assert snap["counters"].get("rx_super_packets", 0) > 100, snap["counters"]
        assert {r: csum_errors(lab, r) - err0[r] for r in err0} == {"srv1": 0, "lan2": 0}
        stop_process(dump)
        assert dump.stdout is not None
        checks = re.findall(r"cksum 0x[0-9a-f]+ \((correct|incorrect[^)]*)\)", dump.stdout.read())
        assert len(checks) > 100 and set(checks) == {"correct"}, (len(checks), checks[:5])
        # the control: a corrupted segment is caught by the same hop, capture and receiver
        dump = capture(lab, "srv1", f"dst host {SRV1} and tcp dst port 8080", 1)
        send_corrupted(lab, 8080)
        deadline = time.monotonic() + 5
        while csum_errors(lab, "srv1") == err0["srv1"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert csum_errors(lab, "srv1") == err0["srv1"] + 1
        out, _ = dump.communicate(timeout=10)
        assert "incorrect" in out, out
    finally:
        m.stop()


def test_offload_off_by_config_still_routes(own_lab: Callable[[str, str], Lab]) -> None:
    lab = own_lab("tap", "q")
    cfg = lab.masqd_config().replace('bridge = "br-lan"\n', 'bridge = "br-lan"\noffload = false\n')
    m = lab.start_masqd(cfg)
    try:
        assert m.snapshot()["offload"] == "none"
        assert "offloads off (config: lan)" in m.log()
        upload(lab, 2 * 1024 * 1024)
        assert m.snapshot()["counters"].get("rx_super_packets", 0) == 0
    finally:
        m.stop()


def test_rps_pins_masqd_and_steers_the_kernel_work(own_lab: Callable[[str, str], Lab]) -> None:
    """dataplane.rps = "auto": masqd runs on its first CPU, its devices' receive steering names
    the others, and traffic still flows (a 2-CPU machine: CPU 0 for masqd, mask 2 for the kernel)."""
    import os

    allowed = sorted(os.sched_getaffinity(0))
    assert len(allowed) >= 2, "this test needs two CPUs (the CI machine has two)"
    lab = own_lab("tap", "r")
    m = lab.start_masqd(lab.masqd_config() + '\n[dataplane]\nrps = "auto"\n')
    try:
        mask = sum(1 << c for c in allowed[1:])
        assert m.snapshot()["rps"] == {"cpu": allowed[0], "mask": f"{mask:x}"}
        assert os.sched_getaffinity(m.pid) == {allowed[0]}
        for dev in (f"{lab.prefix}-lan", f"{lab.prefix}-wan"):
            got = lab.exec("sw", ["cat", f"/sys/class/net/{dev}/queues/rx-0/rps_cpus"]).stdout
            assert int(got.strip().replace(",", ""), 16) == mask, (dev, got)
        upload(lab, 4 * 1024 * 1024)
    finally:
        m.stop()


@pytest.mark.parametrize(("setting", "value"), [
    ("rps", '"sometimes"'), ("rps", '"0"'), ("rps", '"xyz"'),
    ("napi", '"on"'), ("napi", '"1"'), ("napi", '"poll"'),
])
def test_bad_dataplane_setting_is_refused_by_check(setting: str, value: str) -> None:
    from masqd.config import ConfigError, loads

    text = f'[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "203.0.113.200/24"\n[dataplane]\n{setting} = {value}\n'
    with pytest.raises(ConfigError) as exc:
        loads(text)
    assert any(e.startswith(f"dataplane.{setting}:") for e in exc.value.errors), exc.value.errors


def napi_threads() -> dict[int, str]:
    """The kernel's NAPI threads (``napi/<device>-<id>``) by PID."""
    out: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm", encoding="ascii") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if comm.startswith("napi/"):
                out[int(entry)] = comm
    return out


def run_ns(pid: int) -> int:
    """Nanoseconds a thread has run (schedstat: exact, where /proc/PID/stat counts 10 ms ticks)."""
    with open(f"/proc/{pid}/schedstat", encoding="ascii") as f:
        return int(f.read().split()[0])


@pytest.mark.parametrize("mode", ["tap", "tun"])
def test_threaded_napi_moves_the_receive_work_to_kernel_threads(
        own_lab: Callable[[str, str], Lab], mode: str) -> None:
    """dataplane.napi = "threaded": both devices get IFF_NAPI and threaded NAPI, a kernel thread
    per device appears, traffic flows both ways with content intact, and the work after masqd's
    writes is done by those threads (their CPU time grows during the transfers)."""
    before = set(napi_threads())
    lab = own_lab(mode, "n")
    m = lab.start_masqd(lab.masqd_config() + '\n[dataplane]\nnapi = "threaded"\n')
    try:
        assert m.snapshot()["napi"] == {"lan": "threaded", "wan": "threaded"}
        ours = {pid: comm for pid, comm in napi_threads().items() if pid not in before}
        assert len(ours) >= 2, ours
        devices = [(f"{lab.prefix}-lan", "sw"), (f"{lab.prefix}-wan", "sw")] if mode == "tap" else \
            [("tun-lan", "lanedge"), ("tun-wan", "wanedge")]
        for dev, role in devices:
            assert lab.exec(role, ["cat", f"/sys/class/net/{dev}/threaded"]).stdout.strip() in ("1", "enabled")
        ran = sum(run_ns(p) for p in ours)
        upload(lab, 8 * 1024 * 1024)
        out = lab.exec("lan2", ["ping", "-c", "20", "-i", "0.01", "-W", "1", SRV1]).stdout
        assert " 0% packet loss" in out, out
        assert sum(run_ns(p) for p in ours) > ran + 1_000_000  # over 1 ms of receive work
    finally:
        rc = m.stop()
    assert rc == 0, m.log()


@pytest.mark.parametrize("mode", ["tap", "tun"])
def test_adaptive_napi_turns_the_threads_on_under_load_and_off_when_quiet(
        own_lab: Callable[[str, str], Lab], mode: str) -> None:
    """dataplane.napi = "adaptive": the devices start with their NAPI threads off (the receive work
    inline, for latency), a small-packet load turns them on, a quiet second turns them off, and bulk
    TCP leaves them off."""
    lab = own_lab(mode, "a")
    m = lab.start_masqd(lab.masqd_config() + '\n[dataplane]\nnapi = "adaptive"\n')
    devices = [(f"{lab.prefix}-lan", "sw"), (f"{lab.prefix}-wan", "sw")] if mode == "tap" else \
        [("tun-lan", "lanedge"), ("tun-wan", "wanedge")]

    def threaded() -> set[str]:
        return {lab.exec(role, ["cat", f"/sys/class/net/{dev}/threaded"]).stdout.strip() for dev, role in devices}

    srv = lab.popen("srv1", ["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert m.snapshot()["napi"] == {"lan": "adaptive (inline)", "wan": "adaptive (inline)"}
        assert threaded() <= {"0", "disabled"}
        time.sleep(0.5)
        # 40 000 small packets per second for 2 s: above the 20 000/s that turns the threads on
        lab.exec("lan2", ["iperf3", "-c", SRV1, "-u", "-l", "64", "-b", str(40000 * 64 * 8), "-t", "2"],
                 timeout=30)
        snap = m.snapshot()
        assert snap["napi"] == {"lan": "adaptive (threaded)", "wan": "adaptive (threaded)"}, snap["napi"]
        assert threaded() <= {"1", "enabled"}
        assert snap["counters"]["dp_napi_switches"] == 1
        deadline = time.monotonic() + 10
        while m.snapshot()["napi"]["lan"] != "adaptive (inline)" and time.monotonic() < deadline:
            time.sleep(0.2)
        snap = m.snapshot()
        assert snap["napi"] == {"lan": "adaptive (inline)", "wan": "adaptive (inline)"}, snap["napi"]
        assert threaded() <= {"0", "disabled"}
        assert snap["counters"]["dp_napi_switches"] == 2
        # bulk TCP (super-packets) leaves them off, however many packets a second it makes: one
        # stream went faster with the receive work inline
        supers = snap["counters"].get("rx_super_packets", 0)
        lab.exec("lan2", ["iperf3", "-c", SRV1, "-t", "2"], timeout=30)
        snap = m.snapshot()
        assert snap["counters"].get("rx_super_packets", 0) > supers + 1000
        assert snap["napi"] == {"lan": "adaptive (inline)", "wan": "adaptive (inline)"}, snap["napi"]
        assert snap["counters"]["dp_napi_switches"] == 2
        assert "dp_napi_switch_errors" not in snap["counters"]
        out = lab.exec("lan2", ["ping", "-c", "20", "-i", "0.01", "-W", "1", SRV1]).stdout
        assert " 0% packet loss" in out, out
    finally:
        stop_process(srv)
        rc = m.stop()
    assert rc == 0, m.log()


def test_dataplane_changes_need_a_restart_not_a_reload() -> None:
    from masqd.config import loads
    from masqd.ops.reload import restart_only_changes

    base = '[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "203.0.113.200/24"\n'
    old = loads(base)
    assert restart_only_changes(old, loads(base)) == []
    new = loads(base + '[dataplane]\nnapi = "threaded"\nrps = "auto"\n')
    got = restart_only_changes(old, new)
    assert [g.split(":")[0] for g in got] == ["dataplane.rps", "dataplane.napi"], got


RECEIVER = """
import socket, sys, hashlib
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: room for every datagram
s.bind(("0.0.0.0", 9999)); s.settimeout(5)
print("ready", flush=True)
got = []
try:
    while len(got) < 400:
        d, peer = s.recvfrom(65535)
        got.append((d, peer[0]))
except socket.timeout:
    pass
ok = sum(1 for d, _ in got if len(d) == 1000 and d == bytes([d[0]]) * 1000)
print(len(got), ok, sorted({p for _, p in got}))
"""

SENDER = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_UDP, 103, 1000)  # UDP_SEGMENT: one send, the kernel cuts 1000-byte datagrams
s.connect((%r, 9999))
for i in range(20):
    s.send(b"".join(bytes([(i * 20 + k) %% 256]) * 1000 for k in range(20)))
    if i == 0:
        time.sleep(1)  # the first waits for ARP (in lan2, then in masqd): one super-packet queued each
"""


def test_udp_segmentation_offload_through_masqd(own_lab: Callable[[str, str], Lab]) -> None:
    """A sender using UDP_SEGMENT hands masqd UDP super-packets (USO): the first takes the full
    path (new flow) and is re-armed, the rest the fast path; 400 datagrams of 1000 bytes arrive
    whole, from masqd's address, checked by the software-checksumming hop. masqd starts with
    its gateway unresolved: the first super-packet waits in the ARP queue with its header."""
    lab = own_lab("tap", "s")
    lab.software_checksums("isp")
    m = lab.start_masqd()
    try:
        err0 = csum_errors(lab, "srv1")
        rx = lab.popen("srv1", [sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
        assert rx.stdout is not None and rx.stdout.readline().strip() == "ready"
        lab.exec("lan2", [sys.executable, "-c", SENDER % SRV1], timeout=30)
        out, _ = rx.communicate(timeout=30)
        total, good, peers = out.split(maxsplit=2)
        assert (int(total), int(good), peers.strip()) == (400, 400, f"['{FW_WAN}']")
        assert csum_errors(lab, "srv1") == err0
        assert m.snapshot()["counters"].get("rx_super_packets", 0) >= 20
    finally:
        m.stop()
