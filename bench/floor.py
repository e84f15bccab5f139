"""The TUN/TAP floor in the benchmark lab: bench/tapfloor.c between br-lan and br-wan, on devices
opened the way masqd opens its own.

The relay reads a frame from one TAP device and writes it to the other with new Ethernet
addresses, nothing else (no NAT: lan2's address goes out as it is, and the ISP router is given
a route back to it through the relay). Its devices come from masqd's own ``open_device`` with
masqd's defaults (virtio-net header and offloads, IFF_NAPI, one queue per CPU) and its loop has
masqd's shape (poll, drain, coalescing rounds), so what its process costs per packet is what
the device interface costs any TUN/TAP router here: the floor under masqd's own figure. Its
threaded NAPI is switched by the benchmark as masqd's adaptive setting switches masqd's: off for
bulk TCP, on for small packets. No ARP: lan2 and the ISP router get permanent neighbour entries
for the relay's addresses, and the relay writes to their MACs.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
from typing import Any

from bench.cbuild import compiled
from masqd.config import LanInterface
from masqd.dataplane.device import (
    OFFLOAD_ALL,
    Device,
    format_mac,
    local_mac,
    open_device,
    set_offload,
    set_threaded,
)
from masqd.dataplane.tuning import COALESCE_HOLD
from masqd.lab import LAN2, Lab

FLOOR_LAN = "10.0.0.253"  # the relay's addresses (only in the neighbour entries and routes)
FLOOR_WAN = "203.0.113.202"
PAUSE = 0.0005  # masqd's dataplane.coalesce default


def build() -> str:
    """bench/tapfloor.c compiled once per version of its source (in the temporary directory)."""
    return compiled("tapfloor.c", "-pthread")


def host_mac(lab: Lab, role: str, ifname: str = "eth0") -> str:
    cp = lab.exec(role, ["ip", "-j", "link", "show", ifname])
    return str(json.loads(cp.stdout)[0]["address"])


class Floor:
    """The relay process and its two devices; ``start`` then ``stop`` (which says what it forwarded)."""

    def __init__(self, lab: Lab, queues: int = 0, pause: float = PAUSE) -> None:
        self.lab = lab
        self.pause = pause
        self.queues = queues or len(os.sched_getaffinity(0))
        self.devs: list[Device] = []
        self.proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        lab, sw = self.lab, self.lab.ns("sw")
        macs = []
        try:
            for side, addr in (("fll", FLOOR_LAN), ("flw", FLOOR_WAN)):
                name = f"{lab.prefix}-{side}"
                iface = LanInterface(name=name, mode="tap", address=f"{addr}/8", netns=sw,
                                     bridge="br-lan" if side == "fll" else "br-wan")
                self.devs.append(open_device(iface, napi="adaptive", queues=self.queues))
                macs.append(format_mac(local_mac(name, addr)))
            if any(set_offload(d.fd, OFFLOAD_ALL) != OFFLOAD_ALL for d in self.devs):
                raise RuntimeError("tapfloor: the kernel refused the offloads masqd uses")
            lan2_mac, isp_mac = host_mac(lab, "lan2"), host_mac(lab, "isp")
            lab.exec("lan2", ["ip", "neigh", "replace", FLOOR_LAN, "lladdr", macs[0], "dev", "eth0",
                              "nud", "permanent"])
            lab.exec("isp", ["ip", "neigh", "replace", FLOOR_WAN, "lladdr", macs[1], "dev", "eth0",
                             "nud", "permanent"])
            lab.exec("isp", ["ip", "route", "replace", f"{LAN2}/32", "via", FLOOR_WAN])
            fds = [fd for q in range(min(len(d.fds) for d in self.devs)) for fd in (self.devs[0].fds[q],
                                                                                   self.devs[1].fds[q])]
            self.proc = subprocess.Popen(
                [build(), f"{self.pause * 1e6:.0f}", f"{COALESCE_HOLD * 1e6:.0f}", macs[0], lan2_mac, macs[1], isp_mac,
                 *map(str, fds)], pass_fds=fds, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert self.proc.stdout is not None
            if not (select.select([self.proc.stdout], [], [], 10)[0]
                    and self.proc.stdout.readline().strip() == "ready"):
                raise RuntimeError("tapfloor did not start")
        except BaseException:
            self.stop()
            raise

    def napi(self, on: bool) -> None:
        """Threaded NAPI on the relay's devices (masqd's adaptive setting: on for small packets)."""
        for d in self.devs:
            set_threaded(d.handle.name, self.lab.ns("sw"), on)

    def stop(self) -> dict[str, Any]:
        """Stop the relay (by its PID), close the devices; what it forwarded and dropped."""
        out: dict[str, Any] = {}
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                stdout, _ = self.proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                stdout, _ = self.proc.communicate()
            lines = stdout.strip().splitlines()
            if lines and lines[-1].startswith("{"):
                out = json.loads(lines[-1])
            self.proc = None
        for d in self.devs:
            d.close()
        self.devs = []
        for role, argv in (("isp", ["ip", "route", "del", f"{LAN2}/32"]),
                           ("isp", ["ip", "neigh", "del", FLOOR_WAN, "dev", "eth0"]),
                           ("lan2", ["ip", "neigh", "del", FLOOR_LAN, "dev", "eth0"])):
            self.lab.exec(role, argv, check=False)
        return out
