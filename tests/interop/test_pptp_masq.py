"""A real PPTP client (pptp-linux + pppd) on the LAN reaches a real pptpd through masqd."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import catalog
from .harness.scenario import run_scenario

pytestmark = pytest.mark.interop


def test_pptp_one_client_through_masqd(guest_images: dict[str, Path]) -> None:
    """TCP 1723 + GRE with MS-CHAPv2 and MPPE-128 through masqd."""
    run = run_scenario(catalog.pptp(1))
    assert run.passed, run.report()
