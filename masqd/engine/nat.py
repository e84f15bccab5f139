"""The masquerade table's entries: mappings (endpoint-independent), sessions, the port pool,
and the rewrite a session does to its packets.

A *mapping* binds a LAN endpoint (protocol, address, port or ICMP identifier)
to a WAN port; it lives while it has sessions (RFC 4787 REQ-1, REQ-5). A
*session* is one conversation through a mapping with one remote endpoint; it
carries the two lookup keys (the packet's own address/port bytes, so the fast
path looks it up with one slice of the packet), the precomputed checksum
deltas for each direction, its timer and its TCP state. The table that holds
them is :class:`masqd.engine.table.NatTable`.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from typing import Any

from masqd.wire.checksum import addr_delta, apply_delta, apply_delta_udp, word_delta

# TCP states (as small ints)
T_NEW, T_SYN_SENT, T_SYN_RECV, T_ESTABLISHED, T_FIN, T_CLOSED, T_RST = range(7)
TCP_STATE_NAMES = ("NEW", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSED", "RST")
# UDP / ICMP states
S_UNREPLIED, S_REPLIED = 0, 1

TTL_DELTA = 0xFEFF  # checksum delta of decrementing the TTL byte by one
ICMP, TCP, UDP = 1, 6, 17

_pack_H = struct.Struct("!H").pack_into
_pack_H4s = struct.Struct("!H4s").pack_into


class Mapping:
    """LAN endpoint -> WAN port (endpoint-independent), with the checksum deltas of that rewrite."""

    __slots__ = ("proto", "lan_ip", "lan_port", "lan_ip_b", "wan_ip", "wan_ip_b", "wan_port", "sess", "static",
                 "fwd", "dip_out", "dl4_out", "dip_in", "dl4_in")

    def __init__(self, proto: int, lan_ip: int, lan_port: int, wan_ip: int, wan_port: int,
                 wan_ip_b: bytes | None = None) -> None:
        self.proto = proto
        self.lan_ip = lan_ip
        self.lan_port = lan_port
        self.lan_ip_b = lan_ip.to_bytes(4, "big")
        self.sess: Any = None  # None, one Session, or dict[Session, None]
        self.static = False  # a port forward's mapping: never freed by expiry
        self.fwd: Any = None  # the PortForward that created it, if any
        self.wan_port = wan_port
        self.set_wan(wan_ip, wan_ip_b)

    def set_wan(self, wan_ip: int, wan_ip_b: bytes | None = None, wan_port: int | None = None) -> None:
        """Bind to a WAN address (and port); recompute the checksum deltas of both directions."""
        self.wan_ip = wan_ip
        self.wan_ip_b = wan_ip_b if wan_ip_b is not None else wan_ip.to_bytes(4, "big")
        if wan_port is not None:
            self.wan_port = wan_port
        da = addr_delta(self.lan_ip, wan_ip)
        dp = word_delta(self.lan_port, self.wan_port)
        da_r = addr_delta(wan_ip, self.lan_ip)
        dp_r = word_delta(self.wan_port, self.lan_port)
        self.dip_out = da + TTL_DELTA
        self.dip_in = da_r + TTL_DELTA
        if self.proto == 1:  # the ICMP checksum has no pseudo-header: only the identifier changes
            self.dl4_out, self.dl4_in = dp, dp_r
        else:
            self.dl4_out, self.dl4_in = da + dp, da_r + dp_r

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
    """One conversation through a mapping with one remote endpoint.

    The remote address and port are not stored twice: they are read back from
    ``in_key`` (remote address, WAN address, remote port, WAN port)."""

    __slots__ = ("m", "out_key", "in_key", "expires", "tmo", "state", "helper", "hdata", "fw", "dead", "inbound",
                 "hold")

    def __init__(self, m: Mapping, rem_ip: int, rem_port: int, now: float, tmo: float) -> None:
        self.m = m
        self.expires = now + tmo
        self.tmo = tmo
        self.state = 0
        self.helper: Any = None
        self.hdata: Any = None
        self.fw: Any = None
        self.dead = False
        self.inbound = False  # created by an inbound packet (port forward)
        self.hold = 0.0  # kept at least until then whatever its traffic (a PCP PEER request)
        self._keys(rem_ip.to_bytes(4, "big"), rem_port.to_bytes(2, "big"))

    def _keys(self, rb: bytes, pr: bytes) -> None:
        m = self.m
        self.out_key = m.lan_ip_b + rb + m.lan_port.to_bytes(2, "big") + pr
        self.in_key = rb + m.wan_ip_b + pr + m.wan_port.to_bytes(2, "big")

    def rekey(self) -> None:
        """Recompute the lookup keys from the mapping's current addresses."""
        k = self.in_key
        self._keys(k[0:4], k[8:10])

    @property
    def rem_ip(self) -> int:
        return int.from_bytes(self.in_key[0:4], "big")

    @property
    def rem_port(self) -> int:
        return int.from_bytes(self.in_key[8:10], "big")


