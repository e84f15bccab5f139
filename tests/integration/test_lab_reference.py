"""The lab's kernel reference router, beside masqd or in its place, and a lab host giving its
address up to a guest (what the benchmark and the interop suite build on)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from masqd.lab import FW_LAN, FW_WAN, KFW_LAN, KFW_WAN, LAN2, SRV1, Lab, stop_process

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
