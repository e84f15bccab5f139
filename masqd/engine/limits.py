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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from masqd.wire.ipv4 import ICMP, TCP, UDP, ip_str

# the column of a protocol in Host.ports
PORT_INDEX = {TCP: 0, UDP: 1, ICMP: 2}

HALF_LIFE = 60.0  # seconds for an offender's score to halve
EVENTS_PER_SECOND = 5.0


@dataclass(frozen=True)
class HostLimits:
    """The per-host limits in force; 0 means no limit."""

    max_entries: int = 0  # sessions of one LAN host, all protocols
    max_ports: int = 0  # WAN ports of one LAN host and protocol, in use or in quarantine
    rate: float = 0.0  # new mappings per second (token bucket)
    burst: int = 1
    quarantine: float = 0.0  # seconds a released port is kept from other hosts
    half_open: int = 0  # inbound half-open TCP sessions per LAN endpoint (a forwarded server)


class Host:
    """The table's counts for one LAN host (see the module docstring)."""

    __slots__ = ("sessions", "ports", "tokens", "last")

    def __init__(self, tokens: float, now: float) -> None:
        self.sessions = 0
        self.ports = [0, 0, 0]  # TCP, UDP, ICMP
        self.tokens = tokens
        self.last = now

    def idle(self) -> bool:
        return not self.sessions and not any(self.ports)

    def take_token(self, limits: HostLimits, now: float) -> bool:
        """One new mapping from the bucket; False when it is empty."""
        if now > self.last:  # (a clock that steps back refills nothing and takes nothing away)
            t = self.tokens + (now - self.last) * limits.rate
            self.last = now
        else:
            t = self.tokens
        burst = limits.burst
        if t > burst:
            t = burst
        if t < 1.0:
            self.tokens = t
            return False
        self.tokens = t - 1.0
        return True


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

    def hit(self, ip: int, reason: str, now: float) -> int:
        """A refusal of host ``ip``. Returns the refusals to log now (this one and those not logged
        since the host's last event), or 0: not to be logged now."""
        hosts = self.hosts
        o = hosts.get(ip)
        if o is None:
            if len(hosts) >= 2 * self.n:
                worst = min(hosts, key=lambda h: self._score(hosts[h], now))
                del hosts[worst]
            o = hosts[ip] = _Offender(now)
        o.score = self._score(o, now) + 1.0
        o.t = now
        o.drops += 1
        o.reasons[reason] = o.reasons.get(reason, 0) + 1
        o.unlogged += 1
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
