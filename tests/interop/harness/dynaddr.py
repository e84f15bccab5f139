"""Interop: masqd's WAN address changes while a TCP transfer and an IPsec tunnel run (issue 8).

The one scenario that needs an action in the middle of a run, so it has its
own short runner built from the harness parts (lab, captures, masqd router,
UML peers). What happens, in a fresh TAP-mode lab:

1. masqd runs with ``dynaddr_mode = "flush"``. A strongSwan gateway
   (198.51.100.10) waits on the remote segment; a strongSwan client on the
   LAN (10.0.0.11, NAT-T through masqd; DPD every 2 s with ``dpd_action =
   restart`` and short retransmits) brings its tunnel up and then pings the
   host behind the gateway every 0.2 s through it (15 s of replies).
2. Meanwhile lan2 (10.0.0.2) streams TCP to srv1 (198.51.100.1), and a probe
   in lan3 (10.0.0.3) waits, connected to nothing yet.
3. Once the tunnel carries pings and the stream runs, the address moves
   203.0.113.200 -> 203.0.113.201 over masqd's control socket (gratuitous ARP
   on the WAN segment, TAP mode); the probe then opens a new TCP connection to
   srv1 at once.

Results (:class:`DynaddrRun`): how long after the change the probe's
connection completed and which address srv1 saw; how the old stream ended
(``ConnectionResetError`` expected) and when, plus the RST in the LAN capture;
the tunnel's longest gap in echo replies (guest's ping log) and whether the
replies resumed; masqd's table and counters at the end. The checks given to
:func:`run_dynaddr` judge them (the tests' ``checks.dynaddr_checks``).
Everything is torn down on every path, processes stopped by PID.
"""

from __future__ import annotations

import dataclasses
import json
import re
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masqd.lab import LAN2, SRV1, Lab, LabError, stop_process

from .capture import Capture, read_pcap_summary
from .peers import Peer, PeerSpec, strongswan_initiator, strongswan_responder
from .process import die_with_parent
from .router import MasqdRouter
from .scenario import RUN_ROOT, finish_run, lab_up, new_prefix

NEW_WAN_IP = "203.0.113.201"
SERVER = "198.51.100.10"
CLIENT = "10.0.0.11"
STREAM_HOST, STREAM_IP = "lan2", LAN2
PROBE_HOST = "lan3"
FAR_HOST, FAR_IP = "srv1", SRV1
STREAM_PORT, PROBE_PORT = 8611, 8612
PING_INTERVAL = 0.2
PING_COUNT = 75  # 15 s of echo requests once the tunnel is up (longer if replies are lost, up to PING_DEADLINE)
PING_DEADLINE = 40
SETTLE = 2.0  # seconds of tunnel pings and stream before the change

# Runs in the LAN / far namespaces (plain python, no masqd import: fast start).
TCP_TOOL = r"""
import json, socket, sys, time
mode = sys.argv[1]
def out(**kw):
    print(json.dumps(kw), flush=True)
if mode == "sink":  # accept connections for 60 s; drain each; answer "probe" with the peer seen
    import threading
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(sys.argv[2]))); srv.listen(8); srv.settimeout(1.0)
    def serve(c, peer):
        c.settimeout(60)
        try:
            first = c.recv(65536)
            if first.startswith(b"probe"):
                c.sendall(f"{peer[0]}:{peer[1]}\n".encode()); c.close(); return
            while c.recv(65536):
                pass
        except OSError:
            pass
        c.close()
    out(ready=True)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            c, peer = srv.accept()
        except OSError:
            continue
        threading.Thread(target=serve, args=(c, peer), daemon=True).start()
elif mode == "stream":  # send 4 KiB every 5 ms for at most 45 s; report how it ended
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10)
    s.settimeout(5.0)
    out(ready=True)
    n, end, how = 0, time.monotonic() + 45, "finished"
    try:
        while time.monotonic() < end:
            n += s.send(b"s" * 4096)
            time.sleep(0.005)
    except ConnectionResetError:
        how = "reset"
    except TimeoutError:
        how = "hang"
    except OSError as e:
        how = type(e).__name__ + ": " + str(e)
    out(end=how, at=time.time(), bytes=n)
elif mode == "probe":  # wait for a line on stdin, then one new connection
    out(ready=True)
    sys.stdin.readline()
    t0 = time.time()
    try:
        s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5)
        s.settimeout(5); s.sendall(b"probe")
        seen = s.recv(100).decode().strip()
        out(ok=True, start=t0, done=time.time(), seen=seen)
    except OSError as e:
        out(ok=False, start=t0, done=time.time(), error=type(e).__name__ + ": " + str(e))
"""

