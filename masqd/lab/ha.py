"""An active/backup pair in the lab: two masqd and two keepalived on the same LAN and WAN segments.

Built on a ``Lab(prefix, "tap", ha=True)``: node ``a`` is masqd in ``{p}-fw``
(TAPs ``{p}-lan``/``{p}-wan``, control socket ``/run/masqd/{p}.sock``), node
``b`` in ``{p}-fwb`` (TAPs ``{p}-lanb``/``{p}-wanb``, ``/run/masqd/{p}-b.sock``).
Both own 10.0.0.1 and 203.0.113.200 (each with its own MAC); only the
active one uses them. They sync over the ``ha0`` link (UDP 7017, an HMAC key
in the lab's run directory). Each node's keepalived runs VRRPv3 on ``ha0``
(virtual router 17, advert_int 0.1 s, the virtual address 10.254.0.3: VRRP
needs one), tracks masqd's readiness device ``masqd-alive`` (it exists while
masqd runs and holds the table) and tells masqd its role through the
FIFO script ``python -m masqd.ops.keepalived``. Node a has the higher
priority: with ``preempt`` (default) it takes the role back when it returns.

Every process is started by PID in the pair's namespaces; ``Lab.down``
stops them with the rest.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from typing import Any

from masqd.lab.topology import (
    FW_LAN,
    FW_WAN,
    HA_A,
    HA_B,
    HA_VIP,
    ISP_WAN,
    Lab,
    LabError,
    MasqdProcess,
    stop_process,
)

SYNC_PORT = 7017
ALIVE = "masqd-alive"
NODES = {"a": ("fw", HA_A, HA_B, 150), "b": ("fwb", HA_B, HA_A, 100)}


class HAPair:
    """The configuration and processes of the pair in ``lab`` (built with ``ha=True``)."""

    def __init__(self, lab: Lab, *, preempt: bool = True) -> None:
        if not lab.ha or lab.mode != "tap":
            raise LabError("an HA pair needs a TAP-mode lab built with ha=True")
        self.lab = lab
        self.preempt = preempt
        self.masqd: dict[str, MasqdProcess] = {}
        self.keepalived: dict[str, subprocess.Popen[Any]] = {}
        self.key_file = lab.rundir / "ha.key"
        self.peer: dict[str, str] = {}  # node -> the sync address it sends to, when not its peer's

    # ------------------------------------------------------------------ files

    def socket(self, node: str) -> str:
        p = self.lab.prefix
        return f"/run/masqd/{p}.sock" if node == "a" else f"/run/masqd/{p}-b.sock"

    def masqd_config(self, node: str, extra: str = "") -> str:
        p = self.lab.prefix
        _ns, me, peer, _prio = NODES[node]
        sfx = "" if node == "a" else "b"
        state = "" if node == "a" else "-b"
        return (f"# masqd node {node} of the HA pair in the lab {p!r}\n\n"
                f'[lan]\nname = "{p}-lan{sfx}"\nmode = "tap"\naddress = "{FW_LAN}/8"\n'
                f'netns = "{p}-sw"\nbridge = "br-lan"\n\n'
                f'[wan]\nname = "{p}-wan{sfx}"\nmode = "tap"\naddress = "{FW_WAN}/24"\ngateway = "{ISP_WAN}"\n'
                f'netns = "{p}-sw"\nbridge = "br-wan"\n\n'
                f'[control]\nsocket = "{self.socket(node)}"\n\n'
                f'[state]\nfile = "/run/masqd/{p}{state}.state"\n\n'
                f'[metrics]\nlisten = "127.0.0.1:9598"\n\n'
                f'[ha]\nenabled = true\nlisten = "{me}:{SYNC_PORT}"\n'
                f'peer = "{self.peer.get(node, f"{peer}:{SYNC_PORT}")}"\n'
                f'key_file = "{self.key_file}"\nalive_device = "{ALIVE}"\n{extra}')

    def keepalived_config(self, node: str) -> str:
        _ns, _me, _peer, prio = NODES[node]
        d = self.lab.rundir
        fifo_script = f"{d}/keepalived-fifo.sh {self.socket(node)}"
        return ("global_defs {\n  script_user root\n  enable_script_security\n  vrrp_startup_delay 0\n"
                "  dynamic_interfaces\n  vrrp_version 3\n"
                f"  vrrp_notify_fifo {d}/keepalived-{node}.fifo\n"
                f'  vrrp_notify_fifo_script "{fifo_script}"\n}}\n'
                "vrrp_instance masqd {\n  state BACKUP\n  interface ha0\n  virtual_router_id 17\n"
                f"  priority {prio}\n  advert_int 0.1\n" + ("" if self.preempt else "  nopreempt\n")
                + f"  virtual_ipaddress {{\n    {HA_VIP}/29\n  }}\n  track_interface {{\n    {ALIVE}\n  }}\n}}\n")

    def write_key(self) -> None:
        self.lab.rundir.mkdir(parents=True, exist_ok=True)
        if not self.key_file.exists():
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")

    # ------------------------------------------------------------------ processes

    def start_masqd(self, node: str, extra: str = "", timeout: float = 15.0) -> MasqdProcess:
        self.write_key()
        m = self.lab.start_masqd(self.masqd_config(node, extra), role=NODES[node][0], timeout=timeout)
        self.masqd[node] = m
        return m

    def start_keepalived(self, node: str) -> subprocess.Popen[Any]:
        d = self.lab.rundir
        # keepalived runs scripts by their real path: a wrapper keeps this Python (and its packages)
        wrapper = d / "keepalived-fifo.sh"
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m masqd.ops.keepalived "$@"\n', encoding="utf-8")
        wrapper.chmod(0o755)
        conf = d / f"keepalived-{node}.conf"
        conf.write_text(self.keepalived_config(node), encoding="utf-8")
        for f in (d / f"keepalived-{node}.pid", d / f"keepalived-{node}-vrrp.pid"):
            f.unlink(missing_ok=True)
        log = open(d / f"keepalived-{node}.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = self.lab.popen(NODES[node][0], [
            "keepalived", "--dont-fork", "--log-console", "--log-detail", "--vrrp", "-f", str(conf),
            "-p", str(d / f"keepalived-{node}.pid"), "-r", str(d / f"keepalived-{node}-vrrp.pid")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.keepalived[node] = proc
        return proc

    def up(self, timeout: float = 20.0) -> str:
        """Node a (masqd and keepalived) first, until it is active (no peer: it waits
        ``ha.sync_wait``), then node b, until it holds a's table as the standby. Returns "a"."""
        self.start_masqd("a")
        self.start_keepalived("a")
        self.wait_active("a", timeout=timeout)
        self.start_masqd("b")
        self.start_keepalived("b")
        self.wait_synced("b", timeout=timeout)
        deadline = time.monotonic() + timeout
        while self.role("b") != "backup":
            if time.monotonic() > deadline:
                raise LabError(f"masqd b is {self.role('b')!r}, not the standby")
            time.sleep(0.02)
        return "a"

    def stop(self) -> None:
        for proc in self.keepalived.values():
            stop_process(proc)
        for m in self.masqd.values():
            m.stop()

    # ------------------------------------------------------------------ looking

    def ask(self, node: str, req: dict[str, Any], timeout: float = 3.0) -> Any:
        """One control request to a node's masqd (None when it does not answer)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(self.socket(node))
                s.sendall(json.dumps(req).encode() + b"\n")
                reply = json.loads(s.makefile("rb").readline() or b"{}")
        except (OSError, ValueError):
            return None
        return reply.get("result") if reply.get("ok") else None

    def role(self, node: str) -> str | None:
        res = self.ask(node, {"cmd": "role"}, timeout=1.0)
        return res.get("role") if isinstance(res, dict) else None

    def counters(self, node: str) -> dict[str, int]:
        res = self.ask(node, {"cmd": "stats"})
        return dict(res.get("counters", {})) if isinstance(res, dict) else {}

    def wait_active(self, node: str | None = None, timeout: float = 20.0, poll: float = 0.01) -> str:
        """Wait until ``node`` (or either) reports the role active; returns which."""
        deadline = time.monotonic() + timeout
        nodes = [node] if node else ["a", "b"]
        while time.monotonic() < deadline:
            for n in nodes:
                if self.role(n) == "active":
                    return n
            time.sleep(poll)
        raise LabError(f"no active masqd among {nodes} after {timeout:.0f} s; roles "
                       f"{ {n: self.role(n) for n in ('a', 'b')} }")

    def wait_synced(self, node: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.counters(node).get("ha_synced") != 1:
            if time.monotonic() > deadline:
                raise LabError(f"masqd {node} did not sync with its peer in {timeout:.0f} s")
            time.sleep(0.05)

    def describe(self) -> str:
        p = self.lab.prefix
        return (f"HA pair up in lab {p!r}: masqd a in {p}-fw ({self.socket('a')}), b in {p}-fwb "
                f"({self.socket('b')}); keepalived in both; active: {self.role('a') == 'active' and 'a' or 'b'}\n"
                f"roles:        masqd role --socket {self.socket('a')}   (and {self.socket('b')})\n"
                f"fail over:    kill -9 the active masqd (pids: ip netns pids {p}-fw)\n"
                f"remove:       masqd lab down --prefix {p}")


def start_detached(lab: Lab, preempt: bool = True) -> HAPair:
    """``masqd lab up --ha``: the pair's four daemons, left running (``masqd lab down`` stops them)."""
    pair = HAPair(lab, preempt=preempt)
    pair.up()
    return pair
