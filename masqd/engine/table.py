"""The NAT table: the one owner of the masquerade state, and the stream of its changes.

``NatTable`` holds the TCP/UDP/ICMP sessions (looked up by the packet's own
bytes, one dict per protocol and direction), the endpoint-independent mappings,
the WAN port pool, the timer wheel, the WAN address the mappings are bound to,
and the timeouts by protocol and state. Every entry is created, changed and
removed through its methods (by a packet, by an admin operation, by expiry), and
each of those emits one :class:`Change` to the subscribers: the state file, the
active/backup sync, ``masqd events``, per-host accounting and the metrics all
read that one stream. The protocol helpers' own entries (ESP SPI pairs, ISAKMP
cookies, PPTP calls) are announced on the same stream through ``emit``.

Subscribers are plain callables, run synchronously: they must only record (append
to a queue); nothing here does I/O. ``epoch`` moves whenever a decision cached
outside the engine could have become void (a session removed or rebound, a new
configuration): the data plane's flow cache watches it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from masqd.engine.expiry import TimerWheel
from masqd.engine.nat import (
    ICMP,
    S_REPLIED,
    T_ESTABLISHED,
    T_FIN,
    T_RST,
    TCP,
    TCP_STATE_NAMES,
    UDP,
    Mapping,
    PortPool,
    Session,
)
from masqd.engine.nat import _st as st_pair
from masqd.wire.ipv4 import PROTO_NAMES, ip_str

if TYPE_CHECKING:
    from masqd.config import Timeouts
    from masqd.engine.counters import Counters

# kinds of change
NEW, UPDATE, DESTROY = "new", "update", "destroy"
# why an entry was destroyed
TIMEOUT, FLUSH, RESET, TABLE_FULL, ADDRESS_CHANGE, REPLACED = (
    "timeout", "flush", "reset", "table-full", "address-change", "replaced")


class Change(NamedTuple):
    """One change of the table: ``kind`` (new, update, destroy), the entry (a Session or a
    helper's entry), and why (for a destroy: timeout, flush, reset, table-full,
    address-change, replaced; for an update: what changed, e.g. "state")."""

    kind: str
    entry: Any
    reason: str = ""


Subscriber = Callable[[Change], None]


def _is_dead(s: Session) -> bool:
    x = s._x  # (Session.dead without the property call: expiry visits every due session)
    return x is not None and bool(x[0])


def _deadline(s: Session) -> float:
    return s.seen + s._st[1]


def state_name(s: Session) -> str:
    """The state of a session as ``masqd table`` shows it."""
    if s.m.proto == TCP:
        return TCP_STATE_NAMES[s.state]
    return "REPLIED" if s.state == S_REPLIED else "UNREPLIED"


class NatTable:
    """Sessions, mappings, the port pool and the timers of the masquerade; see the module docstring."""

    def __init__(self, tmo: Timeouts, pool: PortPool, max_entries: int, wan_ip: int, counters: Counters) -> None:
        self.tmo = tmo
        self.pool = pool
        self.max_entries = max_entries
        self.ctr = counters
        # sessions by lookup key: ``out`` by the outbound packet's bytes 12..24 (LAN address,
        # remote address, LAN port, remote port), ``inb`` by the inbound packet's (remote address,
        # WAN address, remote port, WAN port); ICMP uses the identifier as the port
        self.out: dict[int, dict[bytes, Session]] = {TCP: {}, UDP: {}, ICMP: {}}
        self.inb: dict[int, dict[bytes, Session]] = {TCP: {}, UDP: {}, ICMP: {}}
        self.maps: dict[tuple[int, int, int], Mapping] = {}
        self.wheel = TimerWheel()
        self.nsessions = 0
        self.epoch = 0
        self.wan_ip = 0
        self.wan_ip_b = b"\0\0\0\0"
        self._subs: list[Subscriber] = []
        self.set_wan(wan_ip)

    # ------------------------------------------------------------ the stream
    def subscribe(self, fn: Subscriber) -> None:
        """Call ``fn(change)`` for every change from now on."""
        if fn not in self._subs:
            self._subs.append(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        if fn in self._subs:
            self._subs.remove(fn)

    def emit(self, kind: str, entry: Any, reason: str = "") -> None:
        """Announce a change (the table's own, or a helper's entry)."""
        if self._subs:
            ch = Change(kind, entry, reason)
            for fn in self._subs:
                fn(ch)

    # ------------------------------------------------------------ addressing
    def set_wan(self, wan_ip: int) -> None:
        """The address new mappings are bound to (existing ones move with ``rebind``)."""
        self.wan_ip = wan_ip
        self.wan_ip_b = wan_ip.to_bytes(4, "big")
        self.epoch += 1

    def timeout_for(self, proto: int, state: int) -> float:
        t = self.tmo
        if proto == TCP:
            if state == T_ESTABLISHED:
                return t.tcp_established
            if state == T_FIN:
                return t.tcp_fin
            if state == T_RST:
                return t.tcp_rst
            return t.tcp_transitory
        if proto == UDP:
            return t.udp
        if proto == ICMP:
            return t.icmp
        return t.other

    # -------------------------------------------------------------- mappings
    def new_mapping(self, proto: int, lan_ip: int, lan_port: int) -> Mapping | None:
        """The endpoint-independent mapping of a LAN endpoint, created if needed
        (None: the pool is exhausted, counted)."""
        mk = (proto, lan_ip, lan_port)
        m = self.maps.get(mk)
        if m is not None:
            return m
        m = Mapping(proto, lan_ip, lan_port, self.wan_ip, 0, self.wan_ip_b)
        port = self.pool.allocate(proto, lan_port, m)
        if port is None:
            self.ctr.drop("pool_exhausted")
            self.ctr.event("warning", "pool_exhausted", proto=PROTO_NAMES.get(proto, proto))
            return None
        m.set_wan(self.wan_ip, self.wan_ip_b, port)
        self.maps[mk] = m
        return m

    def static_mapping(self, proto: int, lan_ip: int, lan_port: int, wan_port: int) -> Mapping:
        """A mapping that expiry never frees (port forwards); its WAN port is reserved by the caller."""
        m = Mapping(proto, lan_ip, lan_port, self.wan_ip, wan_port, self.wan_ip_b)
        m.static = True
        self.maps.setdefault((proto, lan_ip, lan_port), m)
        return m

    def drop_mapping(self, m: Mapping) -> None:
        mk = (m.proto, m.lan_ip, m.lan_port)
        if self.maps.get(mk) is m:
            del self.maps[mk]
        self.pool.release(m.proto, m.wan_port, m)

    # -------------------------------------------------------------- sessions
    def new_session(self, m: Mapping, rem_ip: int, rem_port: int, now: float, state: int = 0) -> Session | None:
        """A session through ``m`` with a remote endpoint (None: the table is full, counted)."""
        if self.nsessions >= self.max_entries:
            self.ctr.drop("table_full")
            return None
        s = Session(m, rem_ip, rem_port, now, self.timeout_for(m.proto, state))
        s.state = state
        out_t, in_t = self.out[m.proto], self.inb[m.proto]
        old = out_t.get(s.out_key) or in_t.get(s.in_key)
        if old is not None:
            self.remove(old, REPLACED)
        out_t[s.out_key] = s
        in_t[s.in_key] = s
        m.add(s)
        self.nsessions += 1
        self.wheel.add(s, s.expires)
        self.ctr.event("debug", "entry_created", proto=PROTO_NAMES.get(m.proto, m.proto),
                       lan=f"{ip_str(m.lan_ip)}:{m.lan_port}", wan=f"{ip_str(m.wan_ip)}:{m.wan_port}",
                       remote=f"{ip_str(rem_ip)}:{rem_port}")
        self.emit(NEW, s)
        return s

    def set_state(self, s: Session, state: int) -> None:
        """A session's state changed (TCP tracking, a first reply): its timeout follows."""
        if state != s.state:
            s._st = st_pair(state, self.timeout_for(s.m.proto, state))
            self.emit(UPDATE, s, "state")

    def remove(self, s: Session, reason: str) -> None:
        if s.dead:
            return
        s.dead = True
        self.epoch += 1
        m = s.m
        out_t, in_t = self.out[m.proto], self.inb[m.proto]
        k = s.out_key
        if out_t.get(k) is s:
            del out_t[k]
        k = s.in_key
        if in_t.get(k) is s:
            del in_t[k]
        m.remove(s)
        self.nsessions -= 1
        if s.helper is not None:
            s.helper.session_closed(s)
        if m.empty() and not m.static:
            self.drop_mapping(m)
        self.emit(DESTROY, s, reason)

    def rebind(self, s: Session, new_ip: int) -> None:
        """Move the mapping of ``s`` (and all its sessions) to another WAN address."""
        self.epoch += 1
        m = s.m
        in_t = self.inb[m.proto]
        for x in list(m.sessions()):
            if in_t.get(x.in_key) is x:
                del in_t[x.in_key]
        m.set_wan(new_ip, self.wan_ip_b if new_ip == self.wan_ip else None)
        for x in list(m.sessions()):
            x.rekey()
            in_t[x.in_key] = x
            x.fw = None
            self.emit(UPDATE, x, ADDRESS_CHANGE)

    def due(self, now: float) -> list[Session]:
        """The sessions whose time ran out (not yet removed)."""
        return self.wheel.due(now, _is_dead, _deadline)  # type: ignore[no-any-return]

    def sessions(self) -> list[Session]:
        """Every live session (a copy: safe to remove from while iterating)."""
        out: list[Session] = []
        for tbl in self.out.values():
            out.extend(tbl.values())
        return out

    def __iter__(self) -> Iterator[Session]:
        for tbl in self.out.values():
            yield from tbl.values()

    def __len__(self) -> int:
        return self.nsessions
