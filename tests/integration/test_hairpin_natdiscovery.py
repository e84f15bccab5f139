"""An RFC 5780 client on the LAN finds hairpinning with masqd's defaults (issue 18).

coturn's ``turnserver`` runs as a STUN server in the lab's remote network with two
addresses (198.51.100.1 and .4: RFC 5780's OTHER-ADDRESS), and
``turnutils_natdiscovery`` runs on a LAN host against it. Its hairpinning test sends
a binding request from a second socket to the first socket's mapped address (the
WAN address and port): with hairpinning it arrives at the first socket ("Received a
request"), without it the first socket times out. The defaults are used
(``inbound_filtering = "address-dependent"``), where it used to fail; the mapping
and filtering tests report what the defaults promise.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from masqd.lab import SRV1, stop_process

if TYPE_CHECKING:
    from conftest import Routed

pytestmark = pytest.mark.integration

ALT = "198.51.100.4"


@pytest.fixture
def stun(routed: Routed) -> Iterator[None]:
    lab = routed.lab
    lab.exec("srv1", ["ip", "addr", "add", f"{ALT}/24", "dev", "eth0"])
    proc = lab.popen("srv1", ["turnserver", "-n", "--stun-only", "--listening-ip", SRV1, "--listening-ip", ALT,
                              "--no-cli", "--no-tls", "--no-dtls", "--log-file", "stdout", "--simple-log"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # listening on both addresses, both ports (3478, 3479)?
            out = lab.exec("srv1", ["ss", "-lun"]).stdout
            if all(f"{a}:{p}" in out for a in (SRV1, ALT) for p in (3478, 3479)):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"turnserver did not listen: {out}")
        yield
    finally:
        stop_process(proc)
        lab.exec("srv1", ["ip", "addr", "del", f"{ALT}/24", "dev", "eth0"], check=False)


def test_rfc5780_client_finds_hairpinning_with_the_defaults(routed: Routed, stun: None) -> None:
    lab = routed.lab
    before = routed.masqd.snapshot()["counters"].get("hairpinned", 0)
    cp = lab.exec("lan2", ["turnutils_natdiscovery", "-H", SRV1], timeout=60)
    out = cp.stdout
    assert "Hairpinning Behavior Discovery" in out, out
    assert "Received a request (maybe a successful hairpinning)" in out, out
    assert "STUN receive timeout" not in out, out
    counters = routed.masqd.snapshot()["counters"]
    assert counters.get("hairpinned", 0) > before
    assert "drop_hairpin_no_mapping" not in counters
    cp = lab.exec("lan2", ["turnutils_natdiscovery", "-m", "-f", SRV1], timeout=60)
    assert "NAT with Endpoint Independent Mapping!" in cp.stdout, cp.stdout
    assert "NAT with Address Dependent Filtering!" in cp.stdout, cp.stdout
