"""The interop harness itself: peers talk directly, through the kernel's masquerade
(the reference router), and teardown leaves nothing behind even when a scenario fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from masqd.lab import Lab

from . import catalog
from .checks import clients_ok
from .harness.peers import strongswan_initiator, strongswan_responder
from .harness.scenario import Scenario, ScenarioRun, new_prefix, run_scenario

pytestmark = pytest.mark.interop


def _leftovers(prefix: str, run: ScenarioRun) -> list[str]:
    found = [f"netns {n}" for n in Lab(prefix).namespaces()]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if prefix in line]
    found += [
        f"mount {line}" for line in Path("/proc/mounts").read_text().splitlines() if prefix in line
    ]
    for peer in run.peers.values():
        pid = peer.guest.pid if peer.guest else None
        if pid is not None and Path(f"/proc/{pid}").exists():
            found.append(f"guest {peer.spec.name} pid {pid} still running")
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    found += [f"process {line.strip()}" for line in ps.splitlines() if prefix in line]
    return found


def test_direct_strongswan_on_one_segment(guest_images: dict[str, Path]) -> None:
    """Client and gateway on the remote segment, no router: the peer API alone."""
    server = strongswan_responder("srv", "198.51.100.10/24", "198.51.100.254")
    client = strongswan_initiator(
        "c1", "198.51.100.50/24", "198.51.100.254", "198.51.100.10", segment="rem"
    )
    run = run_scenario(Scenario("direct-strongswan", (server, client), (clients_ok(),), "none"))
    assert run.passed, run.report()
    assert run.clients()[0].result()["ping_received"] == "5", run.report()
    assert _leftovers(run.prefix, run) == []


@pytest.mark.parametrize(
    "scenario",
    [
        catalog.strongswan_natt(2, router="kernel"),
        catalog.libreswan_raw_esp(1, router="kernel"),
        catalog.libreswan_raw_esp(2, router="kernel"),
        catalog.pptp(1, router="kernel"),
    ],
    ids=lambda s: s.name,
)
def test_reference_kernel_masquerade(guest_images: dict[str, Path], scenario: Scenario) -> None:
    """Every scenario kind passes through the kernel's masquerade: the harness is sound."""
    run = run_scenario(scenario)
    assert run.passed, run.report()


def test_teardown_after_failed_scenario(guest_images: dict[str, Path]) -> None:
    """A scenario that fails mid-flight (client never done) still leaves nothing behind,
    and its failure report names the kept run directory and evidence."""
    server = strongswan_responder("srv", "198.51.100.10/24", "198.51.100.254")
    client = strongswan_initiator("c1", "10.0.0.11/8", "10.0.0.1", "198.51.100.99")
    sc = Scenario("deliberate-failure", (server, client), (clients_ok(),), "kernel",
                  done_timeout=1.5)  # fmt: skip
    run = run_scenario(sc)
    assert not run.passed
    assert any("no 'done'" in p for p in run.problems), run.report()
    assert run.kept and run.run_dir.is_dir()
    report = run.report()
    assert str(run.run_dir) in report
    assert (run.run_dir / "wan.pcap").exists() and (run.run_dir / "lan.pcap").exists()
    assert (run.run_dir / "peers" / "srv" / "charon.log").exists()
    assert _leftovers(run.prefix, run) == []


def test_sigterm_mid_scenario_tears_down(guest_images: dict[str, Path]) -> None:
    """A harness process stopped by SIGTERM while guests run (as `timeout` does)
    still stops every guest, capture and router and removes the lab."""
    prefix = new_prefix()
    # The handler raises KeyboardInterrupt, which unwinds through the teardown. Python drops an
    # exception raised while a finaliser (a __del__) runs ("Exception ignored in ..."): then the
    # scenario runs to its end and tears down normally, and the flag still makes the exit status
    # say that a SIGTERM came.
    code = (
        "import signal, sys\n"
        "hit = []\n"
        "def stop(s, f):\n"
        "    hit.append(s)\n"
        "    raise KeyboardInterrupt\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"from {__package__} import catalog\n"
        f"from {__package__}.harness.scenario import run_scenario\n"
        f"run_scenario(catalog.strongswan_natt(1, router='kernel'), prefix={prefix!r})\n"
        "sys.exit(3 if hit else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # tests/: this package
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
            if f"umid=masqd-{prefix}c1" in ps:  # the client guest runs: mid-scenario
                break
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.2)
        else:
            pytest.fail("scenario did not reach the client stage")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out
    empty = ScenarioRun(Scenario("x", ()), prefix, Path("/nonexistent"))
    assert _leftovers(prefix, empty) == [], out
