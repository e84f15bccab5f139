"""Interop scenarios: a declarative `Scenario` and `run_scenario`, which plays it in a fresh lab.

A scenario lists peers (servers start first and must become ready, then all
clients start at once), the router between LAN and WAN (masqd, the kernel's
masquerade as a reference, or none) and checks. A check is any callable
taking the finished `ScenarioRun` and returning a list of problems; the
builders below cover tunnels and what the WAN capture must (not) show.
IPsec and PPTP work add scenarios (e.g. multi-client matrices) by building
new `Scenario` values, without touching this module.

Each run gets a per-run prefix and a run directory under
``/var/tmp/masqd-interop-runs`` holding LAN/WAN pcaps, peers' logs and
results, masqd's log and table. The lab is always torn down (guests and
captures stopped by PID, namespaces deleted); the directory is removed after
a pass unless ``keep`` (or MASQD_INTEROP_KEEP=1) and named in the report of a
failure.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from masqd.interop.netns import Capture, MiniLab, add_kernel_router, ip, read_pcap_summary
from masqd.interop.peers import Peer, PeerSpec
from masqd.interop.router import (
    FW_WAN_IP,
    KernelRouter,
    LabLike,
    MasqdRouter,
    NoRouter,
    Router,
)

RUN_ROOT = Path(os.environ.get("MASQD_INTEROP_RUNS", "/var/tmp/masqd-interop-runs"))
KEEP_RUNS = 40  # newest run directories kept (failures' evidence); older ones are pruned

RouterKind = Literal["masqd", "kernel", "none"]
Check = Callable[["ScenarioRun"], list[str]]


@dataclass(frozen=True)
class Scenario:
    """What to run: peers, the router between the segments, what must hold afterwards."""

    name: str
    peers: tuple[PeerSpec, ...]
    checks: tuple[Check, ...] = ()
    router: RouterKind = "masqd"
    masqd_config: Mapping[str, Any] = field(default_factory=dict)
    ready_timeout: float = 30.0
    done_timeout: float = 75.0
    mem_mb: int = 160


@dataclass
class ScenarioRun:
    """A played scenario: peers, captures, evidence, timings, problems found."""

    scenario: Scenario
    prefix: str
    run_dir: Path
    peers: dict[str, Peer] = field(default_factory=dict)
    pcaps: dict[str, Path] = field(default_factory=dict)
    evidence: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    kept: bool = False
    masqd_state: dict[str, Any] | None = None  # masqd's table+counters at the end (masqd router)

    @property
    def passed(self) -> bool:
        return not self.problems

    def clients(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.spec.role == "client"]

    def wan_packets(self, bpf: str) -> list[str]:
        return read_pcap_summary(self.pcaps.get("wan", Path("/nonexistent")), bpf)

    def lan_packets(self, bpf: str) -> list[str]:
        return read_pcap_summary(self.pcaps.get("lan", Path("/nonexistent")), bpf)

    def report(self) -> str:
        head = f"scenario {self.scenario.name} [{self.scenario.router}] " + (
            "passed" if self.passed else "FAILED"
        )
        lines = [head, "timings: " + ", ".join(f"{k}={v:.1f}s" for k, v in self.timings.items())]
        for peer in self.clients():
            lines.append(f"  {peer.spec.name}: {peer.result()}")
        lines += [f"  problem: {p}" for p in self.problems]
        if self.kept:
            lines.append(f"evidence in {self.run_dir}:")
            files = sorted({*self.pcaps.values(), *self.evidence})
            for peer in self.peers.values():
                files += peer.log_paths()
            lines += [f"  {f}" for f in files if f.exists()]
        return "\n".join(lines)


# ----------------------------------------------------------------- checks


def clients_ok() -> Check:
    """Every client brought its tunnel up and pinged the host behind the far end."""

    def check(run: ScenarioRun) -> list[str]:
        problems = []
        for peer in run.clients():
            res = peer.result()
            if res.get("tunnel_rc") != "0":
                problems.append(
                    f"{peer.spec.name}: tunnel not up (tunnel_rc={res.get('tunnel_rc')})"
                )
            elif res.get("ping_rc") != "0":
                problems.append(
                    f"{peer.spec.name}: no traffic through the tunnel "
                    f"(ping_rc={res.get('ping_rc')}, received={res.get('ping_received')})"
                )
        return problems

    return check


def wan_has(bpf: str, at_least: int = 1, what: str = "") -> Check:
    """The WAN capture holds at least ``at_least`` packets matching ``bpf``."""

    def check(run: ScenarioRun) -> list[str]:
        n = len(run.wan_packets(bpf))
        if n < at_least:
            return [f"WAN capture: {n} packets '{bpf}' ({what}), wanted >= {at_least}"]
        return []

    return check


def wan_lacks(bpf: str, what: str = "") -> Check:
    """No packet on the WAN capture matches ``bpf``."""

    def check(run: ScenarioRun) -> list[str]:
        pkts = run.wan_packets(bpf)
        if pkts:
            return [f"WAN capture: {len(pkts)} packets '{bpf}' ({what}), e.g. {pkts[0]}"]
        return []

    return check


_ENDPOINT = re.compile(r" IP (\d+\.\d+\.\d+\.\d+)(?:\.(\d+))? > ")


def wan_source_endpoints(run: ScenarioRun, bpf: str) -> set[str]:
    """Distinct source ``addr[:port]`` of WAN packets matching ``bpf``."""
    out = set()
    for line in run.wan_packets(bpf):
        m = _ENDPOINT.search(line)
        if m:
            out.add(m.group(1) + (f":{m.group(2)}" if m.group(2) else ""))
    return out


def wan_distinct_sources(bpf: str, at_least: int, what: str = "") -> Check:
    """At least ``at_least`` distinct source endpoints among matching WAN packets."""

    def check(run: ScenarioRun) -> list[str]:
        srcs = wan_source_endpoints(run, bpf)
        if len(srcs) < at_least:
            return [f"WAN capture: sources of '{bpf}' ({what}) are {sorted(srcs)}, "
                    f"wanted >= {at_least} distinct"]  # fmt: skip
        return []

    return check


def masqueraded_by(public_ip: str = FW_WAN_IP, lan: str = "10.0.0.0/8") -> Check:
    """The WAN shows traffic from ``public_ip`` and never a LAN address."""
    net = ipaddress.ip_network(lan)

    def check(run: ScenarioRun) -> list[str]:
        problems = wan_lacks(f"net {net}", "LAN addresses leaking to the WAN")(run)
        problems += wan_has(f"src host {public_ip}", 1, "masqueraded traffic")(run)
        return problems

    return check


def masqd_entries(proto: str, remote_port: int, at_least: int, public_ip: str = FW_WAN_IP) -> Check:
    """masqd's own table (its state snapshot) holds ``at_least`` entries of ``proto``
    towards ``remote_port`` from distinct LAN endpoints, mapped to ``public_ip``:
    masqd (not the kernel) did the masquerade."""

    def check(run: ScenarioRun) -> list[str]:
        if run.masqd_state is None:
            return ["no masqd state snapshot (masqd router not used or not answering)"]
        lans = set()
        for entry in run.masqd_state.get("table", []):
            remote = str(entry.get("remote", ""))
            if (
                entry.get("proto") == proto
                and remote.endswith(f":{remote_port}")
                and str(entry.get("wan", "")).startswith(f"{public_ip}:")
            ):
                lans.add(entry.get("lan"))
        if len(lans) < at_least:
            return [f"masqd table: {len(lans)} {proto} entries to port {remote_port} "
                    f"({sorted(map(str, lans))}), wanted >= {at_least}"]  # fmt: skip
        return []

    return check


def natt_checks(clients: int) -> tuple[Check, ...]:
    """Tunnels up, masqueraded source, ESP-in-UDP 4500 from as many WAN ports as clients."""
    return (
        clients_ok(),
        masqueraded_by(),
        wan_has(f"src host {FW_WAN_IP} and udp port 4500", 2 * clients, "NAT-T from masqd"),
        wan_distinct_sources(
            f"src host {FW_WAN_IP} and udp dst port 4500", clients, "one NAT-T flow per client"
        ),
    )


def raw_esp_checks(clients: int) -> tuple[Check, ...]:
    """Tunnels up, masqueraded, ISAKMP 500<->500 and raw ESP (protocol 50) on the WAN."""
    return (
        clients_ok(),
        masqueraded_by(),
        wan_has(f"src host {FW_WAN_IP} and udp src port 500 and udp dst port 500", 1, "ISAKMP"),
        wan_has(f"src host {FW_WAN_IP} and ip proto 50", clients, "raw ESP from masqd"),
        wan_lacks("udp port 4500", "NAT-T must not be used"),
    )


def pptp_checks(clients: int) -> tuple[Check, ...]:
    """Tunnels up, masqueraded, TCP 1723 and GRE (protocol 47) on the WAN."""
    return (
        clients_ok(),
        masqueraded_by(),
        wan_distinct_sources(
            f"src host {FW_WAN_IP} and tcp dst port 1723", clients, "PPTP control"
        ),
        wan_has(f"src host {FW_WAN_IP} and ip proto 47", clients, "GRE from masqd"),
    )


def clients_result(key: str, value: str, names: tuple[str, ...] = ()) -> Check:
    """Every client (or the named ones) recorded ``key=value`` in its result.txt."""

    def check(run: ScenarioRun) -> list[str]:
        peers = [p for p in run.clients() if not names or p.spec.name in names]
        if names and len(peers) != len(names):
            return [f"clients {sorted(names)} wanted, found {[p.spec.name for p in peers]}"]
        return [f"{p.spec.name}: {key}={p.result().get(key)}, wanted {value}"
                for p in peers if p.result().get(key) != value]  # fmt: skip

    return check


def masqd_counter(name: str, at_least: int = 1, at_most: int | None = None) -> Check:
    """masqd's counter ``name`` (its state snapshot) is >= ``at_least`` (and <= ``at_most``)."""

    def check(run: ScenarioRun) -> list[str]:
        if run.masqd_state is None:
            return ["no masqd state snapshot (masqd router not used or not answering)"]
        got = int(run.masqd_state.get("counters", {}).get(name, 0))
        if got < at_least or (at_most is not None and got > at_most):
            want = f">= {at_least}" + (f" and <= {at_most}" if at_most is not None else "")
            return [f"masqd counters: {name}={got}, wanted {want}"]
        return []

    return check


