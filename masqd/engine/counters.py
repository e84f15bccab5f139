"""What the engine counts and records: named counters, per-interface packet counters, events.

Everything here is a plain int or a plain tuple, so the packet path only adds to
list slots and dict values (no locks, no metric objects); ``masqd.ops`` turns
them into metrics and log lines at scrape or drain time.

Packet and byte counters are kept per (interface, protocol) in four lists
(``rx_pkts``, ``rx_bytes``, ``tx_pkts``, ``tx_bytes``) indexed by a *slot*:
``slot(iface, proto)``, or the named constants below (``LAN_TCP`` ... ``WAN_OTHER``)
where the path knows them statically. ``named()`` gives them their public names
(``rx_lan_udp_packets``, ...).
"""

from __future__ import annotations

from collections import deque
from typing import Any

IFACES = ("lan", "wan")
PROTO_NAMES = ("tcp", "udp", "icmp", "gre", "esp", "other")
_PROTO_INDEX = {6: 0, 17: 1, 1: 2, 47: 3, 50: 4}
NPROTO = len(PROTO_NAMES)

# slots: interface * NPROTO + protocol index
LAN_TCP, LAN_UDP, LAN_ICMP, LAN_GRE, LAN_ESP, LAN_OTHER = range(NPROTO)
WAN_TCP, WAN_UDP, WAN_ICMP, WAN_GRE, WAN_ESP, WAN_OTHER = range(NPROTO, 2 * NPROTO)
WAN_BASE = NPROTO  # add to a LAN slot to get the WAN slot of the same protocol

EVENTS_MAX = 4096


def proto_index(proto: int) -> int:
    """The counter column of an IP protocol (TCP, UDP, ICMP, GRE, ESP, or "other")."""
    return _PROTO_INDEX.get(proto, NPROTO - 1)


def slot(iface: str, proto: int) -> int:
    """The counter slot of packets of ``proto`` on ``iface`` ("lan" or "wan")."""
    return (WAN_BASE if iface == "wan" else 0) + _PROTO_INDEX.get(proto, NPROTO - 1)


class Counters:
    """Named counters (``c``), packet/byte counters by slot, and a bounded queue of events."""

    __slots__ = ("c", "rx_pkts", "rx_bytes", "tx_pkts", "tx_bytes", "_events")

    def __init__(self) -> None:
        self.c: dict[str, int] = {}
        self.rx_pkts = [0] * (2 * NPROTO)
        self.rx_bytes = [0] * (2 * NPROTO)
        self.tx_pkts = [0] * (2 * NPROTO)
        self.tx_bytes = [0] * (2 * NPROTO)
        self._events: deque[tuple[str, str, dict[str, Any]]] = deque(maxlen=EVENTS_MAX)

    def count(self, name: str, n: int = 1) -> None:
        c = self.c
        c[name] = c.get(name, 0) + n

    def drop(self, reason: str) -> None:
        """A packet was dropped; counted as ``drop_<reason>``."""
        k = "drop_" + reason
        c = self.c
        c[k] = c.get(k, 0) + 1

    def gauge(self, name: str, value: int) -> None:
        """A value that is set, not added to (e.g. Call IDs in use)."""
        self.c[name] = value

    def event(self, level: str, name: str, **kw: Any) -> None:
        """Record a state change for the log (``masqd.ops`` drains them); the oldest are
        dropped, and counted as ``events_lost``, when nobody drains for a long time."""
        ev = self._events
        if len(ev) == ev.maxlen:
            self.count("events_lost")
        ev.append((level, name, kw))

    def drain_events(self) -> list[tuple[str, str, dict[str, Any]]]:
        ev = list(self._events)
        self._events.clear()
        return ev

    def received(self, s: int, n: int) -> None:
        self.rx_pkts[s] += 1
        self.rx_bytes[s] += n

    def sent(self, s: int, n: int) -> None:
        self.tx_pkts[s] += 1
        self.tx_bytes[s] += n

    def forwarded(self, rx: int, tx: int, pkts: int, nbytes: int) -> None:
        """``pkts`` packets (``nbytes`` in all) received in slot ``rx`` and sent in slot ``tx``."""
        self.rx_pkts[rx] += pkts
        self.rx_bytes[rx] += nbytes
        self.tx_pkts[tx] += pkts
        self.tx_bytes[tx] += nbytes

    def named(self) -> dict[str, int]:
        """Every counter under its public name (packet counters only where not zero)."""
        out = dict(self.c)
        for i, ifn in enumerate(IFACES):
            for j, pn in enumerate(PROTO_NAMES):
                k = i * NPROTO + j
                if self.rx_pkts[k]:
                    out[f"rx_{ifn}_{pn}_packets"] = self.rx_pkts[k]
                    out[f"rx_{ifn}_{pn}_bytes"] = self.rx_bytes[k]
                if self.tx_pkts[k]:
                    out[f"tx_{ifn}_{pn}_packets"] = self.tx_pkts[k]
                    out[f"tx_{ifn}_{pn}_bytes"] = self.tx_bytes[k]
        return out
