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

Why an entry goes is part of the change: ``timeout``, ``flush``, ``reset`` (a
TCP session whose last segment was a RST: its state says so, and its expiry
says ``reset`` rather than ``timeout``), ``table-full``, ``address-change``,
``replaced`` (a new session took its key). Helpers' updates may say what
changed: ``state``, ``address-change``, ``paired`` (an ESP SPI pair learned).

It also holds the *leases*: explicit mappings the LAN hosts asked for over
PCP or NAT-PMP (:class:`~masqd.engine.nat.Lease`, created, renewed and ended
here, on the stream like sessions), and the start of the mapping epoch
(``mapping_epoch_start``: when the mapping state began, at start or when it
was last lost; PCP and NAT-PMP report the seconds since). A state file saves
``mapping_epoch(now)`` and gives it back with ``restore_mapping_epoch`` so a
restart that keeps the table keeps the epoch going.

Subscribers are plain callables, run synchronously: they must only record (append
to a queue); nothing here does I/O. ``epoch`` moves whenever a decision cached
outside the engine could have become void (a session rebound, a new
configuration, a session removed when nobody watches ``gone``): the data
plane's flow cache watches it. While the cache watches ``gone`` (a list), a
removed session is put there instead, and the cache forgets that session's
flows only.

Limits (``[limits]``, docs/limits.md) are enforced here, where entries are made:
per LAN host (:mod:`masqd.engine.limits`) its sessions, the WAN ports it holds
per protocol and the rate of its new mappings; a released port stays in
quarantine for other hosts; inbound half-open TCP sessions per LAN endpoint
(a forwarded server) are capped. A refusal is a counted drop
(``drop_host_entries_limit``, ``drop_host_ports_limit``, ``drop_host_rate_limit``,
``drop_half_open_limit``), the host is remembered among the top offenders, and a
rate-limited ``host_limit`` event is recorded. A host the rate limit refuses is
held in ``mutes`` for a while: its flow-opening packets reach the full path at a
bounded rate (``drop_host_slowpath_limit`` for the rest; the engine and the
data plane's flow cache apply it). When the table is full, a new
session first evicts one that never saw a reply or is closing (early drop, as
conntrack does; found by a bounded walk of the timer wheel), never an
established one; only when none is found in that walk is it refused
(``drop_table_full``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from masqd.engine.expiry import TimerWheel
from masqd.engine.limits import PORT_INDEX, Host, HostLimits, Mutes, Offenders, opener_src
from masqd.engine.nat import (
    ICMP,
    S_REPLIED,
    T_ESTABLISHED,
    T_FIN,
    T_NEW,
    T_RST,
    T_SYN_SENT,
    TCP,
    TCP_STATE_NAMES,
    UDP,
    AcctSession,
    Lease,
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
# what an update changed (besides ADDRESS_CHANGE)
STATE, PAIRED, ANNOUNCED = "state", "paired", "announced"
WITHDRAWN = "withdrawn"  # (destroy) an ESP pair its LAN host announced as gone (PCP SPI announcement)
DELETED = "deleted"  # a lease its client deleted (PCP/NAT-PMP lifetime 0)


class Change(NamedTuple):
    """One change of the table: ``kind`` (new, update, destroy), the entry (a Session or a
    helper's entry), and why (for a destroy: timeout, flush, reset, table-full,
    address-change, replaced; for an update: what changed, e.g. "state")."""

    kind: str
    entry: Any
    reason: str = ""


Subscriber = Callable[[Change], None]

EARLY_DROP_SCAN = 256  # sessions looked at, at most, to find one to evict when the table is full
_HALF_OPEN = (T_NEW, T_SYN_SENT)


def _dead(s: Session) -> bool:
    return s.dead


def droppable(s: Session) -> bool:
    """May early drop evict ``s``: it never saw a reply, or it is closing (never an established one)."""
    if s.m.proto == TCP:
        return s.state != T_ESTABLISHED
    return s.state != S_REPLIED


def _is_dead(s: Session) -> bool:
    x = s._x  # (Session.dead without the property call: expiry visits every due session)
    return x is not None and bool(x[0])


def _deadline(s: Session) -> float:
    """When ``s`` goes: its last packet plus its timeout, or the end of its hold (PCP PEER)."""
    t = s.seen + s._st[1]
    x = s._x
    return t if x is None or x[4] <= t else float(x[4])


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
        # sessions removed since the data plane's flow cache last looked (None: no cache watches):
        # their cached flows go, where a moved epoch empties the whole cache
        self.gone: list[Session] | None = None
        self.wan_ip = 0
        self.wan_ip_b = b"\0\0\0\0"
        self._subs: list[Subscriber] = []
        self.limits = HostLimits()
        self.hosts: dict[int, Host] = {}  # LAN host -> its counts (while it has a session or a port)
        self.half_open: dict[Mapping, int] = {}  # inbound TCP sessions not yet answered, per mapping
        self.offenders = Offenders()
        self.mutes = Mutes()  # hosts over their mapping rate: their flow-opening packets are bounded
        self.now = 0.0  # the latest time seen (for removals that are not given one)
        # masquerade.accounting: new sessions carry packet/byte counters (AcctSession)
        self.acct = False
        # explicit mappings (PCP MAP, NAT-PMP) by (protocol, LAN address, LAN port)
        self.leases: dict[tuple[int, int, int], Lease] = {}
        self.lease_wheel = TimerWheel()
        self.mapping_epoch_start: float | None = None
        self.set_wan(wan_ip)

    def set_limits(self, limits: HostLimits, top: int = 10, log_interval: float = 10.0) -> None:
        self.limits = limits
        self.mutes.configure(limits.punt_rate if limits.rate else 0.0)
        self.offenders.n = top
        self.offenders.log_interval = log_interval

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

    # ------------------------------------------------------------------ hosts
    def _host(self, ip: int, now: float) -> Host:
        h = self.hosts.get(ip)
        if h is None:
            h = self.hosts[ip] = Host(float(self.limits.burst), now)
        return h

    def _forget_idle(self, ip: int, h: Host) -> None:
        if h.idle() and self.hosts.get(ip) is h:
            del self.hosts[ip]

    def _refuse(self, ip: int, reason: str, limit: float, now: float) -> None:
        """A per-host limit refused a packet of LAN host ``ip``: counted, remembered, logged (rarely)."""
        self.ctr.drop(reason)
        if reason == "host_rate_limit":
            self.mutes.refused(ip, now)
        n = self.offenders.hit(ip, reason, now)
        if n:
            self.ctr.event("warning", "host_limit", host=ip_str(ip), reason=reason, limit=limit, drops=n)

    def hold_back(self, pkt: bytes, now: float) -> bool:
        """Whether a LAN packet that missed the fast path is a flow-opening packet of a host over
        its mapping rate and beyond its budget (:class:`~masqd.engine.limits.Mutes`): then it is
        counted here, and the caller drops it. A packet of an existing session (one the fast
        path did not take, a short one say) is never held back."""
        src = opener_src(pkt)
        if src is None:
            return False
        proto = pkt[9]
        ihl = (pkt[0] & 15) << 2
        if proto == ICMP:  # (the identifier is the port: the out key of an echo)
            key = pkt[12:20] + pkt[ihl + 4: ihl + 6] + b"\0\0"
        else:
            key = pkt[12:20] + pkt[ihl: ihl + 4]
        if key in self.out[proto] or self.mutes.admit(src, now):
            return False
        self.policed(src, 1, now)
        return True

    def policed(self, ip: int, n: int, now: float) -> None:
        """``n`` flow-opening packets of ``ip`` were dropped before the full path: the host is over
        its mapping rate and its budget of them (:class:`~masqd.engine.limits.Mutes`)."""
        self.ctr.count("drop_host_slowpath_limit", n)
        k = self.offenders.hit(ip, "host_slowpath_limit", now, n)
        if k:
            self.ctr.event("warning", "host_limit", host=ip_str(ip), reason="host_slowpath_limit",
                           limit=self.mutes.rate, drops=k)

    # -------------------------------------------------------------- mappings
    def new_mapping(self, proto: int, lan_ip: int, lan_port: int, now: float | None = None) -> Mapping | None:
        """The endpoint-independent mapping of a LAN endpoint, created if needed (None: refused by
        the host's limits or the pool is exhausted, counted)."""
        mk = (proto, lan_ip, lan_port)
        m = self.maps.get(mk)
        if m is not None:
            return m
        if now is None:
            now = self.now
        lim = self.limits
        h = self._host(lan_ip, now)
        i = PORT_INDEX.get(proto, 0)
        at_limit = bool(lim.max_ports) and h.ports[i] >= lim.max_ports
        if lim.max_entries and h.sessions >= lim.max_entries:
            self._refuse(lan_ip, "host_entries_limit", lim.max_entries, now)
            return None
        if lim.rate and not h.take(lim.rate, lim.burst, now):
            self._refuse(lan_ip, "host_rate_limit", lim.rate, now)
            return None
        m = Mapping(proto, lan_ip, lan_port, self.wan_ip, 0, self.wan_ip_b)
        pool = self.pool
        port = pool.allocate(proto, lan_port, m, lan_ip, at_limit)
        if port is None and at_limit:  # (only a port of its own in quarantine would have done)
            self._refuse(lan_ip, "host_ports_limit", lim.max_ports, now)
            return None
        if port is None:
            self._forget_idle(lan_ip, h)
            self.ctr.drop("pool_exhausted")
            self.ctr.event("warning", "pool_exhausted", proto=PROTO_NAMES.get(proto, proto))
            return None
        if pool.reclaimed is None:  # (a port taken back from its own quarantine is counted already)
            h.ports[i] += 1
        m.set_wan(self.wan_ip, self.wan_ip_b, port)
        self.maps[mk] = m
        return m

    def static_mapping(self, proto: int, lan_ip: int, lan_port: int, wan_port: int) -> Mapping:
        """A mapping that expiry never frees (port forwards); its WAN port is reserved by the caller."""
        m = Mapping(proto, lan_ip, lan_port, self.wan_ip, wan_port, self.wan_ip_b)
        m.static = True
        self.maps.setdefault((proto, lan_ip, lan_port), m)
        return m

    def drop_mapping(self, m: Mapping, used: bool = True) -> None:
        """Forget ``m`` and free its port: into quarantine for other hosts when it carried traffic
        (``used``) and quarantine is on."""
        mk = (m.proto, m.lan_ip, m.lan_port)
        if self.maps.get(mk) is m:
            del self.maps[mk]
        if not self.pool.release(m.proto, m.wan_port, m):
            return  # a port forward's port, or not its own: nothing of a host's
        h = self.hosts.get(m.lan_ip)
        q = self.limits.quarantine
        if used and q > 0:
            self.pool.quarantine(m.proto, m.wan_port, m.lan_ip, self.now + q)  # still the host's
        elif h is not None:
            h.ports[PORT_INDEX.get(m.proto, 0)] -= 1
            self._forget_idle(m.lan_ip, h)

    def _unused(self, m: Mapping) -> None:
        """A mapping made for a session that was then refused: gone, its port free at once."""
        if m.empty() and not m.static:
            self.drop_mapping(m, used=False)

    # -------------------------------------------------------------- sessions
    def new_session(self, m: Mapping, rem_ip: int, rem_port: int, now: float, state: int = 0,
                    inbound: bool = False, helper: Any = None) -> Session | None:
        """A session through ``m`` with a remote endpoint (None: refused by a limit, counted).
        ``inbound``: made by an inbound packet (a port forward, inbound filtering, a hairpin);
        ``helper``: the TCP helper that follows it (the caller tells it ``session_created``). Both
        are set before the session is announced."""
        self.now = now
        lim = self.limits
        lan = m.lan_ip
        h = self.hosts.get(lan)
        if h is not None and lim.max_entries and h.sessions >= lim.max_entries:
            self._refuse(lan, "host_entries_limit", lim.max_entries, now)
            self._unused(m)
            return None
        half = inbound and m.proto == TCP and state in _HALF_OPEN
        if half and lim.half_open and self.half_open.get(m, 0) >= lim.half_open:
            self.ctr.drop("half_open_limit")
            self._unused(m)
            return None
        if self.nsessions >= self.max_entries and not self.early_drop(m):
            self.ctr.drop("table_full")
            self._unused(m)
            return None
        s = (AcctSession if self.acct else Session)(m, rem_ip, rem_port, now, self.timeout_for(m.proto, state))
        s.state = state
        s.inbound = inbound
        s.helper = helper
        out_t, in_t = self.out[m.proto], self.inb[m.proto]
        old = out_t.get(s.out_key) or in_t.get(s.in_key)
        if old is not None:
            self.remove(old, REPLACED)
        out_t[s.out_key] = s
        in_t[s.in_key] = s
        m.add(s)
        self.nsessions += 1
        h = self._host(lan, now)  # (again: an eviction may have ended the host's record)
        h.sessions += 1
        if half:
            self.half_open[m] = self.half_open.get(m, 0) + 1
        self.wheel.add(s, s.expires)
        self.ctr.event("debug", "entry_created", proto=PROTO_NAMES.get(m.proto, m.proto),
                       lan=f"{ip_str(m.lan_ip)}:{m.lan_port}", wan=f"{ip_str(m.wan_ip)}:{m.wan_port}",
                       remote=f"{ip_str(rem_ip)}:{rem_port}")
        self.emit(NEW, s)
        return s

    def early_drop(self, keep: Mapping | None = None) -> bool:
        """The table is full: evict one session that never saw a reply or is closing (not one of
        ``keep``'s), looking at no more than EARLY_DROP_SCAN sessions. True if one was evicted."""
        victim = self.wheel.take(_dead, lambda x: x.m is not keep and droppable(x), EARLY_DROP_SCAN)
        if victim is None:
            return False
        self.ctr.count("early_drop")
        self.remove(victim, TABLE_FULL)
        return True

    def set_state(self, s: Session, state: int, now: float) -> None:
        """A packet at ``now`` changed a session's state (TCP tracking, a first reply): its timeout
        follows, from ``now``. A shorter one (a RST, a FIN) is filed again in the timer wheel,
        which otherwise would only see the session when its older, later deadline came due."""
        if state != s.state:
            if s.inbound and s.m.proto == TCP and s.state in _HALF_OPEN and state not in _HALF_OPEN:
                self._half_closed(s.m)
            old = s.tmo
            tmo = self.timeout_for(s.m.proto, state)
            s._st = st_pair(state, tmo)
            s.seen = now
            if tmo < old:
                self.wheel.add(s, now + tmo)
            self.emit(UPDATE, s, STATE)

    def expire_reason(self, s: Session) -> str:
        """Why ``s`` goes when its time runs out: ``reset`` after a RST, else ``timeout``."""
        return RESET if s.state == T_RST and s.m.proto == TCP else TIMEOUT

    def _half_closed(self, m: Mapping) -> None:
        n = self.half_open.get(m, 0) - 1
        if n > 0:
            self.half_open[m] = n
        else:
            self.half_open.pop(m, None)

    def watch_gone(self) -> None:
        """A flow cache forgets removed sessions one by one from now on: ``remove`` lists them in
        ``gone`` (a session with a helper still moves the epoch)."""
        self.gone = []

    def unwatch_gone(self) -> None:
        """No cache forgets them any more: the epoch moves, so that a cache still there empties
        itself of those listed and not yet forgotten; ``remove`` moves the epoch again."""
        if self.gone is not None:
            self.gone = None
            self.epoch += 1

    def take_gone(self) -> list[Session]:
        """The sessions removed since the last call (the list starts again empty)."""
        gone = self.gone
        if not gone:
            return []
        self.gone = []
        return gone

    def remove(self, s: Session, reason: str) -> None:
        if s.dead:
            return
        s.dead = True
        if self.gone is None or s.helper is not None:
            self.epoch += 1  # every cached decision void (a helper's flows may hang on this one)
        else:
            self.gone.append(s)  # only its own cached flows are void: the data plane forgets them
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
        if s.inbound and m.proto == TCP and s.state in _HALF_OPEN:
            self._half_closed(m)
        h = self.hosts.get(m.lan_ip)
        if h is not None:
            h.sessions -= 1
        if s.helper is not None:
            s.helper.session_closed(s)
        if m.empty() and not m.static:
            self.drop_mapping(m)
        elif h is not None and not h.sessions:  # (a port forward's server: it may hold no port)
            self._forget_idle(m.lan_ip, h)
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

    # ------------------------------------------------------------- restoring
    def restore_mapping(self, proto: int, lan_ip: int, lan_port: int, wan_ip: int, wan_port: int) -> Mapping | None:
        """The mapping of a LAN endpoint on a given WAN address and port (state file, sync):
        the existing one when it agrees, a new one when the port is free; None when another
        owner holds the port or the endpoint is mapped elsewhere (the caller counts why)."""
        mk = (proto, lan_ip, lan_port)
        m = self.maps.get(mk)
        if m is not None:
            return m if m.wan_port == wan_port and m.wan_ip == wan_ip else None
        if self.pool.owner(proto, wan_port) is not None:
            return None
        # the host's port share holds for restored entries too (not its rate: nothing is new)
        h = self._host(lan_ip, self.now)
        i = PORT_INDEX.get(proto, 0)
        if self.limits.max_ports and h.ports[i] >= self.limits.max_ports:
            self._forget_idle(lan_ip, h)
            return None
        m = Mapping(proto, lan_ip, lan_port, wan_ip, wan_port, self.wan_ip_b if wan_ip == self.wan_ip else None)
        self.pool.take(proto, wan_port, m)
        h.ports[i] += 1
        self.maps[mk] = m
        return m

    def restore_session(self, m: Mapping, rem_ip: int, rem_port: int, now: float, state: int,
                        left: float) -> Session | None:
        """``new_session`` for a restored entry: its state, and ``left`` seconds to live (at most
        its timeout under the current configuration)."""
        s = self.new_session(m, rem_ip, rem_port, now, state)
        if s is None:
            if m.empty() and not m.static:
                self.drop_mapping(m, used=False)
            return None
        self.restore_expiry(s, now, left)
        return s

    def restore_expiry(self, s: Session, now: float, left: float) -> None:
        """Set a session's deadline to ``now + left`` (capped at its timeout), earlier or later."""
        s.expires = now + min(left, s.tmo)
        self.wheel.add(s, s.expires)

    def due(self, now: float) -> list[Session]:
        """The sessions whose time ran out (not yet removed); ends the quarantines that are over."""
        self.now = now
        if self.pool.quarantined:
            for q in self.pool.expire_quarantine(now):
                h = self.hosts.get(q.host)
                if h is not None:
                    h.ports[PORT_INDEX.get(q.proto, 0)] -= 1
                    self._forget_idle(q.host, h)
        return self.wheel.due(now, _is_dead, _deadline)  # type: ignore[no-any-return]

    def refreshed(self, s: Session, now: float) -> bool:
        """Whether ``s``, handed out by ``due`` and not yet removed, got a packet or a hold since
        ``due`` saw it: then it is filed again under its new deadline and stays."""
        d = _deadline(s)
        if d <= now:
            return False
        self.wheel.add(s, d)
        return True

    def host_rows(self, now: float) -> dict[str, Any]:
        """The per-host limits in force and the top offenders, for ``masqd stats``."""
        lim = self.limits
        return {
            "limits": {"host_max_entries": lim.max_entries, "host_max_ports": lim.max_ports,
                       "host_mapping_rate": lim.rate, "host_mapping_burst": lim.burst,
                       "port_quarantine": lim.quarantine, "half_open_per_server": lim.half_open,
                       "host_slowpath_rate": self.mutes.rate},
            "hosts": len(self.hosts),
            "hosts_over_rate": self.mutes.over(now),
            "ports_in_quarantine": sum(1 for q in self.pool.quarantined if q.live),
            "top_offenders": self.offenders.top(now),
        }

    def hold_session(self, s: Session, until: float) -> None:
        """Keep ``s`` at least until ``until`` whatever its traffic (PCP PEER); 0 ends the hold."""
        s.hold = until
        if until > s.expires:
            self.wheel.add(s, until)
        self.emit(UPDATE, s, "hold")

    # ---------------------------------------------------------------- leases
    def lease(self, proto: int, lan_ip: int, lan_port: int, wanted: int, allowed: tuple[int, int],
              exact: bool, nonce: bytes | None, client: int, now: float, lifetime: float) -> Lease | str:
        """A new lease: an explicit mapping of (``proto``, ``lan_ip``, ``lan_port``) for
        ``lifetime`` seconds. Its WAN port is the one the endpoint's existing mapping already has
        (an implicit mapping becomes explicit, RFC 6887 section 11.3), else ``wanted`` when it is
        inside ``allowed`` and free in the pool (no forwarder, no mapping holds it), else one the
        pool picks. Returns the lease, or why not: "exists" (a lease holds the endpoint: renew
        it), "forwarded" (a configured port forward's server endpoint), "port-busy" (``exact``
        and ``wanted`` cannot be had), "pool-exhausted"."""
        mk = (proto, lan_ip, lan_port)
        if mk in self.leases:
            return "exists"
        m = self.maps.get(mk)
        if m is not None:
            if m.static:
                return "forwarded"
            if exact and wanted and wanted != m.wan_port:
                return "port-busy"
        else:
            m = Mapping(proto, lan_ip, lan_port, self.wan_ip, 0, self.wan_ip_b)
            used = self.pool.used.get(proto, {})
            lo, hi = allowed
            if wanted and lo <= wanted <= hi and wanted not in used:
                self.pool.take(proto, wanted, m)
                port: int | None = wanted
            elif exact and wanted:
                return "port-busy"
            else:
                port = self.pool.allocate_in(proto, lo, hi, m)
                if port is None:
                    self.ctr.event("warning", "pool_exhausted", proto=PROTO_NAMES.get(proto, proto))
                    return "pool-exhausted"
            m.set_wan(self.wan_ip, self.wan_ip_b, port)
            self.maps[mk] = m
            self._host(lan_ip, now).ports[PORT_INDEX.get(proto, 0)] += 1  # the host's, like any mapping
        m.static = True
        ls = Lease(m, nonce, client, now, lifetime)
        m.fwd = ls
        self.leases[mk] = ls
        self.lease_wheel.add(ls, ls.expires)
        self.epoch += 1
        self.emit(NEW, ls)
        return ls

    def restore_lease(self, proto: int, lan_ip: int, lan_port: int, wan_ip: int, wan_port: int,
                      nonce: bytes | None, client: int, now: float, left: float, lifetime: float,
                      filters: tuple[tuple[int, int, int], ...]) -> tuple[Lease, bool] | None:
        """A lease from a record (state file, sync) with ``left`` seconds to live, and whether it is
        new: the live one of the endpoint updated, or a new one on the recorded WAN port (the
        endpoint's mapping, or a new one where the port is free). None when the endpoint is mapped
        elsewhere, is a configured forward's, or the port is held by another owner."""
        mk = (proto, lan_ip, lan_port)
        ls = self.leases.get(mk)
        if ls is not None:
            if ls.m.wan_port != wan_port:
                return None
            ls.lifetime = lifetime
            ls.expires = now + left
            ls.filters = filters
            self.lease_wheel.add(ls, ls.expires)
            self.emit(UPDATE, ls, "renewed")
            return ls, False
        m = self.maps.get(mk)
        if m is not None and (m.static or m.wan_port != wan_port):
            return None
        if m is None:
            m = self.restore_mapping(proto, lan_ip, lan_port, wan_ip, wan_port)
            if m is None:
                return None
        m.static = True
        ls = Lease(m, nonce, client, now - max(0.0, lifetime - left), lifetime)
        ls.expires = now + left
        ls.filters = filters
        m.fwd = ls
        self.leases[mk] = ls
        self.lease_wheel.add(ls, ls.expires)
        self.epoch += 1
        self.emit(NEW, ls)
        return ls, True

    def renew_lease(self, ls: Lease, now: float, lifetime: float) -> None:
        """The client asked again: the lease runs ``lifetime`` seconds from now."""
        ls.lifetime = lifetime
        ls.expires = now + lifetime
        self.lease_wheel.add(ls, ls.expires)
        self.emit(UPDATE, ls, "renewed")

    def end_lease(self, ls: Lease, reason: str) -> None:
        """Remove a lease (its sessions go on through the mapping, which becomes an ordinary one
        and ends with them)."""
        if ls.dead:
            return
        ls.dead = True
        m = ls.m
        mk = (m.proto, m.lan_ip, m.lan_port)
        if self.leases.get(mk) is ls:
            del self.leases[mk]
        if m.fwd is ls:
            m.fwd = None
        m.static = False
        if m.empty():
            self.drop_mapping(m)
        self.epoch += 1
        self.emit(DESTROY, ls, reason)

    def leases_due(self, now: float) -> list[Lease]:
        """The leases whose lifetime ran out (not yet removed)."""
        return self.lease_wheel.due(now, lambda x: x.dead, lambda x: x.expires)  # type: ignore[no-any-return]

    def mapping_epoch(self, now: float) -> int:
        """Seconds since the mapping state began (PCP/NAT-PMP "epoch time"); starts it if needed."""
        if self.mapping_epoch_start is None:
            self.mapping_epoch_start = now
        return max(0, int(now - self.mapping_epoch_start))

    def restore_mapping_epoch(self, seconds: float, now: float) -> None:
        """A restart that restored the state: the epoch goes on from ``seconds`` (the saved value
        plus the time masqd was down)."""
        self.mapping_epoch_start = now - max(0.0, seconds)

    def lost_mappings(self, now: float) -> None:
        """The mapping state was lost (RFC 6887 section 8.5): the epoch starts again."""
        self.mapping_epoch_start = now

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