def masqd_forward_hits(kind: str, lan: str, remote: str, at_least: int) -> Check:
    """masqd's table lists the forward (``kind`` portfw or protofw) to ``lan`` (``addr[:port]``)
    for ``remote`` (the protocol name: tcp, udp, esp, gre) with at least ``at_least`` hits."""

    def check(run: ScenarioRun) -> list[str]:
        if run.masqd_state is None:
            return ["no masqd state snapshot (masqd router not used or not answering)"]
        rows = [r for r in run.masqd_state.get("table", [])
                if r.get("proto") == kind and r.get("lan") == lan
                and str(r.get("remote")).lower() == remote]  # fmt: skip
        if not rows:
            return [f"masqd table: no {kind} row to {lan} ({remote})"]
        hits = sum(int(r.get("hits") or 0) for r in rows)
        if hits < at_least:
            return [f"masqd table: {kind} to {lan} ({remote}) has {hits} hits, wanted >= {at_least}"]
        return []

    return check


def forwarded_server_checks(lan_server: str, ports: tuple[tuple[str, int], ...], proto: str,
                            proto_number: int, remote_clients: int,
                            proto_forward_hits: bool = True) -> tuple[Check, ...]:
    """A server on ``lan_server`` behind masqd, reached by ``remote_clients`` remote peers:
    masqd's table shows the port forwards with hits and the protocol forward (with hits
    unless ``proto_forward_hits`` is false: a helper that tracks the calls, as PPTP's does,
    delivers their packets itself), its counters the connections, and the forwarded
    protocol leaves the WAN from masqd's address towards every remote client."""
    checks: list[Check] = [
        masqueraded_by(),
        masqd_counter("portfw_connections", remote_clients),
        masqd_forward_hits("protofw", lan_server, proto, remote_clients if proto_forward_hits else 0),
        wan_has(f"src host {FW_WAN_IP} and ip proto {proto_number}", remote_clients,
                f"forwarded {proto} leaving from masqd"),
    ]  # fmt: skip
    if proto_forward_hits:
        checks.append(masqd_counter("protofw_packets", remote_clients))
    for pname, port in ports:
        checks.append(masqd_forward_hits("portfw", f"{lan_server}:{port}", pname, remote_clients))
    checks.append(_distinct_destinations(f"src host {FW_WAN_IP} and ip proto {proto_number}",
                                          remote_clients, f"{proto} to each remote client"))
    return tuple(checks)


