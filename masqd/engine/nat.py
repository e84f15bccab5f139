"""The masquerade table's entries: mappings (endpoint-independent), sessions, the port pool,
and the rewrite a session does to its packets.

A *mapping* binds a LAN endpoint (protocol, address, port or ICMP identifier)
to a WAN port; it lives while it has sessions (RFC 4787 REQ-1, REQ-5). A
*session* is one conversation through a mapping with one remote endpoint; it
carries the two lookup keys (the packet's own address/port bytes, so the fast
path looks it up with one slice of the packet), the precomputed checksum
deltas for each direction, its timer and its TCP state. The table that holds
them is :class:`masqd.engine.table.NatTable`.

Per-entry packet and byte counters (``masquerade.accounting``, off by default
like nf_conntrack_acct) live in :class:`Acct` objects, one per direction, on an
:class:`AcctSession` (a Session with one more slot pair): a table without
accounting makes plain Sessions, which carry no counter slots at all.
"""

from __future__ import annotations

import random
import struct
from collections import deque
from collections.abc import Iterator
from typing import Any

from masqd.wire.checksum import addr_delta, apply_delta, apply_delta_udp, word_delta

# TCP states (as small ints)
T_NEW, T_SYN_SENT, T_SYN_RECV, T_ESTABLISHED, T_FIN, T_CLOSED, T_RST = range(7)
TCP_STATE_NAMES = ("NEW", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSED", "RST")
# UDP / ICMP states; S_INBOUND: created by an inbound packet, the LAN side has not answered yet
S_UNREPLIED, S_REPLIED, S_INBOUND = 0, 1, 2

TTL_DELTA = 0xFEFF  # checksum delta of decrementing the TTL byte by one
SESS_LIST_MAX = 32  # a mapping keeps up to this many sessions in a tuple (8 bytes each), more in a dict
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
        self.sess: Any = None  # None, one Session, a tuple of a few, or dict[Session, None]
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
        elif type(x) is tuple:
            if len(x) < SESS_LIST_MAX:
                self.sess = (*x, s)
            else:
                d = dict.fromkeys(x)
                d[s] = None
                self.sess = d
        elif type(x) is dict:
            x[s] = None
        else:
            self.sess = (x, s)

    def remove(self, s: Session) -> None:
        x = self.sess
        if x is s:
            self.sess = None
        elif type(x) is tuple:
            y = tuple(z for z in x if z is not s)
            self.sess = y[0] if len(y) == 1 else y
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
        if type(x) is tuple:
            return iter(x)
        if type(x) is dict:
            return iter(list(x))
        return iter((x,))

    def empty(self) -> bool:
        return self.sess is None


_DEAD: list[Any] = [True, False, None, None, 0.0]  # the _x of a dead session with nothing else set (shared, never changed)
_ST: dict[tuple[int, float], tuple[int, float]] = {}  # (state, timeout) pairs, one object each


def _st(state: int, tmo: float) -> tuple[int, float]:
    """The one (state, timeout) tuple of that value (a few exist: sessions share them)."""
    k = (state, tmo)
    t = _ST.get(k)
    if t is None:
        if len(_ST) > 4096:  # (timeouts changed by many reloads)
            _ST.clear()
        t = _ST[k] = k
    return t


class Session:
    """One conversation through a mapping with one remote endpoint.

    Memory is what bounds the table (``bench/engine.py``: bytes per entry), so a
    session holds as little as it can: the remote address and port are read back
    from ``in_key`` (remote address, WAN address, remote port, WAN port), which is
    also the inbound lookup key; ``out_key`` (the outbound one) is rebuilt from it
    and the mapping when asked for; the time of its last packet is ``seen`` (the
    packet's own clock value, shared by all sessions touched at that instant) and
    ``expires`` is ``seen + tmo``; ``state`` and ``tmo`` are one shared tuple
    (``_st``); ``dead``, ``inbound``, ``hdata``, ``helper`` and ``hold`` (rarely
    set) share one slot (``_x``). Six slots: 80 bytes with the GC header."""

    __slots__ = ("m", "in_key", "seen", "_st", "fw", "_x")

    def __init__(self, m: Mapping, rem_ip: int, rem_port: int, now: float, tmo: float) -> None:
        self.m = m
        self.seen = now
        self._st = _st(0, tmo)
        self.fw: Any = None
        self._x: list[Any] | None = None  # [dead, inbound, hdata, helper, hold] once one of them is set
        self.in_key = rem_ip.to_bytes(4, "big") + m.wan_ip_b + rem_port.to_bytes(2, "big") + \
            m.wan_port.to_bytes(2, "big")

    @property
    def out_key(self) -> bytes:
        """The outbound lookup key: LAN address, remote address, LAN port, remote port."""
        k, m = self.in_key, self.m
        return m.lan_ip_b + k[0:4] + m.lan_port.to_bytes(2, "big") + k[8:10]

    @property
    def expires(self) -> float:
        return self.seen + self._st[1]

    @expires.setter
    def expires(self, t: float) -> None:
        self.seen = t - self._st[1]

    def _set(self, i: int, v: Any) -> None:
        x = self._x
        if x is None or x is _DEAD:
            if not v or x is _DEAD and i == 0:
                return
            x = self._x = [x is _DEAD, False, None, None, 0.0]
        x[i] = v

    @property
    def state(self) -> int:
        return self._st[0]

    @state.setter
    def state(self, v: int) -> None:
        self._st = _st(v, self._st[1])

    @property
    def tmo(self) -> float:
        return self._st[1]

    @tmo.setter
    def tmo(self, v: float) -> None:
        self._st = _st(self._st[0], v)

    @property
    def helper(self) -> Any:
        """The helper following this session's stream (PPTP's control connection), or None."""
        x = self._x
        return None if x is None else x[3]

    @helper.setter
    def helper(self, v: Any) -> None:
        self._set(3, v)

    @property
    def dead(self) -> bool:
        x = self._x
        return x is not None and bool(x[0])

    @dead.setter
    def dead(self, v: bool) -> None:
        if v and self._x is None:  # the usual death: nothing else set (no list for it)
            self._x = _DEAD
        else:
            self._set(0, v)

    @property
    def inbound(self) -> bool:
        """Created by an inbound packet (a port forward)."""
        x = self._x
        return x is not None and bool(x[1])

    @inbound.setter
    def inbound(self, v: bool) -> None:
        self._set(1, v)

    @property
    def hdata(self) -> Any:
        """The helper's own data on this session (PPTP: its control connection)."""
        x = self._x
        return None if x is None else x[2]

    @hdata.setter
    def hdata(self, v: Any) -> None:
        self._set(2, v)

    @property
    def hold(self) -> float:
        """Kept at least until then whatever its traffic (a PCP PEER request); 0: no hold."""
        x = self._x
        return 0.0 if x is None else float(x[4])

    @hold.setter
    def hold(self, v: float) -> None:
        self._set(4, v)

    def rekey(self) -> None:
        """Recompute the inbound lookup key from the mapping's current WAN address and port."""
        k, m = self.in_key, self.m
        self.in_key = k[0:4] + m.wan_ip_b + k[8:10] + m.wan_port.to_bytes(2, "big")

    @property
    def rem_ip(self) -> int:
        return int.from_bytes(self.in_key[0:4], "big")

    @property
    def rem_port(self) -> int:
        return int.from_bytes(self.in_key[8:10], "big")


class Quarantined:
    """A released port kept from other hosts until ``until`` (RFC 6888 REQ-8): it stands in the
    pool's ``used`` map in the place of its former owner; its host may take it again."""

    __slots__ = ("proto", "port", "host", "until", "live")

    def __init__(self, proto: int, port: int, host: int, until: float) -> None:
        self.proto = proto
        self.port = port
        self.host = host
        self.until = until
        self.live = True  # False once its host took the port again (or it was purged)


class Acct:
    """The packets and bytes of one direction of an entry (``masquerade.accounting``).

    It has the ``pkts`` / ``bytes`` pair of a firewall rule, so a fast path's cached
    decision counts it with the rules it passes: the fast paths need no code of their
    own for it (see ``FullPath.output``)."""

    __slots__ = ("pkts", "bytes")

    def __init__(self) -> None:
        self.pkts = 0
        self.bytes = 0


class AcctSession(Session):
    """A session with packet and byte counters: ``a_out`` (LAN -> WAN) and ``a_in`` (WAN -> LAN)."""

    __slots__ = ("a_out", "a_in")

    def __init__(self, m: Mapping, rem_ip: int, rem_port: int, now: float, tmo: float) -> None:
        super().__init__(m, rem_ip, rem_port, now, tmo)
        self.a_out = Acct()
        self.a_in = Acct()


def acct_counter(e: Any, outbound: bool) -> Acct | None:
    """The counter of entry ``e`` for one direction (accounting on): an AcctSession's, or a
    helper entry's (its ``a_out`` / ``a_in`` slots, made at its first counted packet); None for
    an entry without counter slots (a Session made while accounting was off)."""
    try:
        a: Acct | None = e.a_out if outbound else e.a_in
    except AttributeError:
        return None
    if a is None:
        e.a_out, e.a_in = Acct(), Acct()
        a = e.a_out if outbound else e.a_in
    return a


def acct_row(e: Any) -> dict[str, int]:
    """The counters of an entry for a listing ({} when it has none)."""
    a_out = getattr(e, "a_out", None)
    a_in = getattr(e, "a_in", None)
    if a_out is None or a_in is None:
        return {}
    return {"packets_out": a_out.pkts, "bytes_out": a_out.bytes, "packets_in": a_in.pkts, "bytes_in": a_in.bytes}


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
    """WAN ports (or ICMP identifiers) per protocol; never hands out a port in use, nor a port in
    quarantine to another host than the one that released it."""

    def __init__(self, low: int, high: int, preserve: bool, rng: random.Random | None = None) -> None:
        self.low = low
        self.high = high
        self.size = high - low + 1
        self.preserve = preserve
        self.used: dict[int, dict[int, Any]] = {}  # proto -> port -> owner (or its Quarantined mark)
        self.in_pool: dict[int, int] = {}  # proto -> ports in use inside [low, high]
        self.quarantined: deque[Quarantined] = deque()  # in release order
        self.reclaimed: Quarantined | None = None  # the mark the last allocate() took back, if any
        self._rng = rng or random.Random(0x6D61)

    def owner(self, proto: int, port: int) -> Any:
        return self.used.get(proto, {}).get(port)

    def set_range(self, low: int, high: int) -> None:
        """A new [low, high] (a reload): the counts of ports in use inside it are made again from
        the ports in use, so that ``release`` (which counts by the range) keeps them right."""
        self.low, self.high, self.size = low, high, high - low + 1
        self.in_pool = {proto: sum(1 for p in used if low <= p <= high) for proto, used in self.used.items()}

    def take(self, proto: int, port: int, owner: Any) -> None:
        used = self.used.setdefault(proto, {})
        if port not in used and self.low <= port <= self.high:
            self.in_pool[proto] = self.in_pool.get(proto, 0) + 1
        used[port] = owner

    def release(self, proto: int, port: int, owner: Any) -> bool:
        """Free ``port`` if ``owner`` holds it (True)."""
        used = self.used.get(proto)
        if used is not None and used.get(port) is owner:
            del used[port]
            if self.low <= port <= self.high:
                self.in_pool[proto] -= 1
            return True
        return False

    def quarantine(self, proto: int, port: int, host: int, until: float) -> None:
        """Keep the free ``port`` from hosts other than ``host`` until ``until``."""
        q = Quarantined(proto, port, host, until)
        self.take(proto, port, q)
        self.quarantined.append(q)

    def expire_quarantine(self, now: float) -> list[Quarantined]:
        """Free the ports whose quarantine ended; returns their marks that were still live."""
        out: list[Quarantined] = []
        dq = self.quarantined
        while dq and dq[0].until <= now:
            q = dq.popleft()
            if q.live:
                q.live = False
                self.release(q.proto, q.port, q)
                out.append(q)
        return out

    @staticmethod
    def _free_for(used: dict[int, Any], port: int, host: int, own_only: bool = False) -> bool:
        x = used.get(port)
        if x is None:
            return not own_only
        return type(x) is Quarantined and x.host == host

    def _take_for(self, proto: int, port: int, owner: Any) -> int:
        x = self.used[proto].get(port)
        if type(x) is Quarantined:
            x.live = False
            self.reclaimed = x
        self.take(proto, port, owner)
        return port

    def allocate(self, proto: int, wanted: int, owner: Any, host: int = 0, own_only: bool = False) -> int | None:
        """A free port for LAN host ``host``: ``wanted`` when free and preservation is on, else one
        from the pool. A port in quarantine is free for the host that released it only; when
        such a port is taken back, ``reclaimed`` is its mark (else None). ``own_only``: only such
        a port will do (the host holds all the ports it may)."""
        used = self.used.setdefault(proto, {})
        self.reclaimed = None
        if self.preserve and wanted != 0 and self._free_for(used, wanted, host, own_only):
            return self._take_for(proto, wanted, owner)
        full = own_only or self.in_pool.get(proto, 0) >= self.size
        if full and not self.quarantined:
            return None
        rng = self._rng
        low, size = self.low, self.size
        for _ in range(32):
            p = low + rng.randrange(size)
            if self._free_for(used, p, host, own_only):
                return self._take_for(proto, p, owner)
        if full:  # only the host's own ports in quarantine could do: not worth a full search
            return None
        start = rng.randrange(size)
        for i in range(size):
            p = low + (start + i) % size
            if self._free_for(used, p, host):
                return self._take_for(proto, p, owner)
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
