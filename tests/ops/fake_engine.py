"""A stand-in for masqd.engine.Engine with the contract's surface, for ops unit tests."""

from __future__ import annotations

import ipaddress
from typing import Any


class FakeEngine:
    def __init__(self, cfg: Any = None) -> None:
        self.cfg = cfg
        self.counters: dict[str, int] = {
            "rx_lan_tcp_packets": 10,
            "rx_lan_tcp_bytes": 1400,
            "tx_wan_tcp_packets": 10,
            "tx_wan_tcp_bytes": 1400,
            "rx_wan_udp_packets": 3,
            "drop_bad_checksum": 2,
            "drop_ah_not_masqueradable": 1,
            "esp_pending": 4,
            "esp_blocked": 1,
            "esp_learned": 3,
            "esp_guessed": 0,
            "pptp_calls_setup": 2,
            "wan_address_changes": 1,
            "some_new_thing": 7,
            "sessions": 3,
            "pool_used_tcp": 1,
            "pool_size": 64512,
            "frag_queue": 0,
        }
        self.entries: list[dict[str, Any]] = [
            {"proto": "tcp", "lan": "10.0.0.2:1025", "wan": "203.0.113.200:1025",
             "remote": "198.51.100.1:23", "state": "established", "expires_in": 7439.5},
            {"proto": "udp", "lan": "10.0.0.3:500", "wan": "203.0.113.200:500",
             "remote": "198.51.100.1:500", "state": "", "expires_in": 299.0},
            {"proto": "esp", "lan": "10.0.0.2", "wan": "203.0.113.200",
             "remote": "198.51.100.1", "state": "pending", "expires_in": 100.0},
        ]
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.reloaded: list[Any] = []
        self.wan_ip = int(ipaddress.IPv4Address("203.0.113.200"))
        self.lan_ip = int(ipaddress.IPv4Address("10.0.0.1"))
        self.wan_set: list[tuple[ipaddress.IPv4Interface, float]] = []

    def table(self, now: float | None = None) -> list[dict[str, Any]]:
        return [dict(e) for e in self.entries]

    def drain_events(self) -> list[tuple[str, str, dict[str, Any]]]:
        ev, self.events = self.events, []
        return ev

    def reload(self, cfg: Any) -> None:
        self.cfg = cfg
        self.reloaded.append(cfg)

    def set_wan_address(self, addr: ipaddress.IPv4Interface, now: float) -> None:
        self.wan_ip = int(addr.ip)
        self.wan_set.append((addr, now))

    def flush(self, proto: int | None = None, lan_ip: int | None = None) -> int:
        names = {6: "tcp", 17: "udp", 1: "icmp", 50: "esp"}

        def hit(e: dict[str, Any]) -> bool:
            if proto is not None and e["proto"] != names.get(proto):
                return False
            return lan_ip is None or e["lan"].split(":")[0] == str(ipaddress.IPv4Address(lan_ip))

        keep = [e for e in self.entries if not hit(e)]
        n = len(self.entries) - len(keep)
        self.entries = keep
        return n