def masqd_pptp_calls(lan: str, forwarded: bool, count: int, masqueraded_ids: bool) -> Check:
    """masqd's table holds exactly ``count`` ESTABLISHED PPTP calls (GRE rows) of LAN host
    ``lan``: answered by a forwarded server (``forwarded``) or placed by a LAN client; with
    ``masqueraded_ids`` false the Call IDs were left as the LAN host chose them."""

    def check(run: ScenarioRun) -> list[str]:
        if run.masqd_state is None:
            return ["no masqd state snapshot (masqd router not used or not answering)"]
        rows = [r for r in run.masqd_state.get("table", [])
                if r.get("proto") == "gre" and str(r.get("lan", "")).split(":")[0] == lan
                and bool(r.get("inbound")) == forwarded]  # fmt: skip
        what = "forwarded-server" if forwarded else "LAN-client"
        problems = []
        if len(rows) != count or any(r.get("state") != "ESTABLISHED" for r in rows):
            problems.append(f"masqd table: {what} PPTP calls of {lan}: {rows}, wanted {count} ESTABLISHED")
        if not masqueraded_ids:
            problems += [f"masqd table: Call ID of a {what} call rewritten: {r}"
                         for r in rows if r.get("lan_call_id") != r.get("masq_call_id")]  # fmt: skip
        return problems

    return check


