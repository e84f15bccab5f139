"""Per-host limits of the NAT table (RFC 6888 REQ-4, REQ-5) and the hosts refused most.

``Host`` is what the table counts for one LAN host: its sessions, the WAN
ports it holds per protocol (in use or in quarantine after release), and a
token bucket of new mappings. It exists while the host has a session or a
port; nothing is kept per session. ``HostLimits`` are the numbers in force
(from ``[limits]``, derived from the table and pool sizes where not given).

``Offenders`` remembers the LAN hosts refused by a limit, as a small map with
exponential decay (half-life ``HALF_LIFE``): at most ``2 * n`` hosts, the one
with the lowest decayed score is forgotten for a newcomer, so a flood of
refusals from many hosts costs bounded memory and ``O(n)`` per newcomer. It also
says when a refusal should be logged: once per ``log_interval`` per host, and
no more than ``EVENTS_PER_SECOND`` in all.

``Mutes`` bounds what a host over its mapping rate costs the CPU. Once the
rate limit has refused a host, for ``MUTE_HOLD`` seconds after its latest such
refusal its *flow-opening* packets (unfragmented UDP, TCP SYN without ACK, ICMP
echo request, from the LAN) reach the engine's full path at most at the host's
``punt_rate`` (a token bucket holding ``MUTE_HOLD`` seconds' worth); the rest are dropped before
it (``drop_host_slowpath_limit``). The data plane's C flow cache applies the
same bucket to its misses, so a flood of new flows from one host is mostly
refused in the reader thread, without waking Python (docs/limits.md, "The
CPU"). At most ``MAX_MUTED`` hosts are held so at once (as many as the C
table): a host beyond them is only refused by the rate limit, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from masqd.wire.ipv4 import ICMP, TCP, UDP, ip_str

# the column of a protocol in Host.ports
PORT_INDEX = {TCP: 0, UDP: 1, ICMP: 2}

HALF_LIFE = 60.0  # seconds for an offender's score to halve
EVENTS_PER_SECOND = 5.0
MUTE_HOLD = 1.0  # seconds a host stays over its rate after its latest host_rate_limit refusal
MAX_MUTED = 64  # hosts held so at once (the C flow cache's table has as many rows)


@dataclass(frozen=True)
class HostLimits:
    """The per-host limits in force; 0 means no limit."""

    max_entries: int = 0  # sessions of one LAN host, all protocols
    max_ports: int = 0  # WAN ports of one LAN host and protocol, in use or in quarantine
    rate: float = 0.0  # new mappings per second (token bucket)
    burst: int = 1
    quarantine: float = 0.0  # seconds a released port is kept from other hosts
    half_open: int = 0  # inbound half-open TCP sessions per LAN endpoint (a forwarded server)
    punt_rate: float = 0.0  # while over ``rate``: flow-opening packets per second for the full path


class Bucket:
    """A token bucket: ``take`` one token, refilled at ``rate`` up to ``burst``. (The C flow
    cache's police() does the same arithmetic.)"""

    __slots__ = ("tokens", "last")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.last = now

    def take(self, rate: float, burst: float, now: float) -> bool:
        """One token; False when the bucket is empty."""
        if now > self.last:  # (a clock that steps back refills nothing and takes nothing away)
            t = self.tokens + (now - self.last) * rate
            self.last = now
        else:
            t = self.tokens
        if t > burst:
            t = burst
        if t < 1.0:
            self.tokens = t
            return False
        self.tokens = t - 1.0
        return True


class _Hold(Bucket):
    """A host over its mapping rate: until when, and its budget of flow-opening packets."""

    __slots__ = ("until",)

    def __init__(self, until: float, tokens: float, now: float) -> None:
        super().__init__(tokens, now)
        self.until = until


def opener_src(pkt: bytes | bytearray) -> int | None:
    """The source address of a packet that would open a flow (unfragmented UDP, TCP SYN without
    ACK, ICMP echo request), as the bytes of the header; None for any other packet. (The C flow
    cache's police() reads packets the same way.)"""
    n = len(pkt)
    if n < 20 or pkt[0] >> 4 != 4 or pkt[6] & 0x3F or pkt[7]:
        return None
    ihl = (pkt[0] & 15) << 2
    if ihl < 20:
        return None
    proto = pkt[9]
    if proto == TCP:
        if n < ihl + 14 or pkt[ihl + 13] & 0x12 != 0x02:
            return None
    elif proto == ICMP:
        if n < ihl + 1 or pkt[ihl] != 8:
            return None
    elif proto != UDP:
        return None
    return int.from_bytes(pkt[12:16], "big")


class Mutes:
    """The LAN hosts over their mapping rate and their budget of flow-opening packets for the
    full path (see the module docstring). ``serial`` moves whenever the flow cache should read
    ``rows`` again."""

    def __init__(self) -> None:
        self.hosts: dict[int, _Hold] = {}
        self.rate = 0.0
        self.burst = 1.0
        self.serial = 0

    def configure(self, rate: float) -> None:
        """The budget in force (0: none; every mute is lifted)."""
        self.rate = rate
        self.burst = max(16.0, rate * MUTE_HOLD)  # (a hold's worth: never below the tokens the
        # mapping bucket can regain meanwhile, as punt_rate >= the mapping rate by default)
        if not rate:
            self.hosts.clear()
        self.serial += 1

    def refused(self, ip: int, now: float) -> None:
        """The rate limit refused a packet of ``ip``: it is held (again) until MUTE_HOLD from now."""
        if not self.rate:
            return
        until = now + MUTE_HOLD
        m = self.hosts.get(ip)
        if m is None:
            if len(self.hosts) >= MAX_MUTED:
                self.prune(now)
                if len(self.hosts) >= MAX_MUTED:
                    return
            self.hosts[ip] = _Hold(until, self.burst, now)
            self.serial += 1
        elif until - m.until >= MUTE_HOLD / 4:  # (the cache reads the rows again at most so often)
            m.until = until
            self.serial += 1

    def admit(self, ip: int, now: float) -> bool:
        """Whether a flow-opening packet of ``ip`` may go on to the full path."""
        m = self.hosts.get(ip)
        return m is None or now >= m.until or m.take(self.rate, self.burst, now)

    def prune(self, now: float) -> None:
        """Forget the hosts whose hold is over."""
        gone = [ip for ip, m in self.hosts.items() if now >= m.until]
        for ip in gone:
            del self.hosts[ip]
        if gone:
            self.serial += 1

    def rows(self) -> list[tuple[bytes, float, float, float]]:
        """(address, until, rate, burst) of every held host, for the flow cache."""
        return [(ip.to_bytes(4, "big"), m.until, self.rate, self.burst) for ip, m in self.hosts.items()]

    def over(self, now: float) -> int:
        """How many hosts are held now."""
        return sum(1 for m in self.hosts.values() if now < m.until)


class Host(Bucket):
    """The table's counts for one LAN host (see the module docstring); its bucket is that of its
    new mappings."""

    __slots__ = ("sessions", "ports")

    def __init__(self, tokens: float, now: float) -> None:
        super().__init__(tokens, now)
        self.sessions = 0
        self.ports = [0, 0, 0]  # TCP, UDP, ICMP

    def idle(self) -> bool:
        return not self.sessions and not any(self.ports)


class _Offender:
    __slots__ = ("score", "t", "drops", "reasons", "logged", "unlogged")

    def __init__(self, now: float) -> None:
        self.score = 0.0
        self.t = now
        self.drops = 0
        self.reasons: dict[str, int] = {}
        self.logged = -1e18
        self.unlogged = 0


class Offenders:
    """The LAN hosts refused by a per-host limit, most recent and frequent first (bounded)."""

    def __init__(self, n: int = 10, log_interval: float = 10.0) -> None:
        self.n = n
        self.log_interval = log_interval
        self.hosts: dict[int, _Offender] = {}
        self._ev_tokens = EVENTS_PER_SECOND
        self._ev_last = 0.0

    def _score(self, o: _Offender, now: float) -> float:
        dt = now - o.t
        return o.score * 0.5 ** (dt / HALF_LIFE) if dt > 0 else o.score

    def hit(self, ip: int, reason: str, now: float, n: int = 1) -> int:
        """``n`` refusals of host ``ip``. Returns the refusals to log now (these and those not
        logged since the host's last event), or 0: not to be logged now."""
        hosts = self.hosts
        o = hosts.get(ip)
        if o is None:
            if len(hosts) >= 2 * self.n:
                worst = min(hosts, key=lambda h: self._score(hosts[h], now))
                del hosts[worst]
            o = hosts[ip] = _Offender(now)
        o.score = self._score(o, now) + n
        o.t = now
        o.drops += n
        o.reasons[reason] = o.reasons.get(reason, 0) + n
        o.unlogged += n
        if now - o.logged < self.log_interval:
            return 0
        tok = min(EVENTS_PER_SECOND, self._ev_tokens + (now - self._ev_last) * EVENTS_PER_SECOND)
        self._ev_last = now
        if tok < 1.0:
            self._ev_tokens = tok
            return 0
        self._ev_tokens = tok - 1.0
        o.logged = now
        n, o.unlogged = o.unlogged, 0
        return n

    def top(self, now: float) -> list[dict[str, Any]]:
        """Up to ``n`` hosts, highest decayed score (refusals, half-life HALF_LIFE s) first."""
        rows = sorted(((self._score(o, now), ip, o) for ip, o in self.hosts.items()), key=lambda r: -r[0])
        return [{"rank": i + 1, "host": ip_str(ip), "score": round(sc, 2), "drops": o.drops,
                 "reasons": dict(o.reasons), "last_seen_ago": round(max(0.0, now - o.t), 1)}
                for i, (sc, ip, o) in enumerate(rows[: self.n])]
