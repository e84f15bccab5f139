"""The fast paths: established flows forwarded with one lookup and a precomputed rewrite.

An established TCP/UDP flow (or ICMP query) whose firewall decision is cached
on its session takes a short path: one slice of the packet is the lookup key,
one dict lookup finds the session, and the rewrite folds precomputed checksum
deltas (RFC 1624). Anything unusual (fragments, options, TCP flags other than
ACK/PSH/URG, TTL 1, oversize, a firewall decision cached under older rules)
returns None: the full path takes the packet, and counts what is wrong with it.
A header whose checksum is wrong is one of them: the RFC 1624 update would carry
it along (a bad checksum stays bad), so it is verified first, in one C call
(see ``masqd.wire.ipv4.header_checksum_ok``), for the helpers' fast paths too.

Every fast path, the protocol helpers' (ESP, GRE) included, ends with the same
bookkeeping: ``hits`` (the cached decision for the direction, under the current
rules generation) before the rewrite, ``account`` after it; the helpers' IPv4
rewrite is ``rewrite_src`` / ``rewrite_dst``. (The TCP/UDP paths here fold the
same header lines inline, with the transport checksum: a call per packet is
about 4 % of their cost.) The same two describe
a flow to a cache outside the engine (the data plane's flow cache): ``entry``
says what the fast path would do to a flow's packets, ``count_fast`` folds in
what that cache forwarded.

Per-entry accounting (``masquerade.accounting``) costs the paths here nothing
of their own: the full path appends the entry's counter for the direction to
the cached decision, so ``account`` and ``count_fast`` count it with the rules.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from masqd.engine.counters import LAN_ICMP, WAN_BASE, WAN_ICMP, Counters, proto_index
from masqd.engine.nat import TTL_DELTA, translate_in, translate_out
from masqd.wire.ipv4 import ICMP, ICMP_QUERIES, ICMP_REPLIES, TCP, UDP, set_ip_checksum

if TYPE_CHECKING:
    from masqd.engine.table import NatTable

_pack_H = struct.Struct("!H").pack_into
_pack_H4s = struct.Struct("!H4s").pack_into

# a fast path of a helper: (packet, now) -> [(iface, packet)] or None
HelperFast = Callable[[bytes, float], "list[tuple[str, bytes]] | None"]
# what a cache outside the engine needs to repeat the fast path's rewrite of a flow: (direction,
# protocol, lookup key, entry, new address, new port / ICMP identifier / GRE key or -1 for none,
# IPv4 checksum delta, transport checksum delta, MTU)
FastEntry = tuple[int, int, bytes, Any, bytes, int, int, int, int]
# a helper's description of its established flow, for such a cache: (direction, packet) -> FastEntry
HelperEntry = Callable[[int, "bytes | bytearray"], "FastEntry | None"]
# a helper folds in what such a cache forwarded for one of its entries: (entry, time of the last packet)
HelperFold = Callable[[Any, float], None]


def rewrite_src(data: bytes, dip: int, addr: bytes) -> bytearray:
    """A copy of ``data`` leaving by the WAN: TTL - 1, source address ``addr``, the header checksum
    folded with ``dip`` (the precomputed RFC 1624 delta of both changes)."""
    pkt = bytearray(data)
    pkt[8] -= 1
    c = ((data[10] << 8 | data[11]) ^ 0xFFFF) + dip
    c = (c & 0xFFFF) + (c >> 16)
    c = (c & 0xFFFF) + (c >> 16)
    _pack_H4s(pkt, 10, c ^ 0xFFFF, addr)
    return pkt


def rewrite_dst(data: bytes, dip: int, addr: bytes) -> bytearray:
    """A copy of ``data`` going to the LAN: TTL - 1, destination address ``addr``, checksum folded."""
    pkt = bytearray(data)
    pkt[8] -= 1
    c = ((data[10] << 8 | data[11]) ^ 0xFFFF) + dip
    c = (c & 0xFFFF) + (c >> 16)
    c = (c & 0xFFFF) + (c >> 16)
    _pack_H(pkt, 10, c ^ 0xFFFF)
    pkt[16:20] = addr
    return pkt


class FastPath:
    """See the module docstring. ``configure`` gives it what the configuration decides."""

    def __init__(self, table: NatTable, counters: Counters) -> None:
        self.table = table
        self.ctr = counters
        self.out_tcp = table.out[TCP]
        self.out_udp = table.out[UDP]
        self.out_icmp = table.out[ICMP]
        self.in_tcp = table.inb[TCP]
        self.in_udp = table.inb[UDP]
        self.in_icmp = table.inb[ICMP]
        self.rx_pkts = counters.rx_pkts
        self.rx_bytes = counters.rx_bytes
        self.tx_pkts = counters.tx_pkts
        self.tx_bytes = counters.tx_bytes
        self.gen = 0  # the rules generation: a decision cached under another is void
        self.wan_mtu = 1500
        self.lan_mtu = 1500
        self.helpers_out: dict[int, HelperFast] = {}  # IP protocol -> a helper's fast path
        self.helpers_in: dict[int, HelperFast] = {}
        self.helpers_entry: dict[int, HelperEntry] = {}  # IP protocol -> the helper's ``fast_entry``
        self.helpers_fold: dict[int, HelperFold] = {}  # IP protocol -> the helper's ``fast_fold``

    def configure(self, gen: int, lan_mtu: int, wan_mtu: int, helpers_out: dict[int, HelperFast],
                  helpers_in: dict[int, HelperFast], helpers_entry: dict[int, HelperEntry] | None = None,
                  helpers_fold: dict[int, HelperFold] | None = None) -> None:
        self.gen = gen
        self.lan_mtu = lan_mtu
        self.wan_mtu = wan_mtu
        self.helpers_out = helpers_out
        self.helpers_in = helpers_in
        self.helpers_entry = helpers_entry or {}
        self.helpers_fold = helpers_fold or {}

    # ------------------------------------------------------- the shared bookkeeping
    def hits(self, e: Any, d: int) -> tuple[Any, ...] | None:
        """The rules a packet of entry ``e`` in direction ``d`` (0 out, 1 in) passes, cached by
        the full path under the current rules; None: it takes the full path."""
        fw = e.fw
        if fw is None or fw[0] != self.gen:
            return None
        return fw[1 + d]  # type: ignore[no-any-return]

    def account(self, hits: tuple[Any, ...], rx: int, tx: int, n: int) -> None:
        """One packet of ``n`` bytes forwarded: received in slot ``rx``, sent in slot ``tx``."""
        for r in hits:
            r.pkts += 1
            r.bytes += n
        self.rx_pkts[rx] += 1
        self.rx_bytes[rx] += n
        self.tx_pkts[tx] += 1
        self.tx_bytes[tx] += n

    # ------------------------------------------------------------------ the paths
    def out(self, data: bytes, now: float, partial: int = 0, seg: int = 0) -> list[tuple[str, bytes]] | None:
        """A packet from the LAN: the rewritten packet for the WAN, [] (dropped by a helper), or None."""
        n = len(data)
        if (n < 40 or data[0] != 0x45 or data[6] & 0x3F or data[7] or data[8] <= 1
                or int.from_bytes(data[:20], "big") % 0xFFFF):  # a bad header checksum (see wire.ipv4)
            return None
        proto = data[9]
        if proto == UDP:
            s = self.out_udp.get(data[12:24])
        elif proto == TCP:
            if data[33] & 7:
                return None
            s = self.out_tcp.get(data[12:24])
        elif proto == ICMP:
            return self.icmp(data, now, True) if data[20] in ICMP_QUERIES else None
        else:
            fp = self.helpers_out.get(proto)
            return None if fp is None else fp(data, now)
        if s is None or (seg or n) > self.wan_mtu or (data[2] << 8 | data[3]) != n:
            return None
        fw = s.fw
        if fw is None or fw[0] != self.gen or fw[1] is None or (partial and s.helper is not None):
            return None
        m = s.m
        pkt = bytearray(data)
        pkt[8] -= 1
        c = ((pkt[10] << 8 | pkt[11]) ^ 0xFFFF) + m.dip_out
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        _pack_H4s(pkt, 10, c ^ 0xFFFF, m.wan_ip_b)
        _pack_H(pkt, 20, m.wan_port)
        if partial:  # the field holds the pseudo-header sum: addresses only, not inverted
            o = 26 if proto == UDP else 36
            u = (pkt[o] << 8 | pkt[o + 1]) + m.dip_out - TTL_DELTA
            u = (u & 0xFFFF) + (u >> 16)
            _pack_H(pkt, o, (u & 0xFFFF) + (u >> 16))
        elif proto == UDP:
            u = pkt[26] << 8 | pkt[27]
            if u:
                u = (u ^ 0xFFFF) + m.dl4_out
                u = (u & 0xFFFF) + (u >> 16)
                u = ((u & 0xFFFF) + (u >> 16)) ^ 0xFFFF
                _pack_H(pkt, 26, u or 0xFFFF)
        else:
            u = ((pkt[36] << 8 | pkt[37]) ^ 0xFFFF) + m.dl4_out
            u = (u & 0xFFFF) + (u >> 16)
            u = (u & 0xFFFF) + (u >> 16)
            _pack_H(pkt, 36, u ^ 0xFFFF)
            if s.helper is not None and not s.helper.tcp_segment(s, pkt, 20, True, now):
                return []
        if seg:  # a super-packet: the kernel reads this header as is (always recompute it)
            set_ip_checksum(pkt, 20)
        s.seen = now
        i = 0 if proto == TCP else 1  # LAN_TCP / LAN_UDP
        self.account(fw[1], i, i + WAN_BASE, n)
        return [("wan", bytes(pkt))]

    def inb(self, data: bytes, now: float, partial: int = 0, seg: int = 0) -> list[tuple[str, bytes]] | None:
        """A packet from the WAN: the rewritten packet for the LAN, [] (dropped by a helper), or None."""
        n = len(data)
        if (n < 40 or data[0] != 0x45 or data[6] & 0x3F or data[7] or data[8] <= 1
                or int.from_bytes(data[:20], "big") % 0xFFFF):
            return None
        proto = data[9]
        if proto == UDP:
            s = self.in_udp.get(data[12:24])
        elif proto == TCP:
            if data[33] & 7:
                return None
            s = self.in_tcp.get(data[12:24])
        elif proto == ICMP:
            return self.icmp(data, now, False) if data[20] in ICMP_REPLIES else None
        else:
            fp = self.helpers_in.get(proto)
            return None if fp is None else fp(data, now)
        if s is None or (seg or n) > self.lan_mtu or (data[2] << 8 | data[3]) != n:
            return None
        fw = s.fw
        if (fw is None or fw[0] != self.gen or fw[2] is None or s.state == 0  # UNREPLIED / NEW
                or (partial and s.helper is not None)):
            return None
        m = s.m
        pkt = bytearray(data)
        pkt[8] -= 1
        c = ((pkt[10] << 8 | pkt[11]) ^ 0xFFFF) + m.dip_in
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        _pack_H(pkt, 10, c ^ 0xFFFF)
        pkt[16:20] = m.lan_ip_b
        _pack_H(pkt, 22, m.lan_port)
        if partial:  # the field holds the pseudo-header sum: addresses only, not inverted
            o = 26 if proto == UDP else 36
            u = (pkt[o] << 8 | pkt[o + 1]) + m.dip_in - TTL_DELTA
            u = (u & 0xFFFF) + (u >> 16)
            _pack_H(pkt, o, (u & 0xFFFF) + (u >> 16))
        elif proto == UDP:
            u = pkt[26] << 8 | pkt[27]
            if u:
                u = (u ^ 0xFFFF) + m.dl4_in
                u = (u & 0xFFFF) + (u >> 16)
                u = ((u & 0xFFFF) + (u >> 16)) ^ 0xFFFF
                _pack_H(pkt, 26, u or 0xFFFF)
        else:
            u = ((pkt[36] << 8 | pkt[37]) ^ 0xFFFF) + m.dl4_in
            u = (u & 0xFFFF) + (u >> 16)
            u = (u & 0xFFFF) + (u >> 16)
            _pack_H(pkt, 36, u ^ 0xFFFF)
            if s.helper is not None and not s.helper.tcp_segment(s, pkt, 20, False, now):
                return []
        if seg:
            set_ip_checksum(pkt, 20)
        s.seen = now
        i = 0 if proto == TCP else 1
        self.account(fw[2], i + WAN_BASE, i, n)
        return [("lan", bytes(pkt))]

    def icmp(self, data: bytes, now: float, outbound: bool) -> list[tuple[str, bytes]] | None:
        """An echo (or timestamp) request out, or its reply in, of a session whose firewall
        decisions are cached: the identifier is the port (``translate_out``/``translate_in``)."""
        n = len(data)
        if outbound:
            s = self.out_icmp.get(data[12:20] + data[24:26] + b"\0\0")
            if s is None or n > self.wan_mtu or (data[2] << 8 | data[3]) != n:
                return None
            hits = self.hits(s, 0)
        else:
            s = self.in_icmp.get(data[12:20] + b"\0\0" + data[24:26])
            if s is None or n > self.lan_mtu or (data[2] << 8 | data[3]) != n or s.state == 0:
                return None
            hits = self.hits(s, 1)
        if hits is None:
            return None
        pkt = bytearray(data)
        if outbound:
            translate_out(s, pkt, 20)
            self.account(hits, LAN_ICMP, WAN_ICMP, n)
        else:
            translate_in(s, pkt, 20)
            self.account(hits, WAN_ICMP, LAN_ICMP, n)
        s.seen = now
        return [("wan" if outbound else "lan", bytes(pkt))]

    # ------------------------------------------- the fast path, cached outside the engine
    def entry(self, iface: str, data: bytes | bytearray) -> FastEntry | None:
        """What the fast path does to the packets of the flow of ``data`` (a packet that arrived on
        ``iface``), for a cache outside the engine: (direction 0 out / 1 in, protocol, the lookup
        key, the session, the new address, the new port or ICMP identifier, the IPv4 and transport
        checksum deltas, the MTU to check). None: a flow the fast path does not take now (unknown,
        its firewall decision not cached, not yet replied, or a helper follows its stream).
        Other protocols are described by the helper whose fast path takes them (established
        ESP pairs, PPTP calls' GRE): see its ``fast_entry``."""
        if len(data) < 28 or data[0] != 0x45:
            return None
        proto = data[9]
        d = 0 if iface == "lan" else 1
        if proto == TCP or proto == UDP:
            key = bytes(data[12:24])
        elif proto == ICMP:
            if data[20] not in (ICMP_QUERIES if d == 0 else ICMP_REPLIES):
                return None
            key = bytes(data[12:20]) + (bytes(data[24:26]) + b"\0\0" if d == 0 else b"\0\0" + bytes(data[24:26]))
        else:
            he = self.helpers_entry.get(proto)
            return None if he is None else he(d, data)
        s = (self.table.out if d == 0 else self.table.inb)[proto].get(key)
        if s is None or s.helper is not None or s.dead or self.hits(s, d) is None or (d and s.state == 0):
            return None
        m = s.m
        if d == 0:
            return (0, proto, key, s, m.wan_ip_b, m.wan_port, m.dip_out, m.dl4_out, self.wan_mtu)
        return (1, proto, key, s, m.lan_ip_b, m.lan_port, m.dip_in, m.dl4_in, self.lan_mtu)

    def count_fast(self, rows: list[tuple[Any, ...]]) -> int:
        """Fold in what a cache outside the engine forwarded: per row (session, direction, protocol,
        packets, bytes, time of the last one[, packets on the wire]), what the fast path would
        have counted and refreshed (expiry, firewall hits, packet and byte counters). A
        super-packet is one packet for the rules and its segments for the interface counters
        (the last field, when given). A helper's entry (ESP pair, PPTP call) is refreshed by the
        helper (its ``fast_fold``). Returns the packets on the wire."""
        total = 0
        ctr = self.ctr
        folds = self.helpers_fold
        for row in rows:
            s, d, proto, pk, by, last = row[:6]
            wire = row[6] if len(row) > 6 else pk
            total += wire
            if proto == TCP or proto == UDP or proto == ICMP:
                if last > s.seen and not s.dead:
                    s.seen = last
            else:
                fold = folds.get(proto)
                if fold is not None:
                    fold(s, last)
            fw = s.fw
            hits = fw[1 + d] if fw is not None else None
            if hits:
                for r in hits:
                    r.pkts += pk
                    r.bytes += by
            i = proto_index(proto)
            if d == 0:
                ctr.forwarded(i, i + WAN_BASE, wire, by)
            else:
                ctr.forwarded(i + WAN_BASE, i, wire, by)
        return total
