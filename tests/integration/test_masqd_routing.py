"""The real masqd process routing real traffic between network namespaces, TAP and TUN mode.

Each module-scoped lab (see ``routed`` in tests/conftest.py) is built once
per mode; every test drives real tools (ping, traceroute, TCP and UDP
sockets) from the lab hosts and checks what arrives, byte for byte.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from masqd.lab import FW_LAN, FW_WAN, ISP_WAN, LAN2, LAN3, SRV1, stop_process

if TYPE_CHECKING:
    from conftest import Routed

pytestmark = pytest.mark.integration


def test_masqd_answers_ping_on_its_addresses(routed: Routed) -> None:
    lab = routed.lab
    out = lab.exec("lan2", ["ping", "-c", "2", "-i", "0.2", "-W", "2", FW_LAN]).stdout
    assert f"from {FW_LAN}" in out and " 0% packet loss" in out
    out = lab.exec("isp", ["ping", "-c", "2", "-i", "0.2", "-W", "2", FW_WAN]).stdout
    assert f"from {FW_WAN}" in out and " 0% packet loss" in out


def test_ping_lan_to_remote(routed: Routed) -> None:
    out = routed.lab.exec("lan2", ["ping", "-c", "3", "-i", "0.2", "-W", "2", SRV1]).stdout
    assert " 0% packet loss" in out
    # 64 at srv1, -1 at masqd, -1 at the isp (the TUN edges do not count)
    assert "ttl=62" in out


def test_traceroute_shows_masqd_then_isp(routed: Routed) -> None:
    out = routed.lab.exec("lan2", ["traceroute", "-n", "-q", "1", "-w", "2", "-m", "6", SRV1],
                          timeout=60).stdout
    hops = re.findall(r"^\s*(\d+)\s+(\S+)", out, re.M)
    assert [h[1] for h in hops] == [FW_LAN, ISP_WAN, SRV1], out


def test_tcp_transfer_content_and_source(routed: Routed) -> None:
    lab = routed.lab
    server = lab.tool_server("srv1", ["tcp-server", "8080"])
    try:
        rc, rep = lab.tool("lan2", ["tcp-client", SRV1, "8080", str(3 * 1024 * 1024)], timeout=30)
    finally:
        stop_process(server)
    assert rc == 0 and rep["ok"], rep
    assert rep["seen_as"].split(":")[0] == FW_WAN  # masqueraded


def test_udp_exchange_content_and_source(routed: Routed) -> None:
    lab = routed.lab
    server = lab.tool_server("srv1", ["udp-echo", "5353"])
    try:
        rc, rep = lab.tool("lan3", ["udp-client", SRV1, "5353", "50"])
    finally:
        stop_process(server)
    assert rc == 0 and rep["ok"], rep
    assert [p.split(":")[0] for p in rep["seen_as"]] == [FW_WAN]


def test_same_source_port_from_two_lan_hosts_gets_two_mappings(routed: Routed) -> None:
    lab = routed.lab
    server = lab.tool_server("srv1", ["udp-echo", "5400"])
    try:
        rc2, rep2 = lab.tool("lan2", ["udp-client", SRV1, "5400", "3", "--sport", "40000"])
        rc3, rep3 = lab.tool("lan3", ["udp-client", SRV1, "5400", "3", "--sport", "40000"])
    finally:
        stop_process(server)
    assert rc2 == 0 and rc3 == 0, (rep2, rep3)
    (seen2,), (seen3,) = rep2["seen_as"], rep3["seen_as"]
    assert seen2.split(":")[0] == seen3.split(":")[0] == FW_WAN
    assert seen2 != seen3  # distinct WAN ports
    table = routed.masqd.snapshot()["table"]
    rows = [r for r in table if r["proto"] == "udp" and r["remote"] == f"{SRV1}:5400"]
    assert {r["lan"] for r in rows} == {f"{LAN2}:40000", f"{LAN3}:40000"}
    assert {r["wan"] for r in rows} == {seen2, seen3}


def test_unsolicited_inbound_to_wan_address_is_dropped(routed: Routed) -> None:
    lab = routed.lab
    listener = lab.tool_server("lan2", ["udp-listen", "6000"], timeout=3)
    try:
        # to the WAN address: no mapping exists for port 6000
        lab.exec("srv1", ["python3", "-c",
                          "import socket;s=socket.socket(2,2)\n"
                          f"for i in range(5): s.sendto(b'knock', ('{FW_WAN}', 6000))"])
        # straight at the private address: the isp has no route, nothing reaches the LAN either
        lab.exec("isp", ["python3", "-c",
                         "import socket;s=socket.socket(2,2)\n"
                         f"for i in range(5):\n try: s.sendto(b'knock', ('{LAN2}', 6000))\n"
                         " except OSError: pass"])
        out, _ = listener.communicate(timeout=10)
    finally:
        stop_process(listener)
    assert '"received": 0' in out
    rc, rep = lab.tool("srv1", ["tcp-client", FW_WAN, "6001", "10"], timeout=3)
    assert rc != 0 and not rep["ok"]


def test_icmp_port_unreachable_reaches_lan_host(routed: Routed) -> None:
    rc, rep = routed.lab.tool("lan2", ["udp-refused", SRV1, "9"], timeout=5)
    assert rc == 0 and rep["refused"], rep


def test_fragmentation_needed_reaches_lan_host(routed: Routed) -> None:
    lab = routed.lab
    lab.exec("isp", ["ip", "link", "set", "eth1", "mtu", "1400"])
    try:
        lab.exec("lan2", ["ip", "route", "flush", "cache"])
        out = lab.exec("lan2", ["ping", "-M", "do", "-s", "1472", "-c", "2", "-i", "0.3", "-W", "2", SRV1],
                       check=False).stdout
        assert "Frag needed" in out and "mtu = 1400" in out, out
        route = lab.exec("lan2", ["ip", "route", "get", SRV1]).stdout
        assert "mtu 1400" in route, route
        # and a payload that fits the learned path MTU goes through
        out = lab.exec("lan2", ["ping", "-M", "do", "-s", "1372", "-c", "1", "-W", "2", SRV1]).stdout
        assert " 0% packet loss" in out
    finally:
        lab.exec("isp", ["ip", "link", "set", "eth1", "mtu", "1500"])
        lab.exec("lan2", ["ip", "route", "flush", "cache"])


def test_non_ipv4_is_dropped_and_counted(routed: Routed) -> None:
    if routed.mode == "tap":
        # an Ethernet frame that is neither IPv4 nor ARP, broadcast on the LAN segment
        routed.lab.exec("lan2", ["python3", "-c",
                                 "import socket;s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n"
                                 "s.bind(('eth0',0))\n"
                                 "s.send(b'\\xff'*6+b'\\x02\\x00\\x00\\x00\\x00\\x09'+b'\\x88\\xb5'+b'x'*46)"])
    else:
        # an IPv6 header sent into the TUN device from its kernel side (the edge namespace)
        routed.lab.exec("lanedge", ["python3", "-c",
                                    "import socket;s=socket.socket(socket.AF_PACKET,socket.SOCK_DGRAM)\n"
                                    "s.bind(('tun-lan',0x86dd))\n"
                                    "s.send(b'\\x60'+b'\\x00'*39)"])
    counters = routed.masqd.snapshot()["counters"]
    assert counters.get("drop_non_ipv4", 0) >= 1, counters
