"""Three raw-ESP IPsec clients re-keying at the same moment behind masqd, with and without SPI
announcements (issue 22; the HOWTO's "Routage correct du trafic crypté entrant").

Three libreswan clients (IKEv2, encapsulation=no) on the LAN, one libreswan
gateway on the remote segment, masqd with ``ipsec.parallel_sessions = true``.
Each client pings the host behind the gateway every 50 ms for 30 s; twice, the
harness tells all three to re-key their IPsec SA at the same moment (a file
written into each client's folder at once). With announcements, each client's
updown hook runs the shipped deploy/masqd-spi-announce (it announces at "up"
and follows ``ip xfrm monitor`` for the re-keys) and masqd has the PCP server on.

Ground truth, independent of masqd: every SA a client's kernel installed is in
its ``ip xfrm monitor`` log, so its own inbound SPIs are known; every ESP packet
masqd delivered on the LAN is in the LAN capture. A packet delivered to a
client with an SPI that is not one of that client's is delivered to the wrong
host. With announcements there must be none (and masqd's own count,
``esp_misdelivered``, must be zero, the pings must get through); without, the
number is measured and reported for comparison (``-s`` prints both).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from . import catalog
from .harness.peers import libreswan_rekeying_initiator, libreswan_responder
from .harness.scenario import RUN_ROOT, Scenario, ScenarioRun, new_prefix, run_scenario

pytestmark = pytest.mark.interop

SERVER = catalog.LIBRESWAN_SERVER
CLIENTS = 3
REKEYS = 2
INTERVAL = 0.05  # 20 pings a second per client: replies in flight whenever a re-key happens
PINGS = 600  # 30 s
_SA = re.compile(r"src (\S+) dst (\S+)\s*\n\s*proto esp spi (0x[0-9a-f]+)")
_LAN_ESP = re.compile(rf"IP {re.escape(SERVER)} > (\S+): ESP\(spi=(0x[0-9a-f]+),")


def _scenario(announce: bool) -> Scenario:
    peers = [libreswan_responder("srv", f"{SERVER}/24", catalog.REMOTE_GW)]
    peers += [libreswan_rekeying_initiator(f"c{n}", catalog.lan_client_address(n), catalog.LAN_GW, SERVER, 2, n,
                                           announce=announce, rekeys=REKEYS, pings=PINGS,
                                           interval=INTERVAL)
              for n in range(1, CLIENTS + 1)]
    cfg: dict[str, Any] = {"ipsec": {"parallel_sessions": True}}
    if announce:
        cfg["pcp"] = {"enabled": True}
    name = f"rekey-storm-x{CLIENTS}-{'announced' if announce else 'learned'}"
    return Scenario(name, tuple(peers), (), "masqd", cfg, done_timeout=100.0, mem_mb=128)


def _trigger_rekeys(name: str, prefix: str, stop: threading.Event) -> None:
    """Once every client is up, let the pings run, then tell all of them to re-key at once; twice."""
    deadline = time.monotonic() + 90
    dirs: list[Path] = []
    while not stop.is_set() and time.monotonic() < deadline:
        dirs = sorted(p for p in RUN_ROOT.glob(f"*-{name}-{prefix}/peers/c*") if p.is_dir())
        if len(dirs) == CLIENTS and all((d / "up").exists() for d in dirs):
            break
        time.sleep(0.05)
    for k in range(1, REKEYS + 1):
        if stop.wait(4.0 if k == 1 else 8.0):
            return
        for d in dirs:
            (d / f"rekey{k}").touch()


def _ground_truth(run: ScenarioRun, out: dict[str, Any]) -> list[str]:
    """Count the ESP packets masqd delivered on the LAN to a client that does not own their SPI."""
    own: dict[str, set[str]] = {}
    for peer in run.clients():
        ip = peer.spec.address.split("/")[0]
        text = ""
        for f in ("xfrm-monitor.txt", "xfrm.txt"):
            if (peer.dir / f).exists():
                text += (peer.dir / f).read_text(errors="replace") + "\n"
        own[ip] = {spi for _src, dst, spi in _SA.findall(text) if dst == ip}
    wrong = right = 0
    by_client: dict[str, int] = {}
    for line in run.lan_packets(f"src host {SERVER} and ip proto 50"):
        m = _LAN_ESP.search(line)
        if m is None:
            continue
        dst, spi = m.group(1), m.group(2)
        if spi in own.get(dst, set()):
            right += 1
        else:
            wrong += 1
            by_client[dst] = by_client.get(dst, 0) + 1
    counters = (run.masqd_state or {}).get("counters", {})
    out.update({
        "misdelivered": wrong, "delivered_right": right, "wrong_by_client": by_client,
        "inbound_spis_per_client": {k: len(v) for k, v in own.items()},
        "pings": {p.spec.name: f"{p.result().get('ping_received')}/{p.result().get('ping_sent')}"
                  for p in run.clients()},
        "masqd": {k: v for k, v in counters.items()
                  if k.startswith(("esp_", "spi_", "pcp_refused", "drop_esp"))},
    })
    problems = [f"{ip}: {len(s)} inbound SPIs in its xfrm log, wanted >= {1 + REKEYS} (did it re-key?)"
                for ip, s in own.items() if len(s) < 1 + REKEYS]
    for p in run.clients():
        if p.result().get("tunnel_rc") != "0":
            problems.append(f"{p.spec.name}: tunnel not up")
    if right == 0:
        problems.append("no ESP reached the LAN at all")
    return problems


def _play(announce: bool) -> tuple[ScenarioRun, dict[str, Any]]:
    sc = _scenario(announce)
    found: dict[str, Any] = {}
    sc = dataclasses.replace(sc, checks=(lambda run: _ground_truth(run, found),))
    prefix = new_prefix()
    stop = threading.Event()
    trigger = threading.Thread(target=_trigger_rekeys, args=(sc.name, prefix, stop), daemon=True)
    trigger.start()
    try:
        run = run_scenario(sc, prefix=prefix)
    finally:
        stop.set()
        trigger.join(5)
    return run, found


def test_simultaneous_rekeys_no_inbound_esp_reaches_the_wrong_host_with_announcements(
        guest_images: dict[str, Path]) -> None:
    with_ann, a = _play(announce=True)
    without, b = _play(announce=False)
    print("\nSPI announcements, 3 clients re-keying twice at the same moment:")
    print(f"  with announcements:    {json.dumps(a, sort_keys=True)}")
    print(f"  without (HOWTO rules): {json.dumps(b, sort_keys=True)}")
    assert with_ann.passed, with_ann.report()
    assert without.passed, without.report()
    assert a["misdelivered"] == 0, a
    assert a["masqd"].get("esp_misdelivered", 0) == 0 and a["masqd"].get("spi_announced", 0) >= CLIENTS * 3, a
    assert "esp_guessed" not in a["masqd"], a
    for name, p in a["pings"].items():
        got, sent = (int(x or 0) for x in p.split("/"))
        assert sent >= PINGS - 5 and got >= sent * 0.95, (name, p)
