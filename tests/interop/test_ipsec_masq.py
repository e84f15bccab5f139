"""Real IPsec clients on the LAN reach a real gateway on the remote segment through masqd."""

from __future__ import annotations

from pathlib import Path

import pytest

from masqd.interop import catalog
from masqd.interop.scenario import run_scenario

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("clients", [1, 2])
def test_strongswan_ikev2_natt_through_masqd(guest_images: dict[str, Path], clients: int) -> None:
    """NAT-T (IKE on 500 then 4500, ESP in UDP) needs only UDP masquerade: one and
    two LAN clients at once to the same gateway, masqd's address on the WAN."""
    run = run_scenario(catalog.strongswan_natt(clients))
    assert run.passed, run.report()


@pytest.mark.xfail(strict=False, reason="IPsec masquerade (issue 6) not landed")
@pytest.mark.parametrize("ike", [1, 2])
def test_libreswan_raw_esp_through_masqd(guest_images: dict[str, Path], ike: int) -> None:
    """libreswan with encapsulation=no: ISAKMP 500<->500 and raw ESP through masqd."""
    run = run_scenario(catalog.libreswan_raw_esp(ike, 1))
    assert run.passed, run.report()
