"""Interop scenarios: a declarative `Scenario` and `run_scenario`, which plays it in a fresh lab.

A scenario lists peers (servers start first and must become ready, then all
clients start at once), the router between LAN and WAN (masqd, the kernel's
masquerade as a reference, or none) and checks. A check is any callable
taking the finished `ScenarioRun` and returning a list of problems; the
checks themselves (tunnels up, what the WAN capture must and must not show,
what masqd's table holds) live beside the tests (``tests/interop/checks.py``),
as do the ready-made scenarios (``tests/interop/catalog.py``).
The lab is :class:`masqd.lab.Lab` in TAP mode; every peer joins a segment on a
TAP of its own, taking over the address of a lab host if it has to.

Each run gets a per-run prefix and a run directory under
``/var/tmp/masqd-interop-runs`` holding LAN/WAN pcaps, peers' logs and
results, masqd's log and table. The lab is always torn down (guests and
captures stopped by PID, namespaces deleted); the directory is removed after
a pass unless ``keep`` (or MASQD_INTEROP_KEEP=1) and named in the report of a
failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from masqd.lab import Lab, LabError

from .capture import Capture, read_pcap_summary
from .peers import Peer, PeerSpec
from .router import KernelRouter, MasqdRouter, NoRouter, Router

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
    # an upper bound: a loaded 2-core machine took over 30 s to boot a server loading six connections
    ready_timeout: float = 90.0
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


def lab_up(prefix: str) -> Lab:
    """A fresh lab in TAP mode: masqd's TAPs and the guests' TAPs join its bridges."""
    lab = Lab(prefix, mode="tap")
    lab.up()
    return lab


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
    lab: Lab | None = None
    router: Router = NoRouter()
    captures: list[Capture] = []
    try:
        lab = lab_up(prefix)
        run.timings["lab"] = time.monotonic() - t_start
        for seg, br in (("lan", "br-lan"), ("wan", "br-wan")):
            run.pcaps[seg] = run.run_dir / f"{seg}.pcap"
            captures.append(Capture(lab.ns("sw"), br, run.pcaps[seg]).start())
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
            lab.release_address(spec.address)  # the peer, not a lab host, owns its address
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
        except (OSError, RuntimeError, LabError):
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


def _play(run: ScenarioRun, lab: Lab) -> None:
    sc = run.scenario
    servers = [p for p in run.peers.values() if p.spec.role == "server"]
    t = time.monotonic()
    for peer in servers:
        peer.start(lab.ns("sw"), sc.mem_mb)
    for peer in servers:
        peer.wait_ready(max(1.0, sc.ready_timeout - (time.monotonic() - t)))
    run.timings["servers_ready"] = time.monotonic() - t
    t = time.monotonic()
    clients = run.clients()
    for peer in clients:
        peer.start(lab.ns("sw"), sc.mem_mb)
    for peer in clients:
        peer.wait_done(max(1.0, sc.done_timeout - (time.monotonic() - t)))
    run.timings["clients_done"] = time.monotonic() - t
    time.sleep(0.3)  # late replies into the captures


def _teardown(
    run: ScenarioRun, lab: Lab | None, router: Router, captures: list[Capture]
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
            lab.down()
        except (OSError, RuntimeError, LabError) as exc:
            errors.append(f"lab teardown: {exc}")
    run.problems += errors
    run.timings["teardown"] = time.monotonic() - t
