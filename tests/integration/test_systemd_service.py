"""deploy/masqd.service under a real systemd: readiness, routing, reload, watchdog restart, stop.

This machine's PID 1 is not systemd, so the test boots one: the Debian
``systemd`` binary as PID 1 of new PID, mount, UTS, IPC and cgroup
namespaces, inside the lab's ``{p}-sw`` network namespace (the one holding
the bridges), much as systemd-nspawn would (nspawn is not installed:
installing systemd-container would upgrade the machine's systemd). Its
view: tmpfs on /run (with the machine's /run/netns bound in), /tmp, /var/log/journal and /etc/systemd/system (the
host's enabled units stay hidden), /proc/sys read-only, a cgroup subtree of
its own (name=systemd and the unified hierarchy), /dev/console a log file.

The unit under test is deploy/masqd.service as shipped, with two changes:
ExecStart runs this checkout (bound into the container at /run/masqd-src)
under the venv's Python with a config file in the container's /run, and a drop-in sets ``DefaultDependencies=no`` — the host's sysinit units (sysusers, tmpfiles,
random-seed, modules-load) would otherwise run against the file system the
container shares with the host. The target that boots pulls in masqd and
journald only. masqd's devices live in its own network namespace ({p}-sw)
and join the bridges there, so the unit's CAP_NET_ADMIN is all it needs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from masqd.lab import FW_LAN, FW_WAN, ISP_WAN, SRV1, Lab
from masqd.ops.control import request

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "masqd.service"
CAP_NET_ADMIN = 1 << 12
CAP_SYS_ADMIN = 1 << 21

STAGE1 = """#!/bin/sh
# In the lab's network namespace and a private mount namespace: a cgroup subtree of our own,
# then new PID/UTS/IPC/cgroup namespaces with systemd as PID 1 (stage 2).
set -eu
dir=$1; cg=$2
mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
for h in systemd unified; do mkdir -p /sys/fs/cgroup/$h/$cg; echo $$ > /sys/fs/cgroup/$h/$cg/cgroup.procs; done
echo $$ > "$dir/stage1.pid"
exec unshare --cgroup --pid --uts --ipc --fork --mount-proc "$dir/stage2" "$dir"
"""

STAGE2 = """#!/bin/sh
set -eu
dir=$1
umount -l /sys/fs/cgroup
mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
mount --bind "$dir/console.log" /dev/console
mkdir -p "$dir/netns" "$dir/src"
mount --rbind /run/netns "$dir/netns"
mount --rbind "$(cat "$dir/src.path")" "$dir/src"
mount -t tmpfs -o mode=755 tmpfs /run
mkdir /run/netns /run/masqd-src
mount --move "$dir/netns" /run/netns
mount --move "$dir/src" /run/masqd-src
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /var/log/journal
mount -t tmpfs -o mode=755 tmpfs /etc/systemd/system
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
cp -r "$dir/units/." /etc/systemd/system/
mkdir -p /run/masqd-test
cp "$dir/masqd.toml" /run/masqd-test/masqd.toml
exec env -i container=masqd-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \\
    /lib/systemd/systemd --unit=masqd-test.target --show-status=no