class Lease:
    """An explicit mapping a LAN host asked for (PCP MAP, NAT-PMP): an inbound forwarder with a
    lifetime, over a static :class:`Mapping` whose WAN port the pool holds (``m.fwd`` is the
    lease). ``nonce`` is the PCP mapping nonce (None for NAT-PMP), ``client`` the host that
    asked (another than ``m.lan_ip`` only with THIRD_PARTY), ``hits`` the inbound connections
    made through it."""

    __slots__ = ("m", "nonce", "version", "client", "created", "expires", "lifetime", "hits", "dead", "filters")

    def __init__(self, m: Mapping, nonce: bytes | None, client: int, now: float, lifetime: float) -> None:
        self.m = m
        self.nonce = nonce
        self.version = 0 if nonce is None else 2
        self.client = client
        self.created = now
        self.lifetime = lifetime
        self.expires = now + lifetime
        self.hits = 0
        self.dead = False
        # PCP FILTER option: remote (address, mask, port or 0) allowed to connect; empty: anyone
        self.filters: tuple[tuple[int, int, int], ...] = ()

    def allows(self, rem_ip: int, rem_port: int) -> bool:
        """May a connection from ``rem_ip:rem_port`` come in (PCP FILTER, RFC 6887 section 13.3)?"""
        if not self.filters:
            return True
        for addr, mask, port in self.filters:
            if rem_ip & mask == addr and (port == 0 or port == rem_port):
                return True
        return False


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

    def allocate_in(self, proto: int, low: int, high: int, owner: Any) -> int | None:
        """A free port between ``low`` and ``high`` (not only the pool's range: explicit mappings)."""
        used = self.used.setdefault(proto, {})
        size = high - low + 1
        rng = self._rng
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


def translate_out(s: Session, pkt: bytearray, ihl: int) -> None:
    """Rewrite an outbound packet of ``s`` in place: TTL - 1, source address and port (or ICMP
    identifier) to the mapping's WAN side, checksums folded with the precomputed deltas."""
    m = s.m
    pkt[8] -= 1
    c = ((pkt[10] << 8 | pkt[11]) ^ 0xFFFF) + m.dip_out
    c = (c & 0xFFFF) + (c >> 16)
    c = (c & 0xFFFF) + (c >> 16)
    _pack_H4s(pkt, 10, c ^ 0xFFFF, m.wan_ip_b)
    proto = m.proto
    if proto == ICMP:
        _pack_H(pkt, ihl + 4, m.wan_port)
        _pack_H(pkt, ihl + 2, apply_delta((pkt[ihl + 2] << 8) | pkt[ihl + 3], m.dl4_out))
        return
    _pack_H(pkt, ihl, m.wan_port)
    if proto == UDP:
        _pack_H(pkt, ihl + 6, apply_delta_udp((pkt[ihl + 6] << 8) | pkt[ihl + 7], m.dl4_out))
    else:
        _pack_H(pkt, ihl + 16, apply_delta((pkt[ihl + 16] << 8) | pkt[ihl + 17], m.dl4_out))


def translate_in(s: Session, pkt: bytearray, ihl: int) -> None:
    """Rewrite an inbound packet of ``s`` in place: TTL - 1, destination back to the LAN host."""
    m = s.m
    pkt[8] -= 1
    c = ((pkt[10] << 8 | pkt[11]) ^ 0xFFFF) + m.dip_in
    c = (c & 0xFFFF) + (c >> 16)
    c = (c & 0xFFFF) + (c >> 16)
    _pack_H(pkt, 10, c ^ 0xFFFF)
    pkt[16:20] = m.lan_ip_b
    proto = m.proto
    if proto == ICMP:
        _pack_H(pkt, ihl + 4, m.lan_port)
        _pack_H(pkt, ihl + 2, apply_delta((pkt[ihl + 2] << 8) | pkt[ihl + 3], m.dl4_in))
        return
    _pack_H(pkt, ihl + 2, m.lan_port)
    if proto == UDP:
        _pack_H(pkt, ihl + 6, apply_delta_udp((pkt[ihl + 6] << 8) | pkt[ihl + 7], m.dl4_in))
    else:
        _pack_H(pkt, ihl + 16, apply_delta((pkt[ihl + 16] << 8) | pkt[ihl + 17], m.dl4_in))
