"""The masquerade table: mappings (endpoint-independent), sessions, and the port pool.

A *mapping* binds a LAN endpoint (protocol, address, port or ICMP identifier)
to a WAN port; it lives while it has sessions (RFC 4787 REQ-1, REQ-5). A
*session* is one conversation through a mapping with one remote endpoint; it
carries the two lookup keys (the packet's own address/port bytes, so the fast
path looks it up with one slice of the packet), the precomputed checksum
deltas for each direction, its timer and its TCP state.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from masqd.wire.checksum import addr_delta, word_delta

# TCP states (as small ints)
T_NEW, T_SYN_SENT, T_SYN_RECV, T_ESTABLISHED, T_FIN, T_CLOSED, T_RST = range(7)
TCP_STATE_NAMES = ("NEW", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSED", "RST")
# UDP / ICMP states
S_UNREPLIED, S_REPLIED = 0, 1

TTL_DELTA = 0xFEFF  # checksum delta of decrementing the TTL byte by one


class Mapping:
    """LAN endpoint -> WAN port (endpoint-independent)."""

    __slots__ = ("proto", "lan_ip", "lan_port", "lan_ip_b", "wan_ip", "wan_ip_b", "wan_port", "sess", "static", "fwd")

    def __init__(self, proto: int, lan_ip: int, lan_port: int, wan_ip: int, wan_port: int) -> None:
        self.proto = proto
        self.lan_ip = lan_ip
        self.lan_port = lan_port
        self.lan_ip_b = lan_ip.to_bytes(4, "big")
        self.wan_ip = wan_ip
        self.wan_ip_b = wan_ip.to_bytes(4, "big")
        self.wan_port = wan_port
        self.sess: Any = None  # None, one Session, or dict[Session, None]
        self.static = False  # a port forward's mapping: never freed by expiry
        self.fwd: Any = None  # the PortForward that created it, if any

    def add(self, s: Session) -> None:
        x = self.sess
        if x is None:
            self.sess = s
        elif type(x) is dict:
            x[s] = None
        else:
            self.sess = {x: None, s: None}

    def remove(self, s: Session) -> None:
        x = self.sess
        if x is s:
            self.sess = None
        elif type(x) is dict:
            x.pop(s, None)
            if len(x) == 1:
                self.sess = next(iter(x))
            elif not x:
                self.sess = None

    def sessions(self) -> Iterator[Session]:
        x = self.sess
        if x is None:
            return iter(())
        if type(x) is dict:
            return iter(list(x))
        return iter((x,))

    def empty(self) -> bool:
        return self.sess is None


class Session:
    __slots__ = ("m", "rem_ip", "rem_port", "out_key", "in_key", "dip_out", "dl4_out", "dip_in", "dl4_in",
                 "expires", "tmo", "state", "helper", "hdata", "fw", "dead", "inbound")

    def __init__(self, m: Mapping, rem_ip: int, rem_port: int, now: float, tmo: float) -> None:
        self.m = m
        self.rem_ip = rem_ip
        self.rem_port = rem_port
        self.expires = now + tmo
        self.tmo = tmo
        self.state = 0
        self.helper: Any = None
        self.hdata: Any = None
        self.fw: Any = None
        self.dead = False
        self.inbound = False  # created by an inbound packet (port forward)
        self.rekey()

    def rekey(self) -> None:
        """(Re)compute lookup keys and checksum deltas from the mapping's current addresses."""
        m = self.m
        rb = self.rem_ip.to_bytes(4, "big")
        pr = self.rem_port.to_bytes(2, "big")
        self.out_key = m.lan_ip_b + rb + m.lan_port.to_bytes(2, "big") + pr
        self.in_key = rb + m.wan_ip_b + pr + m.wan_port.to_bytes(2, "big")
        da = addr_delta(m.lan_ip, m.wan_ip)
        dp = word_delta(m.lan_port, m.wan_port)
        self.dip_out = da + TTL_DELTA
        self.dl4_out = da + dp
        da_r = addr_delta(m.wan_ip, m.lan_ip)
        dp_r = word_delta(m.wan_port, m.lan_port)
        self.dip_in = da_r + TTL_DELTA
        self.dl4_in = da_r + dp_r


class PortPool:
    """WAN ports (or ICMP identifiers) per protocol; never hands out a port in use."""

    def __init__(self, low: int, high: int, preserve: bool, rng: random.Random | None = None) -> None:
        self.low = low
        self.high = high
        self.size = high - low + 1
        self.preserve = preserve
        self.used: dict[int, dict[int, Any]] = {}  # proto -> port -> owner
        self.in_pool: dict[int, int] = {}  # proto -> ports in use inside [low, high]
        self._rng = rng or random.Random(0x6D61)

    def owner(self, proto: int, port: int) -> Any:
        return self.used.get(proto, {}).get(port)

    def take(self, proto: int, port: int, owner: Any) -> None:
        used = self.used.setdefault(proto, {})
        used[port] = owner
        if self.low <= port <= self.high:
            self.in_pool[proto] = self.in_pool.get(proto, 0) + 1

    def release(self, proto: int, port: int, owner: Any) -> None:
        used = self.used.get(proto)
        if used is not None and used.get(port) is owner:
            del used[port]
            if self.low <= port <= self.high:
                self.in_pool[proto] -= 1

    def allocate(self, proto: int, wanted: int, owner: Any) -> int | None:
        """A free port: ``wanted`` when free and preservation is on, else one from the pool."""
        used = self.used.setdefault(proto, {})
        if self.preserve and wanted not in used and wanted != 0:
            self.take(proto, wanted, owner)
            return wanted
        if self.in_pool.get(proto, 0) >= self.size:
            return None
        rng = self._rng
        low, size = self.low, self.size
        for _ in range(32):
            p = low + rng.randrange(size)
            if p not in used:
                self.take(proto, p, owner)
                return p
        start = rng.randrange(size)
        for i in range(size):
            p = low + (start + i) % size
            if p not in used:
                self.take(proto, p, owner)
                return p
        return None

    def use(self, proto: int) -> int:
        return self.in_pool.get(proto, 0)
