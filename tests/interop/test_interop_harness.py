"""The interop harness itself: peers talk directly, through the kernel's masquerade
(the reference router), and teardown leaves nothing behind even when a scenario fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from masqd.interop import catalog
from masqd.interop.netns import list_netns
from masqd.interop.peers import strongswan_initiator, strongswan_responder
from masqd.interop.scenario import Scenario, ScenarioRun, clients_ok, run_scenario

pytestmark = pytest.mark.interop


def _leftovers(prefix: str, run: ScenarioRun) -> list[str]:
    found = [f"netns {n}" for n in list_netns() if n.startswith(prefix)]
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
