"""Real libreswan peers through masqd's IPsec masquerade (issue 6): ISAKMP 500<->500 and raw ESP.

Each scenario runs UML guests on the lab's segments (harness/): libreswan
clients on the LAN (encapsulation=no, so no NAT-T: IKE stays on UDP 500 and
ESP is IP protocol 50) and one libreswan gateway on the remote segment. The
checks read the WAN capture and masqd's own table and counters (its state
snapshot), so a pass means masqd - not the kernel - paired the SPIs.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from . import catalog
from .checks import clients_ok, raw_esp_checks
from .harness.peers import PeerSpec
from .harness.scenario import Scenario, ScenarioRun, run_scenario

pytestmark = pytest.mark.interop

FW_WAN = "203.0.113.200"
SERVER = catalog.LIBRESWAN_SERVER


def _lan(n: int) -> str:
    return catalog.lan_client_address(n).split("/")[0]


def esp_paired(lans: list[str], at_least_learned: int = 0) -> Any:
    """masqd's table holds an ESTABLISHED ESP pair with the gateway for each of ``lans``,
    and its counters show at least ``at_least_learned`` learned pairs."""

    def check(run: ScenarioRun) -> list[str]:
        st = run.masqd_state
        if st is None:
            return ["no masqd state snapshot"]
        rows = [r for r in st.get("table", []) if r.get("proto") == "esp" and r.get("remote") == SERVER]
        have = {r.get("lan") for r in rows if r.get("state") in ("ESTABLISHED", "REPLACED")}
        problems = [f"masqd table: no ESP pair for {h} (rows: {rows})" for h in lans if h not in have]
        learned = int(st.get("counters", {}).get("esp_learned", 0))
        if learned < max(at_least_learned, len(lans)):
            problems.append(f"masqd counters: esp_learned={learned}, wanted >= {max(at_least_learned, len(lans))}")
        if int(st.get("counters", {}).get("drop_internal_error", 0)):
            problems.append("masqd counted internal errors")
        return problems

    return check


def isakmp_kept_port_500(run: ScenarioRun) -> list[str]:
    """Every ISAKMP packet masqd sent left from port 500 (never translated)."""
    bad = [p for p in run.wan_packets(f"src host {FW_WAN} and udp dst port 500") if f"{FW_WAN}.500 >" not in p]
    return [f"ISAKMP from a translated port: {bad[0]}"] if bad else []


def _with_ipsec(sc: Scenario, name: str, **ipsec: Any) -> Scenario:
    cfg = dict(sc.masqd_config)
    cfg["ipsec"] = {**cfg.get("ipsec", {}), **ipsec}
    return dataclasses.replace(sc, name=name, masqd_config=cfg)


@pytest.mark.parametrize("ike", [1, 2])
def test_one_client_raw_esp(guest_images: dict[str, Path], ike: int) -> None:
    sc = catalog.libreswan_raw_esp(ike, 1)
    sc = dataclasses.replace(sc, checks=sc.checks + (esp_paired([_lan(1)]), isakmp_kept_port_500))
    run = run_scenario(sc)
    assert run.passed, run.report()


@pytest.mark.parametrize("ike", [1, 2])
def test_three_clients_at_once_parallel_sessions_on(guest_images: dict[str, Path], ike: int) -> None:
    """The HOWTO's multi-host case: three LAN hosts start IPsec with one gateway at the same
    moment; serialisation pairs every SPI (parallel sessions allowed). A host whose pending SA
    went unanswered while others waited is squelched for squelch_time (30 s by default) to let
    the next host through, then gets its turn: the clients ping for up to 45 s (a 15 s window,
    shorter than the squelch, made this test fail whenever a host was squelched)."""
    sc = _with_ipsec(catalog.libreswan_raw_esp(ike, 3, ping_wait=45), f"libreswan-ikev{ike}-rawesp-x3-parallel",
                     parallel_sessions=True)
    sc = dataclasses.replace(sc, checks=sc.checks + (esp_paired([_lan(n) for n in (1, 2, 3)]),
                                                     isakmp_kept_port_500),
                             done_timeout=120.0, mem_mb=128)
    run = run_scenario(sc)
    assert run.passed, run.report()


def test_parallel_sessions_off_second_client_refused(guest_images: dict[str, Path]) -> None:
    """Default config: while one LAN host has ESP with the gateway, a second one is refused."""
    sc = catalog.libreswan_raw_esp(2, 2)

    def one_refused(run: ScenarioRun) -> list[str]:
        ok = [p.spec.name for p in run.clients() if p.result().get("ping_rc") == "0"]
        st = run.masqd_state or {}
        refused = int(st.get("counters", {}).get("esp_parallel_refused", 0))
        problems = []
        if len(ok) != 1:
            problems.append(f"clients with traffic through the tunnel: {ok}, wanted exactly one")
        if refused < 1:
            problems.append(f"masqd counters: esp_parallel_refused={refused}, wanted >= 1")
        return problems

    sc = dataclasses.replace(sc, name="libreswan-ikev2-rawesp-x2-parallel-off",
                             checks=(one_refused, isakmp_kept_port_500))
    run = run_scenario(sc)
    assert run.passed, run.report()


def _short_lifetimes(spec: PeerSpec, pings: int) -> PeerSpec:
    extra = "    salifetime=24s\n    rekeymargin=9s\n    rekeyfuzz=0%\n    ikelifetime=300s\n"
    files = dict(spec.files)
    conf = files["ipsec.conf"]
    out = []
    for line in conf.splitlines(keepends=True):
        out.append(line)
        if line.startswith("conn "):
            out.append(extra)
    files["ipsec.conf"] = "".join(out)
    script, n = re.subn(r"ping -n -c \d+ -i [0-9.]+ -[wW] \d+", f"ping -n -c {pings} -i 1 -w {pings + 30}",
                        spec.script)
    if spec.role == "client" and n != 1:
        raise AssertionError("the client script's ping line changed shape; update this test")
    return dataclasses.replace(spec, files=files, script=script)


@pytest.mark.parametrize("ike", [1, 2])
def test_rekey_with_short_lifetimes(guest_images: dict[str, Path], ike: int) -> None:
    """SAs re-keyed every ~15 s while the client pings for 36 s: each new SPI pair is learned
    (the old one replaced) and traffic keeps flowing."""
    base = catalog.libreswan_raw_esp(ike, 1)
    pings = 36
    peers = tuple(_short_lifetimes(p, pings) for p in base.peers)

    def kept_flowing(run: ScenarioRun) -> list[str]:
        got = [int(p.result().get("ping_received") or 0) for p in run.clients()]
        return [] if all(g >= pings - 6 for g in got) else [f"pings received {got} of {pings} across re-keys"]

    sc = dataclasses.replace(
        base, name=f"libreswan-ikev{ike}-rawesp-rekey", peers=peers, done_timeout=150.0,
        checks=raw_esp_checks(1) + (clients_ok(), kept_flowing, esp_paired([_lan(1)], at_least_learned=2)),
    )
    run = run_scenario(sc)
    assert run.passed, run.report()
