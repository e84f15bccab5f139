"""Ready-made interop scenarios: NAT-T, raw-ESP and PPTP matrices through a router.

Addresses follow SPEC.md: LAN clients 10.0.0.11.. (gateway 10.0.0.1, masqd),
masqd's public address 203.0.113.200, remote VPN gateways on the remote
segment 198.51.100.0/24 behind the ISP router (198.51.100.254). Each builder
takes the number of clients, the router kind and masqd config overrides
(e.g. ``{"ipsec": {"parallel_sessions": True}}``), so the same scenario runs
through masqd or through the kernel's masquerade (the harness reference).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from masqd.interop.peers import (
    libreswan_initiator,
    libreswan_responder,
    pptp_client,
    pptp_server,
    strongswan_initiator,
    strongswan_responder,
)
from masqd.interop.scenario import (
    RouterKind,
    Scenario,
    masqd_entries,
    natt_checks,
    pptp_checks,
    raw_esp_checks,
)

REMOTE_GW = "198.51.100.254"
LAN_GW = "10.0.0.1"
STRONGSWAN_SERVER = "198.51.100.10"
LIBRESWAN_SERVER = "198.51.100.20"
PPTP_SERVER = "198.51.100.30"


def lan_client_address(n: int) -> str:
    """LAN address of client number ``n`` (1-based): 10.0.0.11, .12, ..."""
    return f"10.0.0.{10 + n}/8"


def strongswan_natt(
    clients: int = 1, router: RouterKind = "masqd", masqd_config: Mapping[str, Any] | None = None
) -> Scenario:
    """strongSwan IKEv2 clients behind the router to one strongSwan gateway (NAT-T)."""
    peers = [strongswan_responder("srv", f"{STRONGSWAN_SERVER}/24", REMOTE_GW)]
    peers += [
        strongswan_initiator(f"c{n}", lan_client_address(n), LAN_GW, STRONGSWAN_SERVER, 2, n)
        for n in range(1, clients + 1)
    ]
    checks = natt_checks(clients)
    if router == "masqd":
        checks += (masqd_entries("udp", 4500, clients),)
    return Scenario(
        f"strongswan-natt-x{clients}", tuple(peers), checks, router, dict(masqd_config or {})
    )


def libreswan_raw_esp(
    ike: int,
    clients: int = 1,
    router: RouterKind = "masqd",
    masqd_config: Mapping[str, Any] | None = None,
) -> Scenario:
    """libreswan clients (IKEv1 or IKEv2, encapsulation=no) to one libreswan gateway."""
    peers = [libreswan_responder("srv", f"{LIBRESWAN_SERVER}/24", REMOTE_GW)]
    peers += [
        libreswan_initiator(f"c{n}", lan_client_address(n), LAN_GW, LIBRESWAN_SERVER, ike, n)
        for n in range(1, clients + 1)
    ]
    return Scenario(
        f"libreswan-ikev{ike}-rawesp-x{clients}",
        tuple(peers),
        raw_esp_checks(clients),
        router,
        dict(masqd_config or {}),
    )


def pptp(
    clients: int = 1, router: RouterKind = "masqd", masqd_config: Mapping[str, Any] | None = None
) -> Scenario:
    """pptp-linux clients behind the router to one pptpd (MS-CHAPv2 + MPPE-128)."""
    peers = [pptp_server("srv", f"{PPTP_SERVER}/24", REMOTE_GW)]
    peers += [
        pptp_client(f"c{n}", lan_client_address(n), LAN_GW, PPTP_SERVER, f"user{n}")
        for n in range(1, clients + 1)
    ]
    return Scenario(
        f"pptp-x{clients}", tuple(peers), pptp_checks(clients), router, dict(masqd_config or {})
    )
