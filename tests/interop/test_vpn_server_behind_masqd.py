"""A VPN server on a private address behind masqd (issue 8, SPEC 5), with real peers.

IPsec: a libreswan gateway on 10.0.0.2 behind masqd (``ipmasqadm portfw`` UDP 500
on the WAN symbol + ``ipfwd --masq 10.0.0.2 50``), two remote libreswan
initiators connecting to 203.0.113.200 at the same time with raw ESP (IKEv2,
encapsulation=no, @ids). PPTP: pptpd on 10.0.0.2 behind masqd (``ipportfw`` TCP
1723 + ``ipfwd --masq 10.0.0.2 47``) called by two remote pptp-linux clients
while a LAN client (10.0.0.11) calls out to a remote pptpd at the same time
(the Linux 2.0 patch could do one or the other, not both). The checks read the
peers' results, the WAN capture and masqd's own table and counters.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from masqd.interop import catalog
from masqd.interop.scenario import run_scenario

pytestmark = pytest.mark.interop


def test_ipsec_gateway_behind_masqd_two_remote_clients(guest_images: dict[str, Path]) -> None:
    """Both tunnels up; pings through each tunnel from the client side and from the gateway
    side; ISAKMP answers leave from 203.0.113.200:500 and ESP from 203.0.113.200 to both
    clients; masqd's table shows the UDP 500 forward and the ESP forward with hits."""
    run = run_scenario(catalog.ipsec_gateway_behind_masqd(ike=2, clients=2))
    assert run.passed, run.report()


def test_pptpd_behind_masqd_and_lan_client_calling_out(guest_images: dict[str, Path]) -> None:
    """Three PPP links at once, each pinging through itself: two remote clients to the forwarded
    pptpd (portfw 1723 hits; the PPTP helper follows the forwarded server's calls from the
    control channel and leaves their Call IDs alone) and one LAN client to a remote pptpd
    (Call-ID masquerade); GRE leaves from 203.0.113.200 to all three far ends."""
    run = run_scenario(catalog.pptp_server_behind_masqd(remote_clients=2, lan_clients=1))
    assert run.passed, run.report()