"""

TARGET = """[Unit]
Description=masqd under test
DefaultDependencies=no
Wants=systemd-journald.socket systemd-journald.service masqd.service
"""


def own_namespace_config(lab: Lab) -> str:
    """masqd in {p}-sw with its devices there too, on the bridges: no netns placement."""
    p = lab.prefix
    return (f'[lan]\nname = "{p}-lan"\nmode = "tap"\naddress = "{FW_LAN}/8"\nbridge = "br-lan"\n\n'
            f'[wan]\nname = "{p}-wan"\nmode = "tap"\naddress = "{FW_WAN}/24"\ngateway = "{ISP_WAN}"\n'
            f'bridge = "br-wan"\n\n[metrics]\nlisten = "127.0.0.1:9598"\n')


class SystemdContainer:
    """systemd as PID 1 in the lab's ``{p}-sw`` namespace; ``run`` executes a command inside."""

    def __init__(self, lab: Lab, role: str, config: str, dropins: dict[str, str]) -> None:
        self.lab = lab
        self.dir = Path(f"/var/tmp/masqd-sd-{lab.prefix}")  # not /tmp or /run: stage 2 covers those
        self.cgroup = f"masqd-sd-{lab.prefix}"
        shutil.rmtree(self.dir, ignore_errors=True)
        units = self.dir / "units"
        (units / "masqd.service.d").mkdir(parents=True)
        (units / "masqd.service").write_text(rendered_unit())
        for name, text in {"test.conf": "[Unit]\nDefaultDependencies=no\n", **dropins}.items():
            (units / "masqd.service.d" / name).write_text(text)
        (units / "masqd-test.target").write_text(TARGET)
        (self.dir / "masqd.toml").write_text(config)
        (self.dir / "src.path").write_text(str(ROOT))
        (self.dir / "console.log").write_text("")
        for name, text in (("stage1", STAGE1), ("stage2", STAGE2)):
            (self.dir / name).write_text(text)
            (self.dir / name).chmod(0o755)
        self.log = open(self.dir / "boot.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns(role), "unshare", "--mount", "--propagation", "private",
             str(self.dir / "stage1"), str(self.dir), self.cgroup],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid1 = self._find_pid1()
        deadline = time.monotonic() + 15
        while self.run("systemctl", "is-system-running", check=False).stdout.strip() not in (
                "initializing", "starting", "running", "degraded"):
            assert time.monotonic() < deadline, f"systemd does not answer: {self.diagnostics()}"
            time.sleep(0.1)  # PID 1 is there, its private socket not yet

    def _find_pid1(self) -> int:
        deadline = time.monotonic() + 10
        pidfile = self.dir / "stage1.pid"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the container did not start: {self.diagnostics()}")
            if pidfile.exists() and pidfile.read_text().strip():
                parent = int(pidfile.read_text())
                try:
                    kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
                except OSError:
                    kids = []
                if kids and Path(f"/proc/{kids[0]}/exe").resolve().name == "systemd":
                    return int(kids[0])
            time.sleep(0.05)
        raise RuntimeError(f"systemd did not come up: {self.diagnostics()}")

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        cp = subprocess.run(["nsenter", "-t", str(self.pid1), "-m", "-p", "-n", "-u", "-i", "-C", "--", *argv],
                            capture_output=True, text=True, timeout=timeout)
        if check and cp.returncode != 0:
            raise AssertionError(f"{argv} failed ({cp.returncode}): {cp.stdout}{cp.stderr}\n{self.diagnostics()}")
        return cp

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, unit: str, timeout: float, **want: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.show(unit, *want, "ActiveState", "SubState", "MainPID", "StatusText", "NRestarts")
            if all(got.get(k) == v for k, v in want.items()):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit}: wanted {want}, have {got}\n{self.diagnostics_all()}")
            time.sleep(0.1)

    def diagnostics_all(self) -> str:
        return self.diagnostics() + "\n--- journal\n" + self.journal()[-3000:]

    def journal(self) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", "masqd.service", check=False).stdout

    def host_pid(self, pid: int) -> int:
        """The machine's PID of the container's process ``pid`` (from NSpid in /proc)."""
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                status = (d / "status").read_text()
            except OSError:
                continue
            m = re.search(r"^NSpid:\s+(\d+)\s+(\d+)$", status, re.M)
            if m and int(m.group(2)) == pid and self._in_container(int(m.group(1))):
                return int(m.group(1))
        raise LookupError(pid)

    def _in_container(self, pid: int) -> bool:
        try:
            return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{self.pid1}/ns/pid")
        except OSError:
            return False

    def diagnostics(self) -> str:
        parts = []
        for name in ("boot.log", "console.log"):
            try:
                parts.append(f"--- {name}\n" + (self.dir / name).read_text(errors="replace")[-3000:])
            except OSError:
                pass
        return "\n".join(parts)

    def stop(self) -> None:
        """Power the container off (SIGRTMIN+4 to its PID 1), SIGKILL if it does not go; clean up."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid1, signal.SIGRTMIN + 4)
                self.proc.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.kill(self.pid1, signal.SIGKILL)  # ends every process of its PID namespace
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self.log.close()
        for hier in ("systemd", "unified"):
            base = Path("/sys/fs/cgroup") / hier / self.cgroup
            for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                d.rmdir()
            if base.exists():
                base.rmdir()
        shutil.rmtree(self.dir, ignore_errors=True)


def rendered_unit() -> str:
    """The shipped unit, its ExecStart running this checkout (bound at /run/masqd-src in the
    container, wherever it lives on the machine: the unit's PrivateTmp and the container's own /tmp
    would hide a checkout under /tmp) with the venv's packages, under the venv's Python."""
    text = UNIT.read_text()
    shipped = "ExecStart=/opt/masqd/bin/masqd run -c /etc/masqd/masqd.toml\n"
    assert shipped in text
    site = Path(sysconfig.get_paths()["purelib"]).resolve().relative_to(ROOT)
    return text.replace(shipped, f"ExecStart={os.path.realpath(sys.executable)} -m masqd run -c "
                                 "/run/masqd-test/masqd.toml\n"
                                 f"Environment=PYTHONPATH=/run/masqd-src:/run/masqd-src/{site}\n")


@pytest.fixture(scope="module")
def box(stale_labs_removed: None) -> Iterator[tuple[Lab, SystemdContainer]]:
    lab = Lab(f"t{os.getpid()}s", mode="tap")  # the per-run prefix of tests/conftest.py
    lab.down()
    lab.up()
    sd = None
    try:
        sd = SystemdContainer(lab, "sw", own_namespace_config(lab), {})
        yield lab, sd
    finally:
        if sd is not None:
            sd.stop()
        lab.down()


def sw_devices(lab: Lab) -> dict[str, str]:
    """Device name -> its line of ``ip -o link`` in ``{p}-sw``."""
    out = {}
    for line in lab.exec("sw", ["ip", "-o", "link", "show"]).stdout.splitlines():
        out[line.split(":")[1].strip().split("@")[0]] = line
    return out


def test_started_ready_and_routing(box: tuple[Lab, SystemdContainer]) -> None:
    lab, sd = box
    st = sd.wait_for("masqd.service", 20, ActiveState="active", SubState="running")
    m = re.match(r"entries \d+; packets in: lan (\d+), wan \d+; WAN 203\.0\.113\.200/24", st["StatusText"])
    assert m, st
    before = int(m.group(1))
    devs = sw_devices(lab)
    assert "master br-lan" in devs[f"{lab.prefix}-lan"] and "master br-wan" in devs[f"{lab.prefix}-wan"]
    out = lab.exec("lan2", ["ping", "-c", "2", "-i", "0.2", "-W", "2", SRV1]).stdout
    assert " 0% packet loss" in out
    deadline = time.monotonic() + 8
    while f"packets in: lan {before}," in sd.show("masqd.service", "StatusText")["StatusText"]:
        assert time.monotonic() < deadline, "STATUS= did not follow the traffic"
        time.sleep(0.2)


def test_hardening_is_in_force(box: tuple[Lab, SystemdContainer]) -> None:
    lab, sd = box
    st = sd.wait_for("masqd.service", 20, ActiveState="active")
    status = sd.run("cat", f"/proc/{st['MainPID']}/status").stdout
    fields = dict(re.findall(r"^(\w+):\s+(.*)$", status, re.M))
    assert int(fields["CapEff"], 16) == CAP_NET_ADMIN, fields["CapEff"]
    assert int(fields["CapBnd"], 16) == CAP_NET_ADMIN, fields["CapBnd"]
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2", fields
    journal = sd.journal()
    # the devices' sysfs stays writable for threaded NAPI (ReadWritePaths=/sys/devices/virtual/net)
    assert "refused" not in journal and "Traceback" not in journal, journal
    napi = lab.exec("sw", ["cat", f"/sys/class/net/{lab.prefix}-lan/threaded"]).stdout.strip()
    assert napi in ("0", "1")
    # ProtectSystem=strict: the service sees / read-only, its state and runtime directories writable
    mounts = {ln.split()[4]: ln.split()[5] for ln in
              sd.run("cat", f"/proc/{st['MainPID']}/mountinfo").stdout.splitlines()}
    assert mounts["/"].startswith("ro"), mounts
    assert mounts["/var/lib/masqd"].startswith("rw") and mounts["/sys/devices/virtual/net"].startswith("rw")


def test_reload_keeps_the_process_and_refuses_a_bad_file(box: tuple[Lab, SystemdContainer]) -> None:
    lab, sd = box
    before = sd.wait_for("masqd.service", 20, ActiveState="active")
    sock = f"/proc/{sd.pid1}/root/run/masqd/masqd.sock"
    sd.run("systemctl", "reload", "masqd.service")
    st = sd.wait_for("masqd.service", 10, ActiveState="active", SubState="running")
    assert st["MainPID"] == before["MainPID"]
    deadline = time.monotonic() + 5
    while request(sock, {"cmd": "stats"})["reloads"]["success"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    sd.run("sh", "-c", "echo '[lan' > /run/masqd-test/masqd.toml")
    sd.run("systemctl", "reload", "masqd.service")
    deadline = time.monotonic() + 5
    while "last reload refused" not in sd.show("masqd.service", "StatusText")["StatusText"]:
        assert time.monotonic() < deadline, sd.journal()
        time.sleep(0.1)
    assert sd.show("masqd.service", "MainPID", "ActiveState") == {"MainPID": before["MainPID"],
                                                                  "ActiveState": "active"}
    sd.run("cp", str(sd.dir / "masqd.toml"), "/run/masqd-test/masqd.toml")


def abort_pending(pid: int) -> bool:
    """Whether SIGABRT reached process ``pid``: pending (SigPnd/ShdPnd in /proc), or the process
    has already ended."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True  # it was delivered: the process is gone
    bit = 1 << (signal.SIGABRT - 1)
    return any(int(m.group(1), 16) & bit for m in re.finditer(r"^(?:SigPnd|ShdPnd):\s+([0-9a-f]+)$", status, re.M))


