"""masqd's WAN address changes under load, with real peers (issue 8, last check).

A strongSwan client on the LAN has a NAT-T tunnel up to a remote strongSwan gateway
and pings through it; lan2 streams TCP to srv1; masqd (dynaddr_mode = "flush", TAP
mode) moves from 203.0.113.200 to 203.0.113.201. See harness/dynaddr.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .checks import dynaddr_checks
from .harness.dynaddr import NEW_WAN_IP, run_dynaddr

pytestmark = pytest.mark.interop


def test_address_change_under_tcp_and_tunnel_load(guest_images: dict[str, Path]) -> None:
    """A new TCP connection from the LAN completes within 1 s of the change and srv1 sees it
    from the new address; the old stream's sender gets ECONNRESET (RST in the LAN capture);
    the tunnel carries pings again by itself within a bounded gap."""
    run = run_dynaddr((dynaddr_checks(max_tunnel_gap=15.0),))
    print(run.report())
    assert run.passed, run.report()
    assert run.probe["seen"].startswith(NEW_WAN_IP + ":")
    assert run.stream["end"] == "reset"
    assert run.tunnel["replies_after_change"] > 0
    assert run.tunnel["recovery"] in ("nat-mapping-update", "re-established")
