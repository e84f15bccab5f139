"""The network-namespace lab: the HOWTO's networks as namespaces and bridges, built and torn down.

Topology (prefix ``p``; every name below carries it, nothing touches the
machine's own namespace)::

    {p}-lan2 10.0.0.2/8 ─┐                         ┌─ {p}-isp eth0 203.0.113.1/24
    {p}-lan3 10.0.0.3/8 ─┤ br-lan   {p}-sw   br-wan┤          eth1 198.51.100.254/24 ─┐
        masqd LAN port ──┘  (three bridges)        └─ masqd WAN port                  │
                                          br-rem ─ {p}-srv1 .1, {p}-rem2 .2, {p}-rem3 .3

masqd runs as a process in ``{p}-fw`` (10.0.0.1 on the LAN, 203.0.113.200/24
on the WAN, gateway 203.0.113.1).

* TAP mode: masqd creates its TAP devices in ``{p}-sw`` and enslaves them to
  ``br-lan``/``br-wan`` itself (config ``netns``/``bridge``).
* TUN mode: a TUN device is layer 3 and cannot join a bridge, so each side
  has an *edge* namespace (``{p}-lanedge``, ``{p}-wanedge``) holding a
  persistent TUN device (``tun-lan``/``tun-wan``, which masqd attaches to)
  and a veth into the bridge, with proxy ARP and routes: LAN side 10.0.0.1/32
  and default via the TUN, 10.0.0.0/8 on the veth; WAN side 203.0.113.200/32
  via the TUN, 203.0.113.0/24 and default (203.0.113.1) on the veth. The edge
  kernel forwards, which would add a hop; a mangle rule raises the TTL by one
  on the way in so the edge stays invisible to traceroute (needs iptables'
  TTL target; without it the edge shows up as an extra hop).

``ha=True`` adds a second router namespace ``{p}-fwb`` for the standby of an
active/backup pair and a sync link between the two (veth ``ha0``:
10.254.0.1/29 in ``{p}-fw``, 10.254.0.2/29 in ``{p}-fwb``); the pair itself
(two masqd, two keepalived) is :mod:`masqd.lab.ha`.

IPv6 is disabled in every namespace. ``down`` finds everything by prefix
(also after a crash), stops the processes inside by PID and deletes the
namespaces.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")
RUN_ROOT = Path("/run/masqd-lab")

LAN_NET = "10.0.0.0/8"
FW_LAN = "10.0.0.1"
FW_WAN = "203.0.113.200"
ISP_WAN = "203.0.113.1"
ISP_REM = "198.51.100.254"
SRV1 = "198.51.100.1"
REM2 = "198.51.100.2"
REM3 = "198.51.100.3"
LAN2 = "10.0.0.2"
LAN3 = "10.0.0.3"
LANEDGE_ADDR = "10.255.255.254"
WANEDGE_ADDR = "203.0.113.254"
KFW_LAN = "10.0.0.254"
KFW_WAN = "203.0.113.201"
HA_A, HA_B, HA_VIP = "10.254.0.1", "10.254.0.2", "10.254.0.3"  # the sync link of an HA pair (/29)

SEGMENTS = {"lan": "br-lan", "wan": "br-wan", "rem": "br-rem"}

# role -> [(segment, host ifname, address/prefix)], default gateway
HOSTS: dict[str, tuple[list[tuple[str, str, str]], str | None]] = {
    "lan2": ([("lan", "eth0", f"{LAN2}/8")], FW_LAN),
    "lan3": ([("lan", "eth0", f"{LAN3}/8")], FW_LAN),
    "isp": ([("wan", "eth0", f"{ISP_WAN}/24"), ("rem", "eth1", f"{ISP_REM}/24")], None),
    "srv1": ([("rem", "eth0", f"{SRV1}/24")], ISP_REM),
    "rem2": ([("rem", "eth0", f"{REM2}/24")], ISP_REM),
    "rem3": ([("rem", "eth0", f"{REM3}/24")], ISP_REM),
}

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")


class LabError(Exception):
    """The lab could not be built, found or used; the message says what failed."""


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
         timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LabError(f"{argv[0]}: command not found (run scripts/setup)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"timed out after {timeout:.0f} s: {' '.join(argv)}") from None
    if check and cp.returncode != 0:
        raise LabError(f"failed ({cp.returncode}): {' '.join(argv)}: {cp.stderr.strip() or cp.stdout.strip()}")
    return cp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lab:
    """One lab instance, identified by its prefix. ``mode`` is masqd's device mode."""

    def __init__(self, prefix: str = "mq", mode: str = "tap", ha: bool = False) -> None:
        if not _PREFIX_RE.match(prefix):
            raise LabError(f"prefix {prefix!r}: 1-10 lowercase letters/digits, starting with a letter")
        if mode not in ("tun", "tap"):
            raise LabError(f"mode {mode!r}: tun or tap")
        self.prefix = prefix
        self.mode = mode
        self.ha = ha
        self.rundir = RUN_ROOT / prefix
        self.ttl_fix = True

    # ------------------------------------------------------------------ names

    def ns(self, role: str) -> str:
        """Namespace name of a role (lan2, lan3, isp, srv1, rem2, rem3, fw, sw, lanedge, wanedge, kfw)."""
        return f"{self.prefix}-{role}"

    def roles(self) -> list[str]:
        base = ["sw", "fw", *(["fwb"] if self.ha else []), *HOSTS]
        if self.mode == "tun":
            base += ["lanedge", "wanedge"]
        return base

    def namespaces(self) -> list[str]:
        """Existing namespaces carrying this prefix (whatever built them)."""
        if not NETNS_DIR.is_dir():
            return []
        pre = f"{self.prefix}-"
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(pre))

    def exists(self) -> bool:
        return bool(self.namespaces())

    # ------------------------------------------------------------------ build

    def up(self) -> None:
        """Build the whole topology; on failure, remove what was built and raise LabError."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces)")
        if self.exists():
            raise LabError(f"a lab with prefix {self.prefix!r} exists ({' '.join(self.namespaces())}); "
                           f"run: masqd lab down --prefix {self.prefix}")
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True)
        roles = self.roles()
        for role in roles:
            _run(["ip", "netns", "add", self.ns(role)])
        for role in roles:
            self._sysctl(role, {
                "net.ipv6.conf.all.disable_ipv6": 1,
                "net.ipv6.conf.default.disable_ipv6": 1,
                "net.ipv4.conf.all.rp_filter": 0,
                "net.ipv4.conf.default.rp_filter": 0,
            })
        # the switch is a plain L2 switch: bridged frames do not go through iptables (br_netfilter)
        self._sysctl("sw", {"net.bridge.bridge-nf-call-iptables": 0, "net.bridge.bridge-nf-call-arptables": 0})
        sw = ["link set lo up"]
        for br in SEGMENTS.values():
            sw += [f"link add {br} type bridge stp_state 0 forward_delay 0", f"link set {br} up"]
        hosts: dict[str, list[str]] = {}
        links = list(self._host_links())
        for role, seg, ifname, port, _addr in links:
            sw += [f"link add {port} type veth peer name {ifname} netns {self.ns(role)}",
                   f"link set {port} master {SEGMENTS[seg]} up"]
        self._batch("sw", sw)
        for role, _seg, ifname, _port, addr in links:
            cmds = hosts.setdefault(role, ["link set lo up"])
            if addr:
                cmds.append(f"addr add {addr} dev {ifname}")
            cmds.append(f"link set {ifname} up")
        for role, (_ifs, gw) in HOSTS.items():
            if gw:
                hosts[role].append(f"route add default via {gw}")
        for role, cmds in hosts.items():
            if role not in ("lanedge", "wanedge"):
                self._batch(role, cmds)
        self._batch("fw", ["link set lo up"])
        self._sysctl("isp", {"net.ipv4.ip_forward": 1})
        if self.mode == "tun":
            self._build_edges(hosts)
        if self.ha:
            self._batch("fw", [f"link add ha0 type veth peer name ha0 netns {self.ns('fwb')}",
                               f"addr add {HA_A}/29 dev ha0", "link set ha0 up"])
            self._batch("fwb", ["link set lo up", f"addr add {HA_B}/29 dev ha0", "link set ha0 up"])

    def _host_links(self) -> list[tuple[str, str, str, str, str | None]]:
        """(role, segment, host ifname, switch port name, address) for every veth."""
        out: list[tuple[str, str, str, str, str | None]] = []
        for role, (ifs, _gw) in HOSTS.items():
            for i, (seg, ifname, addr) in enumerate(ifs):
                port = role if len(ifs) == 1 else f"{role}{i}"
                out.append((role, seg, ifname, port, addr))
        if self.mode == "tun":
            out.append(("lanedge", "lan", "eth0", "lanedge", f"{LANEDGE_ADDR}/32"))
            out.append(("wanedge", "wan", "eth0", "wanedge", f"{WANEDGE_ADDR}/32"))
        return out

    def _build_edges(self, hosts: dict[str, list[str]]) -> None:
        for side, tun, fw_addr, net, extra in (
            ("lan", "tun-lan", FW_LAN, LAN_NET, ["route add default dev tun-lan"]),
            ("wan", "tun-wan", FW_WAN, "203.0.113.0/24", [f"route add default via {ISP_WAN} dev eth0"]),
        ):
            role = f"{side}edge"
            self._sysctl(role, {
                "net.ipv4.ip_forward": 1,
                "net.ipv4.conf.all.send_redirects": 0,
                "net.ipv4.conf.eth0.proxy_arp": 1,
                "net.ipv4.neigh.eth0.proxy_delay": 0,
            })
            cmds = hosts[role] + [
                f"tuntap add dev {tun} mode tun multi_queue",  # masqd reads it with a thread per queue
                f"link set {tun} up",
                f"route add {fw_addr}/32 dev {tun}",
                f"route add {net} dev eth0",
                *extra,
            ]
            self._batch(role, cmds)
            if self.ttl_fix:
                cp = self.exec(role, ["iptables", "-t", "mangle", "-A", "PREROUTING", "-j", "TTL",
                                      "--ttl-inc", "1"], check=False)
                if cp.returncode != 0:
                    self.ttl_fix = False
                    print(f"masqd lab: no iptables TTL target ({cp.stderr.strip()}): "
                          "the TUN edge will show as an extra hop", file=sys.stderr)

    def _batch(self, role: str, cmds: list[str]) -> None:
        _run(["ip", "-n", self.ns(role), "-batch", "-"], input="\n".join(cmds) + "\n")

    def _sysctl(self, role: str, values: dict[str, int | str]) -> None:
        _run(["ip", "netns", "exec", self.ns(role), "sysctl", "-q", "-w",
              *(f"{k}={v}" for k, v in values.items())])

    def attach_tap(self, segment: str, name: str) -> str:
        """Create persistent TAP ``name`` in ``{p}-sw``, enslave it to the segment's bridge.

        Returns the namespace where it lives (run the TAP's user, e.g. a UML
        guest, inside it). ``segment`` is lan, wan or rem.
        """
        if segment not in SEGMENTS:
            raise LabError(f"segment {segment!r}: one of {', '.join(SEGMENTS)}")
        self._batch("sw", [f"tuntap add dev {name} mode tap", f"link set {name} master {SEGMENTS[segment]} up"])
        return self.ns("sw")

    def release_address(self, address: str) -> None:
        """The lab host holding ``address`` (e.g. lan2's 10.0.0.2) lets it go: its link goes
        down and loses its addresses, so a device on the segment (a UML guest on a TAP from
        :meth:`attach_tap`) can own the address. No host holds it: nothing to do."""
        want = address.split("/")[0]
        for role, (ifs, _gw) in HOSTS.items():
            for _seg, ifname, cidr in ifs:
                if cidr.split("/")[0] == want:
                    self._batch(role, [f"link set {ifname} down", f"addr flush dev {ifname}"])

    def software_checksums(self, role: str = "isp") -> None:
        """Make ``role`` a hop that checksums and segments in software (offloads off on its links).

        A packet that crosses it leaves with a real checksum computed from what
        arrived (a partial checksum is completed from its seed, a super-packet is
        cut), and the next host verifies it in software: a wrong NAT rewrite shows
        up as checksum errors there (``nstat``/``/proc/net/snmp``, ``tcpdump -vv``)
        instead of being carried along unchecked, as between namespaces it would be.
        """
        ifs = [ifname for r, _seg, ifname, _port, _addr in self._host_links() if r == role]
        for ifname in ifs:
            self.exec(role, ["ethtool", "-K", ifname, "tx", "off", "rx", "off", "tso", "off", "gso", "off",
                             "gro", "off"])

    # ------------------------------------------------------------------ kernel reference router

    def kernel_router_up(self, *, replace_masqd: bool = False, pptp_helper: bool = False) -> str:
        """The kernel's own nftables masquerade between br-lan and br-wan; returns its namespace.

        By default it stands beside masqd in ``{p}-kfw`` (LAN side 10.0.0.254/8, WAN side
        203.0.113.201/24, gateway 203.0.113.1) for the benchmarks: point a LAN host at it
        with ``use_gateway(role, KFW_LAN)``. ``replace_masqd``: it takes masqd's place
        instead, in ``{p}-fw`` with masqd's addresses (masqd must not run), so hosts set up
        for masqd go through the kernel unchanged (the interop suite's reference router).
        ``pptp_helper``: the kernel's PPTP conntrack helper follows calls on TCP 1723, so
        their GRE is masqueraded too.
        """
        role, lan, wan = ("fw", FW_LAN, FW_WAN) if replace_masqd else ("kfw", KFW_LAN, KFW_WAN)
        if role not in self.roles():
            _run(["ip", "netns", "add", self.ns(role)])
        self._sysctl(role, {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1,
                            "net.ipv4.ip_forward": 1, "net.ipv4.conf.all.rp_filter": 0,
                            "net.ipv4.conf.default.rp_filter": 0})
        self._batch("sw", [
            f"link add {role}0 type veth peer name eth0 netns {self.ns(role)}", f"link set {role}0 master br-lan up",
            f"link add {role}1 type veth peer name eth1 netns {self.ns(role)}", f"link set {role}1 master br-wan up",
        ])
        self._batch(role, ["link set lo up", f"addr add {lan}/8 dev eth0", "link set eth0 up",
                           f"addr add {wan}/24 dev eth1", "link set eth1 up",
                           f"route add default via {ISP_WAN}"])
        helper = ('ct helper pptp-h { type "pptp" protocol tcp; }\n'
                  ' chain pre { type filter hook prerouting priority 0; tcp dport 1723 ct helper set "pptp-h"; }\n'
                  if pptp_helper else "")
        _run(["ip", "netns", "exec", self.ns(role), "nft", "-f", "-"], input=(
            f"table ip kfw {{\n {helper} chain post {{ type nat hook postrouting priority 100; "
            "oifname \"eth1\" masquerade; }\n}\n"))
        return self.ns(role)

    def use_gateway(self, role: str, gw: str) -> None:
        """Change a host's default route."""
        self._batch(role, [f"route replace default via {gw}"])

    # ------------------------------------------------------------------ use

    def exec(self, role: str, argv: Sequence[str], *, check: bool = True, capture: bool = True,
             timeout: float | None = 60.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the role's namespace and wait for it."""
        full = ["ip", "netns", "exec", self.ns(role), *argv]
        try:
            cp = subprocess.run(full, capture_output=capture, text=True, timeout=timeout, input=input)
        except subprocess.TimeoutExpired:
            raise LabError(f"timed out after {timeout} s in {role}: {' '.join(argv)}") from None
        if check and cp.returncode != 0:
            raise LabError(f"in {role}: {' '.join(argv)} exited {cp.returncode}: "
                           f"{(cp.stderr or '').strip() or (cp.stdout or '').strip()}")
        return cp

    run = exec

    def popen(self, role: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the role's namespace; stop it with ``stop_process`` (by PID)."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(role), *argv], **kw)

    def tool_server(self, role: str, args: Sequence[str], *, timeout: float = 20.0) -> subprocess.Popen[str]:
        """Start a :mod:`masqd.lab.nettool` server in ``role``; returns once it is listening."""
        import select

        proc = self.popen(role, [sys.executable, "-m", "masqd.lab.nettool", "--timeout", str(timeout), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10.0)
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            stop_process(proc)
            raise LabError(f"nettool {' '.join(args)} in {role} did not start: {line!r}")
        return proc

    def tool(self, role: str, args: Sequence[str], *, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
        """Run a :mod:`masqd.lab.nettool` client in ``role``: (exit status, its JSON report)."""
        import json

        cp = self.exec(role, [sys.executable, "-m", "masqd.lab.nettool", "--timeout", str(timeout), *args],
                       check=False, timeout=timeout + 10)
        try:
            report = dict(json.loads(cp.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            report = {"ok": False, "stdout": cp.stdout, "stderr": cp.stderr}
        return cp.returncode, report

    # ------------------------------------------------------------------ masqd

    def masqd_config(self, *, extra: str = "") -> str:
        """A masqd configuration (TOML text) for this lab and mode; ``extra`` is appended."""
        p = self.prefix
        if self.mode == "tap":
            lan = (f'name = "{p}-lan"\nmode = "tap"\naddress = "{FW_LAN}/8"\n'
                   f'netns = "{p}-sw"\nbridge = "br-lan"\n')
            wan = (f'name = "{p}-wan"\nmode = "tap"\naddress = "{FW_WAN}/24"\ngateway = "{ISP_WAN}"\n'
                   f'netns = "{p}-sw"\nbridge = "br-wan"\n')
        else:
            lan = (f'name = "tun-lan"\nmode = "tun"\naddress = "{FW_LAN}/8"\n'
                   f'netns = "{p}-lanedge"\npersistent = true\n')
            wan = (f'name = "tun-wan"\nmode = "tun"\naddress = "{FW_WAN}/24"\ngateway = "{ISP_WAN}"\n'
                   f'netns = "{p}-wanedge"\npersistent = true\n')
        head = (f"# masqd in the lab {p!r} ({self.mode.upper()} mode): run it inside {p}-fw, e.g.\n"
                f"#   ip netns exec {p}-fw masqd run -c THIS_FILE\n")
        return (f"{head}\n[lan]\n{lan}\n[wan]\n{wan}\n[control]\nsocket = \"/run/masqd/{p}.sock\"\n\n"
                f"[state]\nfile = \"/run/masqd/{p}.state\"\n\n"
                f"[metrics]\nlisten = \"127.0.0.1:9598\"\n{extra}")

    def start_masqd(self, config_text: str | None = None, *, timeout: float = 15.0,
                    args: Sequence[str] = (), role: str = "fw") -> MasqdProcess:
        """Write the config, start ``masqd run`` in ``{p}-fw`` (or ``role``'s namespace), wait until
        its devices are up."""
        self.rundir.mkdir(parents=True, exist_ok=True)
        n = len(list(self.rundir.glob("masqd*.toml")))
        cfg_path = self.rundir / f"masqd{n}.toml"
        cfg_path.write_text(config_text if config_text is not None else self.masqd_config(), encoding="utf-8")
        return MasqdProcess.start(self, cfg_path, timeout=timeout, args=args, role=role)

    # ------------------------------------------------------------------ teardown and status

    def down(self) -> list[str]:
        """Stop every process in this prefix's namespaces (by PID) and delete the namespaces."""
        names = self.namespaces()
        pids: list[int] = []
        for ns in names:
            cp = _run(["ip", "netns", "pids", ns], check=False)
            pids += [int(x) for x in cp.stdout.split() if x.isdigit()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3.0
        while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            if _pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in names:
            _run(["ip", "netns", "del", ns], check=False)
        if self.rundir.exists():
            shutil.rmtree(self.rundir, ignore_errors=True)
        for node in (self.prefix, f"{self.prefix}-b"):  # (-b: an HA pair's second masqd)
            for leftover in (f"{node}.sock", f"{node}.state", f"{node}.state.refused"):
                Path("/run/masqd", leftover).unlink(missing_ok=True)
        return names

    def status(self) -> str:
        names = self.namespaces()
        if not names:
            return f"lab {self.prefix!r}: not present"
        lines = [f"lab {self.prefix!r}: {len(names)} namespaces"]
        for ns in names:
            cp = _run(["ip", "-n", ns, "-br", "addr"], check=False)
            addrs = [ln for ln in cp.stdout.splitlines() if not ln.startswith("lo ")]
            pcp = _run(["ip", "netns", "pids", ns], check=False)
            pids = pcp.stdout.split()
            lines.append(f"  {ns}" + (f"  (pids {' '.join(pids)})" if pids else ""))
            lines += [f"      {a}" for a in addrs]
        return "\n".join(lines)

    def describe(self) -> str:
        p = self.prefix
        cfg = f"config/lab-{self.mode}.toml" if p == "mq" else "(Lab.masqd_config())"
        return (f"lab {p!r} up ({self.mode} mode): namespaces {' '.join(self.namespaces())}\n"
                f"start masqd:  ip netns exec {p}-fw masqd run -c {cfg}\n"
                f"try:          masqd lab exec lan2 --prefix {p} -- ping -c 3 {SRV1}\n"
                f"remove:       masqd lab down --prefix {p}")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0, *, sig: int = signal.SIGTERM,
                 group: bool = False) -> int | None:
    """Stop a child by PID: ``sig`` (SIGTERM), then SIGKILL after ``timeout``.

    ``group``: the child was started in a session of its own (``start_new_session=True``):
    signal its whole process group, and once it has exited SIGKILL what is left of the
    group (helpers it spawned). Returns the exit status, None if it is still running.
    """
    kill = os.killpg if group else os.kill
    if proc.poll() is None:
        try:
            kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode


class MasqdProcess:
    """A ``masqd run`` child in ``{p}-fw``, known by PID."""

    def __init__(self, lab: Lab, proc: subprocess.Popen[Any], cfg_path: Path, state_file: Path,
                 log_path: Path) -> None:
        self.lab = lab
        self.proc = proc
        self.cfg_path = cfg_path
        self.state_file = state_file
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, lab: Lab, cfg_path: Path, *, timeout: float = 15.0, args: Sequence[str] = (),
              role: str = "fw") -> MasqdProcess:
        stem = cfg_path.stem
        state = lab.rundir / f"{stem}.state.json"
        ready = lab.rundir / f"{stem}.ready"
        logp = lab.rundir / f"{stem}.log"
        for f in (state, ready):
            f.unlink(missing_ok=True)
        # Exec python directly in the namespace (no shell, no wrapper): the PID we hold is masqd's.
        argv = ["ip", "netns", "exec", lab.ns(role), sys.executable, "-m", "masqd.cli", "run",
                "-c", str(cfg_path), "--state-file", str(state), "--ready-file", str(ready), *args]
        with open(logp, "wb") as logf:
            proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        mp = cls(lab, proc, cfg_path, state, logp)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                mp.stop()
                raise LabError(f"masqd did not start (exit {proc.returncode}):\n{mp.log()}")
            time.sleep(0.05)
        return mp

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def snapshot(self, timeout: float = 5.0) -> dict[str, Any]:
        """Ask for a state dump (SIGUSR1) and read it: table, counters, neighbours."""
        import json

        before = self.state_file.stat().st_mtime_ns if self.state_file.exists() else 0
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state_file.exists() and self.state_file.stat().st_mtime_ns != before:
                return dict(json.loads(self.state_file.read_text(encoding="utf-8")))
            time.sleep(0.02)
        raise LabError("masqd did not write its state file")

    def cpu_seconds(self) -> float:
        """utime+stime of the masqd process so far."""
        with open(f"/proc/{self.pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def stop(self, timeout: float = 5.0) -> int | None:
        return stop_process(self.proc, timeout)
