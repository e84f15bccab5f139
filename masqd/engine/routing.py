"""Routing for two interfaces: which side a destination is on, the next hop, martian sources.

The LAN side holds its directly connected network and the configured LAN routes
(``[lan] routes``, each with an optional gateway); everything else is on the WAN
side, behind ``[wan] gateway`` unless it is in the WAN network itself.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from masqd.config import Config

LAN, WAN = "lan", "wan"


def _net(n: ipaddress.IPv4Network) -> tuple[int, int]:
    return int(n.network_address), int(n.netmask)


class Routes:
    """The routing table of the two sides; ``wan_ip``/``wan_net`` follow the dynamic WAN address."""

    def __init__(self, cfg: Config, wan: ipaddress.IPv4Interface) -> None:
        self.configure(cfg)
        self.set_wan(wan)

    def configure(self, cfg: Config) -> None:
        self.lan_ip = int(cfg.lan.address.ip)
        self.lan_net = _net(cfg.lan.address.network)
        self.lan_routes = [(_net(r.prefix), int(r.via) if r.via else 0) for r in cfg.lan.routes]
        self.wan_gw = int(cfg.wan.gateway) if cfg.wan.gateway else 0

    def set_wan(self, wan: ipaddress.IPv4Interface) -> None:
        self.wan_ip = int(wan.ip)
        self.wan_net = _net(wan.network)

    def route(self, dst: int) -> str:
        """The interface a packet to ``dst`` leaves on."""
        net, mask = self.lan_net
        if dst & mask == net:
            return LAN
        for (n, m), _via in self.lan_routes:
            if dst & m == n:
                return LAN
        return WAN

    def next_hop(self, iface: str, dst: int) -> int:
        """The IPv4 address to resolve on ``iface`` to reach ``dst`` (TAP mode)."""
        if iface == LAN:
            net, mask = self.lan_net
            if dst & mask == net:
                return dst
            for (n, m), via in self.lan_routes:
                if dst & m == n:
                    return via or dst
            return dst
        net, mask = self.wan_net
        if dst & mask == net or not self.wan_gw:
            return dst
        return self.wan_gw

    def martian(self, iface: str, src: int) -> bool:
        """A source address that cannot come from ``iface``."""
        if src == 0 or src >> 24 in (0, 127) or src >= 0xE0000000:
            return True
        if iface == WAN:
            net, mask = self.lan_net
            return src & mask == net or src == self.wan_ip
        return src == self.lan_ip
