"""Network plumbing for the interop suite: namespaces, TAPs, captures, stand-in lab.

`MiniLab` builds the lab topology of the project (``{p}-sw`` with the bridges
``br-lan``, ``br-wan``, ``br-rem``; ``{p}-isp`` routing between WAN and
remote; ``{p}-fw`` for the router) with just what the interop scenarios need.
It stands in for ``masqd.lab.Lab`` and offers the same ``attach_tap`` call.
`Capture` runs tcpdump on a bridge by PID. Every device and namespace carries
the per-run prefix; `teardown` removes them all, also after a failure.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SEGMENTS = {"lan": "br-lan", "wan": "br-wan", "rem": "br-rem"}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; raise with its stderr on failure."""
    res = subprocess.run(list(args), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed rc={res.returncode}: {res.stderr.strip()}")
    return res


def ip(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip [-n ns] ARGS`."""
    return run("ip", *(("-n", ns) if ns else ()), *args, check=check)


def nsexec(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command inside a namespace."""
    return run("ip", "netns", "exec", ns, *args, check=check)


def list_netns() -> list[str]:
    res = run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def add_netns(name: str) -> None:
    run("ip", "netns", "add", name)
    ip(name, "link", "set", "lo", "up")
    nsexec(name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    nsexec(name, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")


def del_netns(name: str) -> None:
    run("ip", "netns", "del", name, check=False)


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A Popen ``preexec_fn``: the child gets ``sig`` when the harness process dies,
    so a killed test run does not leave guests, captures or masqd running."""

    def set_pdeathsig() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return set_pdeathsig


def stop_process(
    proc: subprocess.Popen[bytes], timeout: float = 5.0, sig: int = signal.SIGTERM
) -> None:
    """Stop a process we started in its own session: signal its group, then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # Whatever is left of the group (helper processes) goes too.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class Capture:
    """tcpdump writing one segment's frames (in ``{p}-sw``) to a pcap file."""

    ns: str
    iface: str
    path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Capture:
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.ns,
                "tcpdump",
                "-i",
                self.iface,
                "-U",
                "-n",
                "-s",
                "256",
                "-w",
                str(self.path),
                "not",
                "arp",
                "and",
                "not",
                "ip6",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGINT),
        )
        # tcpdump reports "listening on" on stderr once the capture runs.
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 5
        os.set_blocking(self.proc.stderr.fileno(), False)
        buf = b""
        while time.monotonic() < deadline and b"listening" not in buf:
            chunk = self.proc.stderr.read() or b""
            buf += chunk
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tcpdump on {self.iface} exited: {buf.decode(errors='replace')}"
                )
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            time.sleep(0.2)  # let the last frames reach the file
            stop_process(self.proc, timeout=3, sig=signal.SIGINT)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None


def read_pcap_summary(path: Path, bpf: str) -> list[str]:
    """Lines `tcpdump -nr PATH BPF` prints (one per matching packet)."""
    if not path.exists():
        return []
    res = run("tcpdump", "-nr", str(path), bpf, check=False)
    return [line for line in res.stdout.splitlines() if line.strip()]


@dataclass
class MiniLab:
    """Stand-in for masqd.lab.Lab: the switch, the ISP router and an empty ``{p}-fw``."""

    prefix: str
    created: list[str] = field(default_factory=list)

    @property
    def sw(self) -> str:
        return f"{self.prefix}-sw"

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def up(self) -> MiniLab:
        for host in ("sw", "isp", "fw"):
            add_netns(self.ns(host))
            self.created.append(self.ns(host))
        for br in SEGMENTS.values():
            ip(self.sw, "link", "add", br, "type", "bridge", "forward_delay", "0")
            ip(self.sw, "link", "set", br, "type", "bridge", "stp_state", "0")
            ip(self.sw, "link", "set", br, "up")
        isp = self.ns("isp")
        self.connect("isp", "eth0", "wan", "203.0.113.1/24")
        self.connect("isp", "eth1", "rem", "198.51.100.254/24")
        nsexec(isp, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        return self

    def connect(self, host: str, ifname: str, segment: str, cidr: str | None) -> None:
        """veth from namespace ``{p}-host`` (``ifname``) to a segment's bridge."""
        sw_end = f"{host[:6]}-{ifname}"
        ip(
            self.sw,
            "link",
            "add",
            sw_end,
            "type",
            "veth",
            "peer",
            "name",
            ifname,
            "netns",
            self.ns(host),
        )
        ip(self.sw, "link", "set", sw_end, "master", SEGMENTS[segment], "up")
        if cidr:
            ip(self.ns(host), "addr", "add", cidr, "dev", ifname)
        ip(self.ns(host), "link", "set", ifname, "up")

    def attach_tap(self, segment: str, tapname: str) -> None:
        """Create a TAP in ``{p}-sw`` and enslave it to the segment's bridge."""
        ip(self.sw, "tuntap", "add", "dev", tapname, "mode", "tap")
        ip(self.sw, "link", "set", tapname, "master", SEGMENTS[segment], "up")

    def detach_tap(self, tapname: str) -> None:
        ip(self.sw, "link", "del", tapname, check=False)

    def kernel_router(self) -> None:
        """Reference router in ``{p}-fw``: the kernel's nftables masquerade."""
        add_kernel_router(self.sw, self.ns("fw"))

    def teardown(self) -> None:
        for name in reversed(self.created):
            del_netns(name)
        self.created.clear()


def veth_to_bridge(sw: str, ns: str, ifname: str, port: str, bridge: str, cidr: str) -> None:
    """veth from namespace ``ns`` (``ifname``, address ``cidr``) to ``bridge`` in ``sw``."""
    ip(sw, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns)
    ip(sw, "link", "set", port, "master", bridge, "up")
    ip(ns, "addr", "add", cidr, "dev", ifname)
    ip(ns, "link", "set", ifname, "up")


def add_kernel_router(sw: str, fw: str) -> None:
    """Reference router: masqd's addresses (10.0.0.1, 203.0.113.200) in namespace ``fw``,
    the kernel forwarding with nftables masquerade (and the PPTP conntrack helper)."""
    veth_to_bridge(sw, fw, "eth0", "kref-lan", SEGMENTS["lan"], "10.0.0.1/8")
    veth_to_bridge(sw, fw, "eth1", "kref-wan", SEGMENTS["wan"], "203.0.113.200/24")
    ip(fw, "route", "add", "default", "via", "203.0.113.1")
    nsexec(fw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    ruleset = (
        "table ip masqd_ref {\n"
        ' ct helper pptp-h { type "pptp" protocol tcp; }\n'
        " chain pre { type filter hook prerouting priority 0;"
        ' tcp dport 1723 ct helper set "pptp-h"; }\n'
        ' chain post { type nat hook postrouting priority 100; oifname "eth1" masquerade; }\n'
        "}\n"
    )
    subprocess.run(
        ["ip", "netns", "exec", fw, "nft", "-f", "-"],
        input=ruleset,
        text=True,
        check=True,
        capture_output=True,
    )