def masqd_esp_pairs(remote: str, lans: list[str]) -> Check:
    """masqd's IPsec masquerade paired an ESP SPI pair (ESTABLISHED) with ``remote`` for each
    LAN host in ``lans``."""

    def check(run: ScenarioRun) -> list[str]:
        if run.masqd_state is None:
            return ["no masqd state snapshot (masqd router not used or not answering)"]
        rows = [r for r in run.masqd_state.get("table", [])
                if r.get("proto") == "esp" and r.get("remote") == remote]  # fmt: skip
        have = {r.get("lan") for r in rows if r.get("state") in ("ESTABLISHED", "REPLACED")}
        return [f"masqd table: no ESP pair for {h} with {remote} (rows: {rows})"
                for h in lans if h not in have]  # fmt: skip

    return check


_DEST = re.compile(r" > (\d+\.\d+\.\d+\.\d+)")


def _distinct_destinations(bpf: str, at_least: int, what: str) -> Check:
    def check(run: ScenarioRun) -> list[str]:
        dsts = set()
        for line in run.wan_packets(bpf):
            m = _DEST.search(line)
            if m:
                dsts.add(m.group(1).rstrip(":"))
        if len(dsts) < at_least:
            return [f"WAN capture: destinations of '{bpf}' ({what}) are {sorted(dsts)}, "
                    f"wanted >= {at_least} distinct"]  # fmt: skip
        return []

    return check