_RETRANSMIT = "charon {\n  retransmit_tries = 2\n  retransmit_timeout = 1.0\n  retransmit_base = 1.4\n"


def tunnel_client(name: str = "c1") -> PeerSpec:
    """strongSwan initiator (NAT-T) with DPD + restart that pings through its tunnel (PING_COUNT replies)
    and touches ``/peer/up`` once the tunnel is up."""
    base = strongswan_initiator(name, f"{CLIENT}/8", "10.0.0.1", SERVER, 2, 1)
    files = dict(base.files)
    conf = files["swanctl.conf"]
    conf = conf.replace("    vips = 0.0.0.0\n", "    vips = 0.0.0.0\n    dpd_delay = 2s\n    keyingtries = 0\n", 1)
    conf = conf.replace("        esp_proposals = aes128-sha256\n",
                        "        esp_proposals = aes128-sha256\n        dpd_action = restart\n", 1)
    files["swanctl.conf"] = conf
    files["charon-log.conf"] = files["charon-log.conf"].replace("charon {\n", _RETRANSMIT, 1)
    script, n = re.subn(
        r"; result tunnel_rc \$\?\nping -n -c \d+ -i [0-9.]+ -w \d+",
        f"; result tunnel_rc $?\ntouch /peer/up\nping -D -n -c {PING_COUNT} -i {PING_INTERVAL} -w {PING_DEADLINE}",
        base.script)
    if n != 1 or "dpd_delay" not in conf or "dpd_action" not in conf:
        raise RuntimeError("strongswan_initiator changed shape; update harness.dynaddr.tunnel_client")
    return dataclasses.replace(base, files=files, script=script)


def tunnel_server() -> PeerSpec:
    return strongswan_responder("srv", f"{SERVER}/24", "198.51.100.254")


@dataclass
class DynaddrRun:
    """What one run measured; ``problems`` empty means every check held."""

    prefix: str
    run_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)
    stream: dict[str, Any] = field(default_factory=dict)
    tunnel: dict[str, Any] = field(default_factory=dict)
    masqd_state: dict[str, Any] | None = None
    lan_resets: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    kept: bool = False

    @property
    def passed(self) -> bool:
        return not self.problems

    def report(self) -> str:
        lines = [f"dynaddr change under load: {'passed' if self.passed else 'FAILED'} ({self.prefix})",
                 "timings: " + ", ".join(f"{k}={v:.2f}s" for k, v in self.timings.items()),
                 f"  new connection: {self.probe}", f"  old stream: {self.stream}",
                 f"  tunnel: {self.tunnel}", f"  RSTs on the LAN: {self.lan_resets[:3]}"]
        lines += [f"  problem: {p}" for p in self.problems]
        if self.kept:
            lines.append(f"evidence in {self.run_dir}")
        return "\n".join(lines)


