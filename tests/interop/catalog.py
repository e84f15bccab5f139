"""The interop tests' scenarios: NAT-T, raw-ESP and PPTP matrices through a router.

Addresses follow SPEC.md: LAN clients 10.0.0.11.. (gateway 10.0.0.1, masqd),
masqd's public address 203.0.113.200, remote VPN gateways on the remote
segment 198.51.100.0/24 behind the ISP router (198.51.100.254). Each builder
takes the number of clients, the router kind and masqd config overrides
(e.g. ``{"ipsec": {"parallel_sessions": True}}``), so the same scenario runs
through masqd or through the kernel's masquerade (the harness reference).
Each scenario carries its checks (:mod:`.checks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from masqd.lab import FW_LAN, FW_WAN, ISP_REM

from .checks import (
    clients_ok,
    clients_result,
    forwarded_server_checks,
    masqd_counter,
    masqd_entries,
    masqd_esp_pairs,
    masqd_pptp_calls,
    natt_checks,
    pptp_checks,
    raw_esp_checks,
    wan_distinct_sources,
    wan_has,
    wan_lacks,
)
from .harness.peers import (
    libreswan_gateway,
    libreswan_initiator,
    libreswan_remote_initiator,
    libreswan_responder,
    pptp_client,
    pptp_remote_client,
    pptp_server,
    pptp_server_behind_nat,
    strongswan_initiator,
    strongswan_responder,
)
from .harness.router import merge
from .harness.scenario import RouterKind, Scenario

REMOTE_GW = ISP_REM
LAN_GW = FW_LAN
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
    ping_wait: int = 15,
) -> Scenario:
    """libreswan clients (IKEv1 or IKEv2, encapsulation=no) to one libreswan gateway; each pings
    through its tunnel until 5 replies or ``ping_wait`` seconds."""
    peers = [libreswan_responder("srv", f"{LIBRESWAN_SERVER}/24", REMOTE_GW)]
    peers += [
        libreswan_initiator(f"c{n}", lan_client_address(n), LAN_GW, LIBRESWAN_SERVER, ike, n,
                            ping_wait=ping_wait)
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


# ------------------------------------------- a VPN server on a private address (issue 8)

LAN_SERVER = "10.0.0.2"  # the VPN server behind masqd (SPEC 5)


def remote_client_address(n: int) -> str:
    """Remote-segment address of remote client number ``n`` (1-based): 198.51.100.41, .42, ...
    (clear of the lab's own hosts srv1/rem2/rem3 on .1-.3)."""
    return f"198.51.100.{40 + n}/24"


IPSEC_SERVER_RULES = (
    f"ipmasqadm portfw -a -P udp -L $WAN 500 -R {LAN_SERVER} 500\n"
    f"ipfwd --masq {LAN_SERVER} 50\n"
)
PPTP_SERVER_RULES = (
    f"ipportfw -A -t ${{4}}/1723 -R {LAN_SERVER}/1723\n"
    f"ipfwd --masq {LAN_SERVER} 47\n"
)


def ipsec_gateway_behind_masqd(
    ike: int | tuple[int, ...] = 2,
    clients: int = 2,
    lan_clients: int = 0,
    masqd_config: Mapping[str, Any] | None = None,
) -> Scenario:
    """A libreswan gateway on 10.0.0.2 behind masqd (the HOWTO's ``ipmasqadm portfw`` UDP 500
    on the WAN symbol + ``ipfwd --masq 10.0.0.2 50``), reached at 203.0.113.200 by
    ``clients`` remote libreswan initiators at once (raw ESP, @ids), while ``lan_clients``
    LAN initiators (10.0.0.11..) reach a remote libreswan gateway (198.51.100.20) through
    masqd's IPsec masquerade at the same time. ``ike`` may list versions: client ``n`` (remote
    and LAN alike) uses the ``n``-th, cycling, so one run covers IKEv1 and IKEv2."""
    versions = (ike,) if isinstance(ike, int) else tuple(ike)
    peers = [libreswan_gateway("gw", f"{LAN_SERVER}/8", LAN_GW, range(1, clients + 1))]
    if lan_clients:
        peers.append(libreswan_responder("rsrv", f"{LIBRESWAN_SERVER}/24", REMOTE_GW))
    peers += [
        libreswan_remote_initiator(f"r{n}", remote_client_address(n), REMOTE_GW, FW_WAN,
                                   versions[(n - 1) % len(versions)], n)
        for n in range(1, clients + 1)
    ]
    peers += [
        # own IDs and subnets (c3.., 10.96.3.1..): clear of the remote clients' on the gateway
        libreswan_initiator(f"c{n}", lan_client_address(n), LAN_GW, LIBRESWAN_SERVER,
                            versions[(n - 1) % len(versions)], clients + n)
        for n in range(1, lan_clients + 1)
    ]
    cfg = merge({"firewall": {"rules": IPSEC_SERVER_RULES}}, masqd_config or {})
    checks = [
        clients_ok(),
        clients_result("reverse_rc", "0", tuple(f"r{n}" for n in range(1, clients + 1))),
        *forwarded_server_checks(LAN_SERVER, (("udp", 500),), "esp", 50, clients),
        wan_has(f"src host {FW_WAN} and udp src port 500 and udp dst port 500", clients,
                "ISAKMP answers from masqd's port 500"),
        wan_lacks("udp port 4500", "NAT-T must not be used"),
    ]  # fmt: skip
    if lan_clients:
        checks += [
            masqd_esp_pairs(LIBRESWAN_SERVER, [lan_client_address(n).split("/")[0]
                                               for n in range(1, lan_clients + 1)]),
            wan_has(f"src host {FW_WAN} and dst host {LIBRESWAN_SERVER} and ip proto 50",
                    lan_clients, "LAN clients' ESP to the remote gateway"),
        ]  # fmt: skip
    name = f"ipsec-gw-behind-masqd-ikev{'+'.join(map(str, versions))}-r{clients}-l{lan_clients}"
    return Scenario(name, tuple(peers), tuple(checks), "masqd", cfg, done_timeout=90.0, mem_mb=128)


def pptp_server_behind_masqd(
    remote_clients: int = 2, lan_clients: int = 1, masqd_config: Mapping[str, Any] | None = None
) -> Scenario:
    """pptpd on 10.0.0.2 behind masqd (``ipportfw`` TCP 1723 on the WAN symbol + ``ipfwd
    --masq 10.0.0.2 47``) called by ``remote_clients`` remote pptp-linux clients, while
    ``lan_clients`` LAN clients (10.0.0.11..) call a remote pptpd (198.51.100.30), all at once."""
    peers = [
        pptp_server_behind_nat("lsrv", f"{LAN_SERVER}/8", LAN_GW),
        pptp_server("rsrv", f"{PPTP_SERVER}/24", REMOTE_GW),
    ]
    peers += [
        pptp_remote_client(f"r{n}", remote_client_address(n), REMOTE_GW, FW_WAN, f"user{n}")
        for n in range(1, remote_clients + 1)
    ]
    peers += [
        pptp_client(f"c{n}", lan_client_address(n), LAN_GW, PPTP_SERVER, f"user{remote_clients + n}")
        for n in range(1, lan_clients + 1)
    ]
    cfg = merge({"firewall": {"rules": PPTP_SERVER_RULES}}, masqd_config or {})
    checks = (
        clients_ok(),
        *forwarded_server_checks(LAN_SERVER, (("tcp", 1723),), "gre", 47, remote_clients,
                                 proto_forward_hits=False),
        masqd_counter("pptp_calls_setup", remote_clients + lan_clients),
        masqd_pptp_calls(LAN_SERVER, True, remote_clients, masqueraded_ids=False),
        *(masqd_pptp_calls(lan_client_address(n).split("/")[0], False, 1, masqueraded_ids=True)
          for n in range(1, lan_clients + 1)),
        wan_distinct_sources(f"src host {FW_WAN} and tcp dst port 1723 and dst host {PPTP_SERVER}",
                             lan_clients, "LAN clients' PPTP control to the remote pptpd"),
        wan_has(f"src host {FW_WAN} and dst host {PPTP_SERVER} and ip proto 47", lan_clients,
                "LAN clients' GRE to the remote pptpd"),
    )  # fmt: skip
    return Scenario(f"pptpd-behind-masqd-r{remote_clients}-l{lan_clients}", tuple(peers), checks,
                    "masqd", cfg, done_timeout=90.0, mem_mb=128)  # fmt: skip
