"""Real strongSwan clients on the LAN reach a real gateway on the remote segment through
masqd with NAT-T. Raw ESP (libreswan, IKEv1/IKEv2) is covered by test_ipsec_raw_esp.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import catalog
from .harness.scenario import run_scenario

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("clients", [1, 2])
def test_strongswan_ikev2_natt_through_masqd(guest_images: dict[str, Path], clients: int) -> None:
    """NAT-T (IKE on 500 then 4500, ESP in UDP) needs only UDP masquerade: one and
    two LAN clients at once to the same gateway, masqd's address on the WAN."""
    run = run_scenario(catalog.strongswan_natt(clients))
    assert run.passed, run.report()