class _Proc:
    """A small helper process in a lab namespace that prints JSON lines."""

    def __init__(self, ns: str, *args: str, stdin: bool = False) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", TCP_TOOL, *args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM))
        self.args = args

    def line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        text = self.proc.stdout.readline() if ready else ""
        if not text:
            err = ""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                err = self.proc.stderr.read()[-500:]
            raise RuntimeError(f"{' '.join(self.args)}: no answer within {timeout:.0f} s {err}")
        return dict(json.loads(text))

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def stop(self) -> None:
        stop_process(self.proc, timeout=3, group=True)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from [0-9.]+: icmp_seq=(\d+)")


def ping_replies(text: str) -> list[tuple[float, int]]:
    """(guest time, icmp_seq) of each echo reply in a ``ping -D`` log."""
    out = []
    for line in text.splitlines():
        m = _REPLY.match(line)
        if m:
            out.append((float(m.group(1)), int(m.group(2))))
    return out


def tunnel_summary(replies: list[tuple[float, int]], change_at: float) -> dict[str, Any]:
    """Longest gap between echo replies (seconds, by sequence number) and, by timestamps,
    when replies came back after ``change_at`` (host wall clock; the UML guest reads the same)."""
    seqs = [s for _, s in replies]
    gaps = [(b - a) * PING_INTERVAL for a, b in zip(seqs, seqs[1:], strict=False)]
    after = [t for t, _ in replies if t > change_at]
    before = [t for t, _ in replies if t <= change_at]
    return {
        "replies": len(replies),
        "replies_before_change": len(before),
        "replies_after_change": len(after),
        "longest_gap_s": round(max(gaps), 2) if gaps else None,
        "back_after_s": round(after[0] - change_at, 2) if after else None,
    }


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def tunnel_recovery(client_log: str, server_log: str) -> str:
    """How the tunnel survived, from the charon logs: the gateway followed the client's new NAT
    mapping (``nat-mapping-update``), the client negotiated a new IKE_SA (``re-established``), or
    ``none`` seen."""
    if len(re.findall(r"IKE_SA home\[\d+\] established", client_log)) > 1:
        return "re-established"
    if re.search(r"NAT mappings of CHILD_SA .* changed to " + re.escape(NEW_WAN_IP), server_log):
        return "nat-mapping-update"
    return "none"


