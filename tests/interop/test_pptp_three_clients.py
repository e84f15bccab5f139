"""Three real PPTP clients (pptp-linux + pppd, MS-CHAPv2 + MPPE-128) on the LAN reach one pptpd through
masqd at the same time (SPEC section 4: Call-ID masquerade, several control connections to one server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import catalog
from .harness.scenario import run_scenario

pytestmark = pytest.mark.interop


def test_pptp_three_clients_to_one_server(guest_images: dict[str, Path]) -> None:
    """Each client's tunnel comes up and pings through its own PPP link; TCP 1723 leaves from three
    distinct masqueraded ports and GRE leaves from the WAN address."""
    run = run_scenario(catalog.pptp(3))
    assert run.passed, run.report()
    state = run.masqd_state or {}
    counters = state.get("counters", {})
    assert counters.get("pptp_calls_setup") == 3, counters
    assert counters.get("pptp_second_control_connections") == 2, counters
    calls = [r for r in state.get("table", []) if r.get("proto") == "gre" and "masq_call_id" in r]
    assert len(calls) == 3 and len({r["masq_call_id"] for r in calls}) == 3, calls
    assert {r["state"] for r in calls} == {"ESTABLISHED"}, calls
