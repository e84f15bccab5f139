"""A real IPsec tunnel through an active/backup pair survives a failover (issue 17, part 2).

The pair of masqd.lab.ha (two masqd, two keepalived) routes between the LAN and WAN segments;
a libreswan client on the LAN (IKEv2, raw ESP: masqd's ISAKMP cookie and ESP SPI-pair entries
carry it) brings its tunnel up to a libreswan gateway and pings through it. The active masqd
is killed (SIGKILL); the standby takes over with the synced entries: echo replies come back,
the WAN capture holds no ISAKMP packet after the kill (no new IKE exchange), and the new
active never learned a pair itself (``esp_learned`` absent: its pair came by sync).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from masqd.lab import Lab
from masqd.lab.ha import HAPair

from . import catalog
from .harness.capture import Capture
from .harness.peers import Peer, libreswan_responder
from .harness.scenario import RUN_ROOT, new_prefix
from .test_state_restart_ipsec import _REPLY, INTERVAL, PINGS, pinging_client, wan_isakmp_times

pytestmark = pytest.mark.interop


def test_ipsec_tunnel_survives_a_failover_without_a_new_ike_exchange(guest_images: dict[str, Path]) -> None:
    prefix = new_prefix()
    run_dir = RUN_ROOT / f"{time.strftime('%Y%m%d-%H%M%S')}-ha-failover-ipsec-{prefix}"
    run_dir.mkdir(parents=True, exist_ok=True)
    lab = Lab(prefix, mode="tap", ha=True)
    captures: list[Capture] = []
    peers: list[Peer] = []
    pair: HAPair | None = None
    try:
        lab.up()
        wan = run_dir / "wan.pcap"
        captures.append(Capture(lab.ns("sw"), "br-wan", wan).start())
        pair = HAPair(lab)
        assert pair.up() == "a"
        pair.wait_synced("b")
        for spec in (libreswan_responder("srv", f"{catalog.LIBRESWAN_SERVER}/24", catalog.REMOTE_GW),
                     pinging_client()):
            tap = f"{prefix}{spec.name}"
            lab.release_address(spec.address)
            lab.attach_tap(spec.segment, tap)
            peers.append(Peer(spec, run_dir / "peers" / spec.name, tap))
        srv, cli = peers
        srv.start(lab.ns("sw"))
        srv.wait_ready(40)
        cli.start(lab.ns("sw"))
        cli.wait_ready(40)
        deadline = time.monotonic() + 60
        while not (cli.dir / "up").exists():
            assert time.monotonic() < deadline, f"no tunnel; see {cli.dir}"
            time.sleep(0.2)
        time.sleep(3.0)
        killed = time.time()
        os.kill(pair.masqd["a"].pid, signal.SIGKILL)
        pair.wait_active("b", timeout=10, poll=0.005)
        took_over = time.time()
        cli.wait_done(PINGS * INTERVAL + 60)
        table = pair.ask("b", {"cmd": "table"}) or []
        counters = pair.counters("b")
        logs = pair.masqd["b"].log()
    finally:
        for p in peers:
            p.stop()
        if pair is not None:
            pair.stop()
        for c in captures:
            c.stop()
        lab.down()
    replies = [float(m.group(1)) for line in (cli.dir / "ping.log").read_text().splitlines()
               if (m := _REPLY.match(line))]
    later = [t for t in replies if t > took_over + 0.5]
    isakmp = wan_isakmp_times(wan)
    gap = max((b - a for a, b in zip(replies, replies[1:], strict=False) if a - 2 < killed < b + 2), default=-1)
    print(f"failover {took_over - killed:.3f} s; replies {len(replies)}/{PINGS}, {len(later)} after it, longest "
          f"gap {gap:.2f} s (pings every {INTERVAL} s); ISAKMP packets on the WAN {len(isakmp)}, after the kill "
          f"{sum(t > killed for t in isakmp)}")
    assert cli.result().get("tunnel_rc") == "0", cli.result()
    assert len(later) >= 0.7 * (PINGS * INTERVAL - (took_over - min(replies))) / INTERVAL, replies
    assert isakmp and all(t < killed for t in isakmp), "an IKE exchange after the failover"
    assert any(r.get("proto") == "esp" and r.get("state") == "ESTABLISHED" for r in table), table
    assert "esp_learned" not in counters and "isakmp_sessions" not in counters, counters
    assert "Traceback" not in logs
    shutil.rmtree(run_dir, ignore_errors=True)  # passed: no evidence to keep