def _wait_file(peer: Peer, name: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not (peer.dir / name).exists():
        if time.monotonic() > end:
            raise RuntimeError(f"peer {peer.spec.name}: no '{name}' after {timeout:.0f} s")
        if peer.guest is None or not peer.guest.running():
            raise RuntimeError(f"peer {peer.spec.name}: guest exited before '{name}'")
        time.sleep(0.05)


def _change_address(router: MasqdRouter, address: str) -> dict[str, Any]:
    from masqd.ops.control import request

    return dict(request(str(router.socket_path), {"cmd": "wan-address", "action": "set", "address": address}))


DynaddrCheck = Callable[[DynaddrRun], list[str]]


def run_dynaddr(checks: tuple[DynaddrCheck, ...] = (), run_root: Path = RUN_ROOT,
                keep: bool | None = None) -> DynaddrRun:
    """Play the scenario (see the module docstring), then ``checks`` on what it measured
    (their problems decide the pass); never raises for what it measures."""
    prefix = new_prefix()
    run = DynaddrRun(prefix, run_root / f"{time.strftime('%Y%m%d-%H%M%S')}-dynaddr-{prefix}")
    run.run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    lab: Lab | None = None
    router: MasqdRouter | None = None
    captures: list[Capture] = []
    peers: list[Peer] = []
    procs: list[_Proc] = []
    pcaps: dict[str, Path] = {}
    change_at = 0.0
    try:
        lab = lab_up(prefix)
        for seg, br in (("lan", "br-lan"), ("wan", "br-wan")):
            pcaps[seg] = run.run_dir / f"{seg}.pcap"
            captures.append(Capture(lab.ns("sw"), br, pcaps[seg]).start())
        router = MasqdRouter(lab, run.run_dir, {"wan": {"dynaddr_mode": "flush"}})
        router.start()
        run.timings["lab_and_masqd"] = time.monotonic() - t_start
        for spec in (tunnel_server(), tunnel_client()):
            tap = f"{prefix}{spec.name}"
            lab.attach_tap(spec.segment, tap)
            peers.append(Peer(spec, run.run_dir / "peers" / spec.name, tap))
        server, client = peers
        t = time.monotonic()
        server.start(lab.ns("sw"), 128)
        sink = _Proc(lab.ns(FAR_HOST), "sink", str(STREAM_PORT))
        procs.append(sink)
        probe_sink = _Proc(lab.ns(FAR_HOST), "sink", str(PROBE_PORT))
        procs.append(probe_sink)
        sink.line(10)
        probe_sink.line(10)
        server.wait_ready(30)
        run.timings["server_ready"] = time.monotonic() - t
        t = time.monotonic()
        client.start(lab.ns("sw"), 128)
        _wait_file(client, "up", 40)
        run.timings["tunnel_up"] = time.monotonic() - t
        stream = _Proc(lab.ns(STREAM_HOST), "stream", FAR_IP, str(STREAM_PORT))
        procs.append(stream)
        stream.line(10)
        probe = _Proc(lab.ns(PROBE_HOST), "probe", FAR_IP, str(PROBE_PORT), stdin=True)
        procs.append(probe)
        probe.line(10)
        time.sleep(SETTLE)
        if stream.proc.poll() is not None:
            raise RuntimeError(f"the TCP stream ended before the change: {stream.line(1)}")
        t0 = time.time()
        answer = _change_address(router, NEW_WAN_IP)
        change_at = time.time()
        probe.send("go\n")
        run.timings["change_request"] = change_at - t0
        run.probe = probe.line(10)
        run.probe["after_change_s"] = round(float(run.probe["done"]) - change_at, 3)
        run.stream = stream.line(15)
        run.stream["after_change_s"] = round(float(run.stream["at"]) - change_at, 3)
        if answer.get("address") != f"{NEW_WAN_IP}/24":
            run.problems.append(f"control socket answered {answer}")
        client.wait_done(PING_DEADLINE + 15)
        run.timings["after_change"] = time.time() - change_at
        client.stop()  # syncs nothing more: done was marked after sync
        run.tunnel = dict(client.result())
        run.tunnel.update(tunnel_summary(ping_replies((client.dir / "ping.log").read_text(errors="replace")),
                                         change_at))
        run.tunnel["recovery"] = tunnel_recovery(_read(client.dir / "charon.log"), _read(server.dir / "charon.log"))
        run.masqd_state = router.snapshot()
    except Exception as exc:  # any harness failure becomes a reported problem
        run.problems.append(f"{type(exc).__name__}: {exc}")
        (run.run_dir / "harness-error.txt").write_text(traceback.format_exc())
    finally:
        t = time.monotonic()
        for p in procs:
            p.stop()
        for peer in peers:
            try:
                peer.stop()
            except (OSError, RuntimeError) as exc:
                run.problems.append(f"stopping {peer.spec.name}: {exc}")
        if router is not None:
            if run.masqd_state is None:
                run.masqd_state = router.snapshot()
            router.stop()
        for cap in captures:
            cap.stop()
        if lab is not None:
            try:
                lab.down()
            except LabError as exc:
                run.problems.append(f"lab teardown: {exc}")
        run.timings["teardown"] = time.monotonic() - t
    if run.passed:
        run.lan_resets = read_pcap_summary(
            pcaps["lan"], f"src host {FAR_IP} and dst host {STREAM_IP} and tcp port {STREAM_PORT} "
                          "and tcp[tcpflags] & tcp-rst != 0")
        for check in checks:
            try:
                run.problems += check(run)
            except Exception as exc:  # a broken check is a finding, not a crash
                run.problems.append(f"check {getattr(check, '__qualname__', check)} raised {exc!r}")
    finish_run(run, run_root, keep, t_start)
    return run