# ----------------------------------------------------------------- running


class ProjectLab:
    """Adapter: masqd.lab.Lab (the project's lab) as the harness sees a lab."""

    def __init__(self, prefix: str) -> None:
        from masqd.lab import Lab

        self.prefix = prefix
        self._lab = Lab(prefix, mode="tap")
        self._lab.up()

    @property
    def sw(self) -> str:
        return self._lab.ns("sw")

    def ns(self, host: str) -> str:
        return self._lab.ns(host)

    def attach_tap(self, segment: str, tapname: str) -> None:
        self._lab.attach_tap(segment, tapname)

    def vacate(self, address: str) -> None:
        """A lab namespace host holding ``address`` (e.g. lan2's 10.0.0.2) gives it up to a peer."""
        from masqd.lab.topology import HOSTS

        want = address.split("/")[0]
        for role, (ifs, _gw) in HOSTS.items():
            for _seg, ifname, cidr in ifs:
                if cidr.split("/")[0] == want:
                    ip(self.ns(role), "link", "set", ifname, "down")
                    ip(self.ns(role), "addr", "flush", "dev", ifname)

    def kernel_router(self) -> None:
        add_kernel_router(self.sw, self.ns("fw"))

    def teardown(self) -> None:
        self._lab.down()


def make_lab(prefix: str) -> LabLike:
    """The project's lab (masqd.lab.Lab) when present, else the stand-in MiniLab;
    MASQD_INTEROP_LAB=mini forces the stand-in."""
    if os.environ.get("MASQD_INTEROP_LAB") != "mini":
        try:
            from masqd.lab import Lab
        except ImportError:
            Lab = None  # type: ignore[assignment,misc]
        if Lab is not None and hasattr(Lab, "attach_tap"):
            return ProjectLab(prefix)
    return MiniLab(prefix).up()


def new_prefix() -> str:
    """A short per-run prefix: TAP names (prefix + peer name) must fit in 15 characters."""
    return "mi" + secrets.token_hex(2)


def run_scenario(
    scenario: Scenario,
    run_root: Path = RUN_ROOT,
    keep: bool | None = None,
    prefix: str | None = None,
) -> ScenarioRun:
    """Play a scenario in a fresh lab; always tear down. Never raises for peer failures."""
    prefix = prefix or new_prefix()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = ScenarioRun(scenario, prefix, run_root / f"{stamp}-{scenario.name}-{prefix}")
    run.run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    lab: LabLike | None = None
    router: Router = NoRouter()
    captures: list[Capture] = []
    try:
        lab = make_lab(prefix)
        run.timings["lab"] = time.monotonic() - t_start
        for seg, br in (("lan", "br-lan"), ("wan", "br-wan")):
            run.pcaps[seg] = run.run_dir / f"{seg}.pcap"
            captures.append(Capture(lab.sw, br, run.pcaps[seg]).start())
        if scenario.router == "masqd":
            router = MasqdRouter(lab, run.run_dir, scenario.masqd_config)
        elif scenario.router == "kernel":
            router = KernelRouter(lab, run.run_dir)
        t = time.monotonic()
        router.start()
        run.timings["router"] = time.monotonic() - t
        for spec in scenario.peers:
            if spec.name in run.peers:
                raise ValueError(f"two peers named {spec.name}")
            tap = f"{prefix}{spec.name}"
            if len(tap) > 15:
                raise ValueError(f"peer name {spec.name!r} too long for a TAP name")
            vacate = getattr(lab, "vacate", None)
            if vacate is not None:  # the peer, not a lab host, owns its address on the segment
                vacate(spec.address)
            lab.attach_tap(spec.segment, tap)
            run.peers[spec.name] = Peer(spec, run.run_dir / "peers" / spec.name, tap)
        _play(run, lab)
        run.evidence += router.evidence()
        if isinstance(router, MasqdRouter):
            run.masqd_state = router.last_snapshot
    except Exception as exc:  # any harness/lab/peer failure becomes a reported problem
        run.problems.append(f"{type(exc).__name__}: {exc}")
        (run.run_dir / "harness-error.txt").write_text(traceback.format_exc())
        try:
            run.evidence += router.evidence()
        except (OSError, RuntimeError):
            pass
    finally:
        _teardown(run, lab, router, captures)
    if run.passed:
        for check in scenario.checks:
            try:
                run.problems += check(run)
            except Exception as exc:  # a broken check is a finding, not a crash
                run.problems.append(f"check {getattr(check, '__qualname__', check)} raised {exc!r}")
    finish_run(run, run_root, keep, t_start)
    return run


