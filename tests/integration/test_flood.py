"""One LAN host floods masqd with new flows; another host's TCP transfer and pings go on.

The lab (TAP mode), the real masqd with its default configuration. For 6 s lan2
sends UDP from random source ports to random addresses of 198.18.0.0/15 at
50 000 packets/s (bench/labkit.py's flood: every packet a new flow, bounded in
count and time; far over the default mapping rate of 1 000 a second, and more
than masqd's Python path could refuse one by one, about 20 000 a second), while
lan3 pings srv1 every 50 ms and sends srv1 4 MiB over TCP. lan2 is held to its
mapping rate and, once over it, its flow-opening packets beyond twice that rate
are dropped by the flow cache's reader thread where they are read
(``drop_host_slowpath_limit``), so masqd reads nearly the whole flood and lan3
keeps its service: its transfer arrives whole (sha256 checked by srv1) and its
pings are answered (bench/flood.py measures the same at the sender's full rate:
about 0.4 % of lan3's pings lost, against 37 % before the flow cache dropped
the flood's misses itself). masqd must still answer on its control socket.
bench/flood.py is the measuring version of this scenario.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from masqd.lab import LAN2, SRV1, Lab, stop_process
from masqd.ops.control import request

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import labkit  # noqa: E402

pytestmark = pytest.mark.integration

FLOOD_SECONDS = 6.0
FLOOD_RATE = 50_000
FLOOD_COUNT = 2_000_000  # more than FLOOD_SECONDS at FLOOD_RATE: the time bound ends it
TRANSFER = 4 * 1024 * 1024


def test_a_flooding_host_leaves_room_for_another_hosts_tcp_and_pings(own_lab: Callable[[str, str], Lab]) -> None:
    lab = own_lab("tap", "f")
    m = lab.start_masqd()
    sock = f"/run/masqd/{lab.prefix}.sock"
    srv = lab.tool_server("srv1", ["tcp-server", "5001"], timeout=40)
    ping = None
    try:
        lab.exec("lan3", ["ping", "-c", "2", "-i", "0.2", "-W", "2", SRV1])
        before = request(sock, {"cmd": "stats"})["counters"]
        ping = lab.popen("lan3", ["ping", "-n", "-i", "0.05", "-W", "1", "-w", str(int(FLOOD_SECONDS)), SRV1],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        flood = labkit.start(lab, "lan2", labkit.FLOOD, LAN2, FLOOD_COUNT, FLOOD_SECONDS, FLOOD_RATE)
        time.sleep(0.5)  # the flood is on
        rc, transfer = lab.tool("lan3", ["tcp-client", SRV1, "5001", str(TRANSFER)], timeout=40)
        sent = labkit.result(flood, FLOOD_SECONDS + 30)
        pout, _ = ping.communicate(timeout=FLOOD_SECONDS + 10)
        pings = labkit.ping_summary(pout)
        st = request(sock, {"cmd": "stats"})
    finally:
        if ping is not None:
            stop_process(ping)
        stop_process(srv)
    after = st["counters"]

    def delta(k: str) -> int:
        return int(after.get(k, 0)) - int(before.get(k, 0))

    policed = delta("drop_host_slowpath_limit")
    read = delta("rx_lan_udp_packets") + policed  # through the engine, or dropped before it
    print(f"flood {sent}, masqd read {read} ({policed} dropped before the engine); lan3 transfer {transfer}, "
          f"pings {pings}")  # shown with -s
    # the flood ran for the whole window, at a rate that is a flood, and masqd read nearly all of it
    assert sent.get("seconds", 0) >= FLOOD_SECONDS * 0.9 and sent["sent"] >= FLOOD_SECONDS * FLOOD_RATE * 0.5, sent
    assert read >= 0.8 * sent["sent"], (read, sent)
    # lan2 was held to its mapping rate, and most of its flood never reached the engine
    assert delta("drop_host_rate_limit") > 0 and policed >= 0.5 * sent["sent"], (policed, sent)
    # lan3: the transfer arrived whole, and pings were answered meanwhile
    assert rc == 0 and transfer["ok"] and transfer["bytes"] == TRANSFER, transfer
    assert pings["sent"] >= 60 and pings["loss_pct"] < 15.0, (pings, pout[-300:])
    assert m.proc.poll() is None and st["entries"] > 0
    top = st["host_limits"]["top_offenders"]
    assert top[0]["host"] == LAN2 and top[0]["reasons"].get("host_slowpath_limit"), top
