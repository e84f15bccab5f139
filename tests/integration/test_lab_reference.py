"""The lab's kernel reference router, beside masqd or in its place, a lab host giving its address
up to a guest, and the benchmark's TUN/TAP floor relay (what the benchmark and the interop suite
build on)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from masqd.lab import FW_LAN, FW_WAN, KFW_LAN, KFW_WAN, LAN2, SRV1, Lab, stop_process

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.floor import FLOOR_LAN, FLOOR_WAN, Floor  # noqa: E402

pytestmark = pytest.mark.integration


def _seen_by_srv1(lab: Lab) -> str:
    """The source address srv1 sees for a TCP connection from lan2 (content checked)."""
    srv = lab.tool_server("srv1", ["tcp-server", "8700"])
    try:
        rc, report = lab.tool("lan2", ["tcp-client", SRV1, "8700", "20000"])
    finally:
        stop_process(srv)
    assert rc == 0, report
    return str(report["seen_as"]).split(":")[0]


@pytest.mark.parametrize("replace_masqd", [False, True], ids=["beside-masqd", "in-masqd-place"])
def test_kernel_reference_router_masquerades(own_lab: Callable[[str, str], Lab], replace_masqd: bool) -> None:
    """Beside masqd (``{p}-kfw``, a host pointed at 10.0.0.254) the kernel masquerades to
    203.0.113.201; in masqd's place (``{p}-fw``, no masqd running) hosts keep their gateway
    10.0.0.1 and srv1 sees 203.0.113.200, with the PPTP helper in the ruleset when asked."""
    lab = own_lab("tap", "y" if replace_masqd else "x")
    ns = lab.kernel_router_up(replace_masqd=replace_masqd, pptp_helper=replace_masqd)
    if replace_masqd:
        assert ns == lab.ns("fw")
        assert _seen_by_srv1(lab) == FW_WAN
        ruleset = lab.exec("fw", ["nft", "list", "ruleset"]).stdout
        assert 'ct helper set "pptp-h"' in ruleset and "masquerade" in ruleset
    else:
        assert ns == lab.ns("kfw")
        lab.use_gateway("lan2", KFW_LAN)
        assert _seen_by_srv1(lab) == KFW_WAN
        lab.use_gateway("lan2", FW_LAN)
        assert lab.exec("lan2", ["ping", "-c", "1", "-W", "1", SRV1], check=False).returncode != 0  # no masqd


def test_a_lab_host_releases_its_address(own_lab: Callable[[str, str], Lab]) -> None:
    """lan2 gives 10.0.0.2 up (link down, no address): lan3 no longer reaches it there; an
    address no host holds changes nothing."""
    lab = own_lab("tap", "z")

    def reach_lan2() -> bool:
        return lab.exec("lan3", ["ping", "-c", "1", "-W", "1", LAN2], check=False).returncode == 0

    lab.release_address("10.0.0.77/8")
    assert reach_lan2()
    lab.release_address(f"{LAN2}/8")
    assert lab.exec("lan2", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout.strip() == ""
    assert "state DOWN" in lab.exec("lan2", ["ip", "-o", "link", "show", "dev", "eth0"]).stdout
    assert not reach_lan2()


def test_the_tun_tap_floor_relays_frames_as_they_are(own_lab: Callable[[str, str], Lab]) -> None:
    """bench/e2e.py --floor's relay (bench/floor.py, bench/tapfloor.c) on devices opened as masqd
    opens its own: a TCP transfer from lan2 reaches srv1 with lan2's own address (no NAT) and its
    bytes intact (offloads on: super-packets and partial checksums pass as read); when it stops,
    it says what it forwarded, its devices and the neighbour entries and route it added are gone."""
    lab = own_lab("tap", "w")
    fl = Floor(lab)
    fl.start()
    names = [d.handle.name for d in fl.devs]
    try:
        assert len(fl.devs[0].fds) == fl.queues == len(fl.devs[1].fds)
        lab.use_gateway("lan2", FLOOR_LAN)
        fl.napi(True)
        assert _seen_by_srv1(lab) == LAN2
        fl.napi(False)
        assert _seen_by_srv1(lab) == LAN2
    finally:
        lab.use_gateway("lan2", FW_LAN)
        done = fl.stop()
    assert done["forwarded"] >= 20, done  # two connections of 20 kB and their ACKs, both ways
    links = lab.exec("sw", ["ip", "-o", "link", "show"]).stdout
    assert not any(n in links for n in names)
    assert FLOOR_LAN not in lab.exec("lan2", ["ip", "neigh", "show"]).stdout
    assert FLOOR_WAN not in lab.exec("isp", ["ip", "neigh", "show"]).stdout
    assert LAN2 not in lab.exec("isp", ["ip", "route", "show"]).stdout