def test_watchdog_restarts_a_loop_that_stopped(box: tuple[Lab, SystemdContainer]) -> None:
    """SIGSTOP stands for a stuck event loop: no WATCHDOG=1 arrives, systemd aborts masqd (the
    Python traceback of where it stood goes to the journal) and starts it again."""
    lab, sd = box
    sd.run("sh", "-c", "mkdir -p /run/systemd/system/masqd.service.d && printf '[Service]\\nWatchdogSec=2s\\n' "
                       "> /run/systemd/system/masqd.service.d/watchdog.conf")
    sd.run("systemctl", "daemon-reload")
    sd.run("systemctl", "restart", "masqd.service")
    st = sd.wait_for("masqd.service", 20, ActiveState="active", SubState="running")
    assert sd.show("masqd.service", "WatchdogUSec")["WatchdogUSec"] == "2s"
    time.sleep(3)  # pings keep it alive past the watchdog interval
    st = sd.wait_for("masqd.service", 1, ActiveState="active", MainPID=st["MainPID"])
    hpid = sd.host_pid(int(st["MainPID"]))
    restarts = int(st["NRestarts"])
    os.kill(hpid, signal.SIGSTOP)
    try:
        # systemd's watchdog signal (SIGABRT) arrives; systemd follows it with SIGCONT, so the
        # process ends at once (or the signal waits, pending, until the SIGCONT below)
        deadline = time.monotonic() + 10
        while not abort_pending(hpid):
            assert time.monotonic() < deadline, f"no SIGABRT from the watchdog\n{sd.diagnostics_all()}"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hpid, signal.SIGCONT)  # the pending SIGABRT now ends it
    st2 = sd.wait_for("masqd.service", 20, ActiveState="active", SubState="running",
                      NRestarts=str(restarts + 1))
    assert st2["MainPID"] != st["MainPID"]
    journal = sd.journal()
    assert "Watchdog timeout" in journal and "Fatal Python error: Aborted" in journal, journal
    out = lab.exec("lan2", ["ping", "-c", "1", "-W", "3", SRV1]).stdout
    assert " 0% packet loss" in out


