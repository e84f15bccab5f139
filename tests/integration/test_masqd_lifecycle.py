"""masqd's process life cycle in the lab: device placement, clean shutdown, restart, crash cleanup, ARP failure."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable

import pytest

from masqd.lab import SRV1, Lab, stop_process

pytestmark = pytest.mark.integration

LabFactory = Callable[[str, str], Lab]


def links(lab: Lab, role: str) -> str:
    return lab.exec(role, ["ip", "-o", "link", "show"]).stdout


def devices(lab: Lab, role: str) -> dict[str, str]:
    """Device name -> its line of ``ip -o link`` in the role's namespace."""
    out = {}
    for line in links(lab, role).splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        out[name] = line
    return out


def test_tap_devices_placed_on_bridges_and_removed_at_exit(own_lab: LabFactory) -> None:
    lab = own_lab("tap", "p")
    p = lab.prefix
    m = lab.start_masqd()
    try:
        sw = devices(lab, "sw")
        assert "master br-lan" in sw[f"{p}-lan"] and "master br-wan" in sw[f"{p}-wan"]
        assert set(devices(lab, "fw")) == {"lo"}  # nothing is left in masqd's own namespace
        lab.exec("lan2", ["ping", "-c", "1", "-W", "2", SRV1])
    finally:
        rc = m.stop()
    assert rc == 0, m.log()
    sw = devices(lab, "sw")
    assert f"{p}-lan" not in sw and f"{p}-wan" not in sw
    state = json.loads(m.state_file.read_text())
    assert state["counters"].get("tx_wan_icmp_packets", 0) >= 1
    assert "Traceback" not in m.log()


def test_tun_restart_keeps_edges_working(own_lab: LabFactory) -> None:
    lab = own_lab("tun", "r")
    for _ in range(2):
        m = lab.start_masqd()
        try:
            out = lab.exec("lan2", ["ping", "-c", "2", "-i", "0.2", "-W", "2", SRV1]).stdout
            assert " 0% packet loss" in out
        finally:
            assert m.stop() == 0, m.log()
        # the persistent TUN devices of the edges stay, masqd only attached to them
        assert "tun-lan" in devices(lab, "lanedge")


def test_sigint_also_stops_cleanly(own_lab: LabFactory) -> None:
    lab = own_lab("tap", "i")
    m = lab.start_masqd()
    os.kill(m.pid, signal.SIGINT)
    assert m.proc.wait(10) == 0, m.log()
    assert f"{lab.prefix}-lan" not in devices(lab, "sw")


def test_down_after_a_crash_removes_everything(own_lab: LabFactory) -> None:
    lab = own_lab("tap", "k")
    m = lab.start_masqd()
    os.kill(m.pid, signal.SIGKILL)
    m.proc.wait(10)
    helper = lab.popen("lan2", ["sleep", "30"])  # a process left inside the lab
    removed = lab.down()
    assert len(removed) == len(lab.roles())
    assert helper.wait(5) is not None
    assert not lab.namespaces()
    assert not any(n.startswith(f"{lab.prefix}-") for n in os.listdir("/run/netns"))


def test_unresolvable_gateway_gives_host_unreachable(own_lab: LabFactory) -> None:
    lab = own_lab("tap", "g")
    cfg = lab.masqd_config().replace('gateway = "203.0.113.1"', 'gateway = "203.0.113.99"')
    m = lab.start_masqd(cfg)
    try:
        out = lab.exec("lan2", ["ping", "-c", "1", "-W", "6", SRV1], check=False).stdout
        counters = m.snapshot()["counters"]
    finally:
        m.stop()
    assert "Destination Host Unreachable" in out, out
    assert counters.get("arp_wan_failed", 0) >= 1
    assert counters.get("dp_icmp_host_unreachable", 0) >= 1


def test_wan_address_change_is_announced_and_used(own_lab: LabFactory) -> None:
    from masqd.ops.control import request

    lab = own_lab("tap", "w")
    m = lab.start_masqd()
    try:
        request(f"/run/masqd/{lab.prefix}.sock",
                {"cmd": "wan-address", "action": "set", "address": "203.0.113.202/24"})
        out = lab.exec("isp", ["ping", "-c", "2", "-i", "0.2", "-W", "2", "203.0.113.202"]).stdout
        assert " 0% packet loss" in out  # ARP for the new address answered, echo answered
        old = lab.exec("isp", ["ping", "-c", "1", "-W", "1", "203.0.113.200"], check=False)
        assert old.returncode != 0
        server = lab.tool_server("srv1", ["udp-echo", "5600"])
        try:
            rc, rep = lab.tool("lan2", ["udp-client", SRV1, "5600", "3"])
        finally:
            stop_process(server)
        assert rc == 0 and [p.split(":")[0] for p in rep["seen_as"]] == ["203.0.113.202"], rep
        counters = m.snapshot()["counters"]
        assert counters["arp_wan_gratuitous"] == 2  # at start and on the change
    finally:
        m.stop()


def test_wan_mtu_from_config(own_lab: LabFactory) -> None:
    lab = own_lab("tap", "m")
    cfg = lab.masqd_config().replace('gateway = "203.0.113.1"\n', 'gateway = "203.0.113.1"\nmtu = 1400\n')
    m = lab.start_masqd(cfg)
    try:
        assert "mtu 1400" in devices(lab, "sw")[f"{lab.prefix}-wan"]
        out = lab.exec("lan2", ["ping", "-M", "do", "-s", "1472", "-c", "1", "-W", "2", SRV1], check=False).stdout
        assert "From 10.0.0.1" in out and "mtu = 1400" in out, out
        server = lab.tool_server("srv1", ["tcp-server", "8081"])
        try:
            rc, rep = lab.tool("lan2", ["tcp-client", SRV1, "8081", str(1024 * 1024)], timeout=20)
        finally:
            stop_process(server)
        assert rc == 0 and rep["ok"], rep
    finally:
        m.stop()
