"""ICMP errors: the ones the router sends, and those about masqueraded packets (RFC 5508).

``IcmpErrors.make`` builds an error about a packet (time exceeded, fragmentation
needed, unreachable for REJECT), never about an ICMP error or a non-first
fragment, rate-limited by a token bucket (100 per second, burst 100) unless
asked not to be. ``translate_in`` / ``translate_out`` rewrite an error that
crosses the NAT: the outer address, the embedded header's address and port (or
ICMP identifier) and every checksum involved, incrementally, so that path-MTU
discovery and traceroute work through masquerade.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from masqd.wire.checksum import addr_delta, apply_delta, apply_delta_udp, ones_sum, word_delta
from masqd.wire.ipv4 import ICMP, ICMP_ERRORS, IP_OFFMASK, TCP, UDP, UNREACH_NEEDFRAG, build_icmp

if TYPE_CHECKING:
    from masqd.engine.counters import Counters
    from masqd.engine.nat import Session
    from masqd.engine.table import NatTable

_pack_H = struct.Struct("!H").pack_into

RATE = 100.0  # errors per second (and burst)


class IcmpErrors:
    """See the module docstring."""

    def __init__(self, table: NatTable, counters: Counters) -> None:
        self.table = table
        self.ctr = counters
        self.tokens = RATE
        self.last = 0.0  # the time of the last rate-limited error (also: the engine's latest "now")

    def make(self, src: int, pkt: bytearray, ihl: int, typ: int, code: int, mtu: int, now: float,
             limit: bool = True) -> bytearray | None:
        """An ICMP error from ``src`` about ``pkt`` (to its sender), or None when none may be sent."""
        if pkt[9] == ICMP and len(pkt) > ihl and pkt[ihl] in ICMP_ERRORS:
            return None
        if (pkt[6] << 8 | pkt[7]) & IP_OFFMASK:
            return None
        if limit:
            self.tokens = min(RATE, self.tokens + (now - self.last) * RATE)
            self.last = now
            if self.tokens < 1.0:
                self.ctr.drop("icmp_rate_limited")
                return None
            self.tokens -= 1.0
        dst = int.from_bytes(pkt[12:16], "big")
        body = bytes(pkt[: min(len(pkt), 548)])
        rest = mtu & 0xFFFF if code == UNREACH_NEEDFRAG else 0
        self.ctr.count("icmp_errors_sent")
        return bytearray(build_icmp(src, dst, typ, code, rest, body))

    def _embedded(self, pkt: bytearray, ihl: int) -> tuple[int, int, int] | None:
        """Offsets of the packet embedded in an ICMP error: (start, its ihl, its protocol)."""
        e = ihl + 8
        if len(pkt) < e + 20 or pkt[e] >> 4 != 4:
            self.ctr.drop("icmp_error_truncated")
            return None
        eihl = (pkt[e] & 15) << 2
        if eihl < 20 or len(pkt) < e + eihl + 8:
            self.ctr.drop("icmp_error_truncated")
            return None
        return e, eihl, pkt[e + 9]

    def _session_of(self, pkt: bytearray, ihl: int, inbound: bool) -> tuple[int, int, int, Session] | None:
        """The session of the packet embedded in an ICMP error: (start, its ihl, its protocol, the
        session) or None (counted). The embedded packet went the other way: an inbound error
        carries one of our outbound packets (looked up as its reply would be), and so on."""
        emb = self._embedded(pkt, ihl)
        if emb is None:
            return None
        e, eihl, ep = emb
        t = e + eihl
        addrs = bytes(pkt[e + 16: e + 20]) + bytes(pkt[e + 12: e + 16])
        if ep in (TCP, UDP):
            key = addrs + bytes(pkt[t + 2: t + 4]) + bytes(pkt[t: t + 2])
        elif ep == ICMP:  # the identifier is the port: the reply's destination side inbound
            ident = bytes(pkt[t + 4: t + 6])
            key = addrs + (b"\0\0" + ident if inbound else ident + b"\0\0")
        else:
            self.ctr.drop("icmp_error_no_entry")
            return None
        tbl = (self.table.inb if inbound else self.table.out).get(ep)
        s = tbl.get(key) if tbl is not None else None
        if s is None:
            self.ctr.drop("icmp_error_no_entry")
            return None
        return e, eihl, ep, s

    def translate_in(self, pkt: bytearray, ihl: int) -> bool:
        """Translate an inbound ICMP error about a masqueraded packet (RFC 5508 REQ-3..6)."""
        got = self._session_of(pkt, ihl, True)
        if got is None:
            return False
        e, eihl, ep, s = got
        m = s.m
        self._rewrite_embedded(pkt, ihl, e, eihl, ep, m.lan_ip, m.lan_port, m.wan_ip, m.wan_port, src_side=True)
        # outer: destination WAN address -> LAN host, TTL
        d = addr_delta(self.table.wan_ip, m.lan_ip) + 0xFEFF
        pkt[8] -= 1
        _pack_H(pkt, 10, apply_delta((pkt[10] << 8) | pkt[11], d))
        pkt[16:20] = m.lan_ip_b
        self.ctr.count("icmp_errors_translated")
        return True

    def translate_out(self, pkt: bytearray, ihl: int) -> bool:
        """Translate an ICMP error sent by a LAN host about a packet it received through the NAT."""
        got = self._session_of(pkt, ihl, False)
        if got is None:
            return False
        e, eihl, ep, s = got
        m = s.m
        src = int.from_bytes(pkt[12:16], "big")
        wan_ip = self.table.wan_ip
        self._rewrite_embedded(pkt, ihl, e, eihl, ep, m.wan_ip, m.wan_port, m.lan_ip, m.lan_port, src_side=False)
        d = addr_delta(src, wan_ip)
        _pack_H(pkt, 10, apply_delta((pkt[10] << 8) | pkt[11], d))
        pkt[12:16] = self.table.wan_ip_b
        self.ctr.count("icmp_errors_translated")
        return True

    @staticmethod
    def _rewrite_embedded(pkt: bytearray, ihl: int, e: int, eihl: int, ep: int, new_ip: int, new_port: int,
                          old_ip: int, old_port: int, src_side: bool) -> None:
        """Rewrite the embedded header's address and port (source side when the error comes
        from the WAN about our outbound packet, destination side otherwise), fixing the
        embedded IP checksum, the embedded transport checksum when present, and the ICMP
        checksum, all incrementally."""
        region_end = min(len(pkt), e + eihl + 18)
        if (region_end - e) & 1:
            region_end -= 1
        before = ones_sum(pkt[e:region_end])
        a_off = e + 12 if src_side else e + 16
        t = e + eihl
        da = addr_delta(old_ip, new_ip)
        _pack_H(pkt, e + 10, apply_delta((pkt[e + 10] << 8) | pkt[e + 11], da))
        pkt[a_off: a_off + 4] = new_ip.to_bytes(4, "big")
        if ep == ICMP:
            dp = word_delta(old_port, new_port)
            _pack_H(pkt, t + 4, new_port)
            _pack_H(pkt, t + 2, apply_delta((pkt[t + 2] << 8) | pkt[t + 3], dp))
        else:
            p_off = t if src_side else t + 2
            dp = word_delta(old_port, new_port)
            _pack_H(pkt, p_off, new_port)
            if ep == UDP:
                if len(pkt) >= t + 8:
                    _pack_H(pkt, t + 6, apply_delta_udp((pkt[t + 6] << 8) | pkt[t + 7], da + dp))
            elif len(pkt) >= t + 18:
                _pack_H(pkt, t + 16, apply_delta((pkt[t + 16] << 8) | pkt[t + 17], da + dp))
        after = ones_sum(pkt[e:region_end])
        c = (pkt[ihl + 2] << 8) | pkt[ihl + 3]
        _pack_H(pkt, ihl + 2, apply_delta(c, ((~before) & 0xFFFF) + after))
