"""A real IPsec tunnel through masqd survives a masqd restart (issue 17, part 1).

A libreswan client on the LAN (IKEv2, raw ESP: ISAKMP on UDP 500 and ESP as IP protocol 50,
so masqd's own ISAKMP cookie and ESP SPI-pair entries carry it) brings its tunnel up to a
libreswan gateway and pings through it for 25 s. Meanwhile masqd is stopped with SIGTERM
(it writes its state file) and started again (it reads it back). The tunnel keeps working
with no new IKE exchange: echo replies come back after the restart, the WAN capture holds no
ISAKMP packet at all after the restart, and the restarted masqd's counters still show the
one ISAKMP session and the one learned SPI pair (restored, not made anew).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from . import catalog
from .harness.capture import Capture
from .harness.peers import Peer, PeerSpec, libreswan_initiator, libreswan_responder
from .harness.router import MasqdRouter
from .harness.scenario import RUN_ROOT, lab_up, new_prefix

pytestmark = pytest.mark.interop

PINGS, INTERVAL = 100, 0.25
_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from ")


def pinging_client() -> PeerSpec:
    """The catalog's libreswan initiator, pinging for PINGS * INTERVAL s (timestamped replies)
    and touching /peer/up once its tunnel is up."""
    base = libreswan_initiator("c1", catalog.lan_client_address(1), catalog.LAN_GW, catalog.LIBRESWAN_SERVER, 2, 1)
    script, n = re.subn(r"; result tunnel_rc \$\?\nping -n -c \d+ -i [0-9.]+ -w \d+",
                        f"; result tunnel_rc $?\ntouch /peer/up\nping -D -n -c {PINGS} -i {INTERVAL} -w 60",
                        base.script)
    if n != 1:
        raise AssertionError("libreswan_initiator changed shape; update this test")
    return dataclasses.replace(base, script=script)


def wan_isakmp_times(pcap: Path) -> list[float]:
    res = subprocess.run(["tcpdump", "-tt", "-nr", str(pcap), "udp port 500"], capture_output=True, text=True)
    return [float(line.split()[0]) for line in res.stdout.splitlines() if line.strip()]


def test_ipsec_tunnel_survives_a_restart_without_a_new_ike_exchange(guest_images: dict[str, Path]) -> None:
    prefix = new_prefix()
    run_dir = RUN_ROOT / f"{time.strftime('%Y%m%d-%H%M%S')}-state-restart-ipsec-{prefix}"
    run_dir.mkdir(parents=True, exist_ok=True)
    lab = lab_up(prefix)
    captures: list[Capture] = []
    router = MasqdRouter(lab, run_dir)
    peers: list[Peer] = []
    try:
        wan = run_dir / "wan.pcap"
        captures.append(Capture(lab.ns("sw"), "br-wan", wan).start())
        router.start()
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
        before = router.snapshot() or {}
        router.stop()  # SIGTERM: masqd writes its state file
        restarted_at = time.time()
        router.start()
        cli.wait_done(PINGS * INTERVAL + 60)
        after = router.snapshot() or {}
        time.sleep(0.5)
    finally:
        for p in peers:
            p.stop()
        router.stop()
        for c in captures:
            c.stop()
        lab.down()
    replies = [float(m.group(1)) for line in (cli.dir / "ping.log").read_text().splitlines()
               if (m := _REPLY.match(line))]
    later = [t for t in replies if t > restarted_at + 0.5]
    isakmp = wan_isakmp_times(wan)
    print(f"replies {len(replies)}/{PINGS}, {len(later)} after the restart; ISAKMP packets on the WAN "
          f"{len(isakmp)}, after the restart {sum(t > restarted_at for t in isakmp)}")
    assert cli.result().get("tunnel_rc") == "0", cli.result()
    assert before.get("counters", {}).get("isakmp_sessions") == 1 and before["counters"].get("esp_learned") == 1
    assert len(later) >= 0.7 * (PINGS * INTERVAL - (restarted_at - min(replies))) / INTERVAL, replies
    assert isakmp and all(t < restarted_at for t in isakmp), "an IKE exchange after the restart"
    c = after.get("counters", {})
    assert c.get("state_restored_entries", 0) >= 2 and "state_file_refused" not in c, c
    assert c.get("isakmp_sessions") == 1 and c.get("esp_learned") == 1, c  # restored, none made anew
    assert any(r.get("proto") == "esp" and r.get("state") == "ESTABLISHED" for r in after.get("table", []))
    shutil.rmtree(run_dir, ignore_errors=True)  # passed: no evidence to keep