def test_stop_is_clean(box: tuple[Lab, SystemdContainer]) -> None:
    lab, sd = box
    sd.wait_for("masqd.service", 20, ActiveState="active")
    sd.run("systemctl", "stop", "masqd.service")
    st = sd.show("masqd.service", "ActiveState", "Result", "ExecMainStatus")
    assert st == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, st
    devs = sw_devices(lab)
    assert f"{lab.prefix}-lan" not in devs and f"{lab.prefix}-wan" not in devs
    assert sd.run("test", "-e", "/run/masqd", check=False).returncode != 0  # RuntimeDirectory removed


def test_netns_placement_needs_the_dropin(own_lab: Callable[[str, str], Lab]) -> None:
    """Devices placed in another namespace (the lab's own config: masqd in {p}-fw, its TAP devices
    created in {p}-sw): refused with a clear reason under the shipped unit (no CAP_SYS_ADMIN),
    working with deploy/masqd-netns.conf as a drop-in, threaded NAPI switch included."""
    lab = own_lab("tap", "z")
    sd = SystemdContainer(lab, "fw", lab.masqd_config(), {})
    try:
        deadline = time.monotonic() + 20
        while "needs CAP_SYS_ADMIN" not in sd.journal():
            assert time.monotonic() < deadline, sd.diagnostics_all()
            time.sleep(0.2)
        assert "Traceback" not in sd.journal()
        assert sd.show("masqd.service", "ActiveState")["ActiveState"] != "active"
    finally:
        sd.stop()
    dropin = (ROOT / "deploy" / "masqd-netns.conf").read_text()
    sd = SystemdContainer(lab, "fw", lab.masqd_config(), {"netns.conf": dropin})
    try:
        st = sd.wait_for("masqd.service", 20, ActiveState="active", SubState="running")
        status = sd.run("cat", f"/proc/{st['MainPID']}/status").stdout
        cap = int(re.search(r"^CapEff:\s+(\w+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
        assert cap == CAP_NET_ADMIN | CAP_SYS_ADMIN, hex(cap)
        devs = sw_devices(lab)
        assert "master br-lan" in devs[f"{lab.prefix}-lan"], devs
        out = lab.exec("lan2", ["ping", "-c", "2", "-i", "0.2", "-W", "2", SRV1]).stdout
        assert " 0% packet loss" in out
        journal = sd.journal()
        assert "refused" not in journal and "Traceback" not in journal, journal
    finally:
        sd.stop()