class FinishedRun(Protocol):
    """What :func:`finish_run` needs from a run record (ScenarioRun, DynaddrRun)."""

    run_dir: Path
    timings: dict[str, float]
    kept: bool

    @property
    def passed(self) -> bool: ...

    def report(self) -> str: ...


def finish_run(run: FinishedRun, run_root: Path, keep: bool | None, t_start: float) -> None:
    """Close a run: total time, report.txt, evidence kept on failure (or when asked:
    ``keep`` / MASQD_INTEROP_KEEP=1), old run directories pruned."""
    run.timings["total"] = time.monotonic() - t_start
    if keep is None:
        keep = os.environ.get("MASQD_INTEROP_KEEP") == "1"
    run.kept = keep or not run.passed
    (run.run_dir / "report.txt").write_text(run.report() + "\n")
    if not run.kept:
        shutil.rmtree(run.run_dir, ignore_errors=True)
    prune_runs(run_root)


def prune_runs(run_root: Path, keep: int = KEEP_RUNS) -> None:
    """Remove all but the ``keep`` newest run directories."""
    try:
        dirs = sorted(
            (d for d in run_root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime
        )
    except OSError:
        return
    for old in dirs[: max(0, len(dirs) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _play(run: ScenarioRun, lab: LabLike) -> None:
    sc = run.scenario
    servers = [p for p in run.peers.values() if p.spec.role == "server"]
    t = time.monotonic()
    for peer in servers:
        peer.start(lab.sw, sc.mem_mb)
    for peer in servers:
        peer.wait_ready(max(1.0, sc.ready_timeout - (time.monotonic() - t)))
    run.timings["servers_ready"] = time.monotonic() - t
    t = time.monotonic()
    clients = run.clients()
    for peer in clients:
        peer.start(lab.sw, sc.mem_mb)
    for peer in clients:
        peer.wait_done(max(1.0, sc.done_timeout - (time.monotonic() - t)))
    run.timings["clients_done"] = time.monotonic() - t
    time.sleep(0.3)  # late replies into the captures


def _teardown(
    run: ScenarioRun, lab: LabLike | None, router: Router, captures: list[Capture]
) -> None:
    t = time.monotonic()
    errors: list[str] = []
    for peer in run.peers.values():
        try:
            peer.stop()
        except (OSError, RuntimeError) as exc:
            errors.append(f"stopping {peer.spec.name}: {exc}")
    try:
        router.stop()
    except (OSError, RuntimeError) as exc:
        errors.append(f"stopping router: {exc}")
    for cap in captures:
        try:
            cap.stop()
        except (OSError, RuntimeError) as exc:
            errors.append(f"stopping capture {cap.iface}: {exc}")
    if lab is not None:
        try:
            lab.teardown()
        except (OSError, RuntimeError) as exc:
            errors.append(f"lab teardown: {exc}")
    run.problems += errors
    run.timings["teardown"] = time.monotonic() - t
