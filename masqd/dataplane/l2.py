"""Ethernet host for a TAP interface: our MAC, ARP answers, a neighbour cache.

Sans-IO like the engine: ``rx(frame, now)`` returns the IPv4 packet to route
(or None) and queues any frames to send in ``out``; ``header(nexthop, pkt,
now)`` returns the Ethernet header to put in front of an outgoing packet, or
None when the next hop is still being resolved (the packet then waits in a
bounded per-neighbour queue). ``aging(now)`` says when a neighbour has aged
past ``reachable`` (a header cached outside, skipping ``lookup``, must then be
dropped so that its next use re-confirms it). A multicast next hop (224.0.0.0/4: the PCP/NAT-PMP
announcements to 224.0.0.1) needs no resolution: its MAC is 01:00:5e and the
address's low 23 bits (RFC 1112 section 6.4). ``tick(now)`` retransmits ARP requests and,
when resolution fails, moves the waiting packets to ``unreachable`` so the
data plane can answer their senders with ICMP host-unreachable
(:func:`icmp_host_unreachable`).

Neighbour states follow Linux in a reduced form: INCOMPLETE (resolving),
REACHABLE (confirmed within ``reachable`` seconds), STALE (still used, being
re-confirmed by unicast probes; removed when they go unanswered).

``silent``: the standby of an active/backup pair shares the segment and the
addresses with the active; it answers no ARP request and announces nothing
(it still learns its neighbours), until it takes over.
"""

from __future__ import annotations

import struct

ETH_IP = b"\x08\x00"
ETH_ARP = b"\x08\x06"
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
_ARP_HDR = struct.pack("!HHBB", 1, 0x0800, 6, 4)

INCOMPLETE, REACHABLE, STALE = 0, 1, 2


class Neighbour:
    __slots__ = ("ip", "mac", "hdr", "state", "confirmed", "aged", "probes", "next_probe", "queue")

    def __init__(self, ip: int) -> None:
        self.ip = ip
        self.mac = ZERO_MAC
        self.hdr = b""
        self.state = INCOMPLETE
        self.confirmed = 0.0
        self.aged = -1.0  # the confirmation whose age ``aging`` reported (-1: none)
        self.probes = 0
        self.next_probe = 0.0
        # packets waiting for the MAC, each with its virtio-net header (b"" when it has no offload work)
        self.queue: list[tuple[bytes | bytearray, bytes]] = []


def multicast_mac(group: int) -> bytes:
    """The Ethernet address of an IPv4 multicast group (RFC 1112 section 6.4)."""
    return b"\x01\x00\x5e" + (group & 0x7FFFFF).to_bytes(3, "big")


def _bump(counters: dict[str, int], key: str, n: int = 1) -> None:
    counters[key] = counters.get(key, 0) + n


class EthernetHost:
    """masqd's presence on one Ethernet segment (one TAP device)."""

    def __init__(
        self,
        iface: str,
        mac: bytes,
        ip: int,
        prefixlen: int,
        counters: dict[str, int],
        *,
        reachable: float = 60.0,
        retrans: float = 1.0,
        probes: int = 3,
        queue_len: int = 16,
        max_incomplete: int = 256,
        max_entries: int = 4096,
    ) -> None:
        self.iface = iface
        self.mac = mac
        self.counters = counters
        self.reachable = reachable
        self.retrans = retrans
        self.max_probes = probes
        self.queue_len = queue_len
        self.max_incomplete = max_incomplete
        self.max_entries = max_entries
        self.neigh: dict[int, Neighbour] = {}
        self.probing: dict[int, Neighbour] = {}  # INCOMPLETE and STALE entries
        self.version = 0  # bumped when a known MAC changes or an entry goes: header caches drop
        self.next_aging = float("inf")  # no REACHABLE entry passes ``reachable`` before this
        self.out: list[bytes] = []  # frames to write
        self.unreachable: list[tuple[int, bytes | bytearray]] = []  # (next hop, packet) that failed
        self.out_offload: list[tuple[bytes, bytes]] = []  # (virtio-net header, frame) released from queues
        self.ip = 0
        self.net = 0
        self.mask = 0
        self.silent = False
        self.set_address(ip, prefixlen, None)

    # ------------------------------------------------------------------ address

    def set_address(self, ip: int, prefixlen: int, now: float | None) -> None:
        """Take a (new) address; announce it with a gratuitous ARP when ``now`` is given."""
        self.version += 1
        self.ip = ip
        self.mask = (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF if prefixlen else 0
        self.net = ip & self.mask
        if now is not None:
            self.gratuitous()

    def gratuitous(self) -> None:
        if self.silent:
            return
        self.out.append(self._arp(1, BROADCAST, ZERO_MAC, self.ip, self.ip))
        _bump(self.counters, f"arp_{self.iface}_gratuitous")

    # ------------------------------------------------------------------ receive

    def rx(self, frame: bytes | bytearray, now: float) -> bytes | bytearray | None:
        """One received frame -> the IPv4 packet inside it for the router, or None."""
        return self.rx_at(frame, 0, now)

    def rx_at(self, buf: bytes | bytearray, off: int, now: float) -> bytes | bytearray | None:
        """:meth:`rx` for a frame that starts at ``buf[off]`` (after a virtio-net header)."""
        n = len(buf) - off
        # fast path: IPv4 unicast to our MAC (no slices before the one that is the packet)
        if n >= 34 and buf[off + 12] == 8 and buf[off + 13] == 0 and buf.startswith(self.mac, off):
            tl = (buf[off + 16] << 8) | buf[off + 17]
            if 20 <= tl < n - 14:
                return buf[off + 14: off + 14 + tl]  # without the padding of short frames
            return buf[off + 14:]
        if n < 14:
            _bump(self.counters, "drop_l2_runt")
            return None
        frame = buf[off:] if off else buf
        dst = frame[0:6]
        etype = frame[12:14]
        if etype == ETH_IP:
            # flooded unicast for another host, IP broadcast/multicast (not routed), or a runt
            _bump(self.counters, "drop_l2_not_for_us" if dst != self.mac else "drop_l2_runt")
            return None
        if etype == ETH_ARP:
            if dst != self.mac and dst != BROADCAST:
                _bump(self.counters, "drop_l2_not_for_us")
                return None
            self._arp_rx(frame, now)
            return None
        _bump(self.counters, "drop_non_ipv4")
        return None

    def _arp_rx(self, frame: bytes | bytearray, now: float) -> None:
        c = self.counters
        if len(frame) < 42 or frame[14:20] != _ARP_HDR:
            _bump(c, "drop_arp_malformed")
            return
        op = (frame[20] << 8) | frame[21]
        sha = bytes(frame[22:28])
        spa = int.from_bytes(frame[28:32], "big")
        tpa = int.from_bytes(frame[38:42], "big")
        if op not in (1, 2) or sha[0] & 1 or sha == ZERO_MAC:
            _bump(c, "drop_arp_malformed")
            return
        _bump(c, f"arp_{self.iface}_rx")
        if sha == self.mac:
            return  # our own frame reflected
        if spa == self.ip and self.ip:
            _bump(c, f"arp_{self.iface}_conflict")
            return
        n = self.neigh.get(spa) if spa else None
        if n is not None:
            self._confirm(n, sha, now)
        elif spa and tpa == self.ip and (spa & self.mask) == self.net:
            n = self._new(spa)
            if n is not None:
                self._confirm(n, sha, now)
        if op == 1 and tpa == self.ip and self.ip and not self.silent:
            self.out.append(self._arp(2, sha, sha, self.ip, spa))
            _bump(c, f"arp_{self.iface}_replies")

    def _confirm(self, n: Neighbour, mac: bytes, now: float) -> None:
        if n.mac != mac:
            n.mac = mac
            n.hdr = mac + self.mac + ETH_IP
            self.version += 1
        n.state = REACHABLE
        n.confirmed = now
        if now + self.reachable < self.next_aging:
            self.next_aging = now + self.reachable
        n.probes = 0
        self.probing.pop(n.ip, None)
        if n.queue:
            q, n.queue = n.queue, []
            for pkt, vh in q:
                if vh:
                    self.out_offload.append((vh, n.hdr + bytes(pkt)))
                else:
                    self.out.append(n.hdr + bytes(pkt))

    def _new(self, ip: int) -> Neighbour | None:
        if len(self.neigh) >= self.max_entries:
            # evict the oldest entry that is not being resolved (insertion order)
            for old_ip, old in self.neigh.items():
                if old.state != INCOMPLETE:
                    del self.neigh[old_ip]
                    self.version += 1
                    self.probing.pop(old_ip, None)
                    _bump(self.counters, f"arp_{self.iface}_evicted")
                    break
            else:
                return None
        n = Neighbour(ip)
        self.neigh[ip] = n
        return n

    # ------------------------------------------------------------------ send

    def lookup(self, nexthop: int, now: float) -> bytes | None:
        """Ethernet header towards ``nexthop`` if its MAC is known (nothing is queued), else None."""
        n = self.neigh.get(nexthop)
        if n is None and nexthop >> 28 == 14:  # IPv4 multicast: mapped, never resolved
            return multicast_mac(nexthop) + self.mac + ETH_IP
        if n is not None and n.state != INCOMPLETE:
            if n.state == REACHABLE and now - n.confirmed > self.reachable:
                n.state = STALE
                n.probes = 0
                n.next_probe = now
                self.probing[nexthop] = n
            return n.hdr
        return None

    def header(self, nexthop: int, pkt: bytes | bytearray, now: float, vh: bytes = b"") -> bytes | None:
        """Ethernet header for ``pkt`` towards ``nexthop``; None if it was queued or dropped.

        ``vh``: the packet's virtio-net header when it carries offload work; it is
        kept with the packet in the queue and the frame leaves in ``out_offload``.
        """
        h = self.lookup(nexthop, now)
        if h is not None:
            return h
        n = self.neigh.get(nexthop)
        c = self.counters
        if n is None:
            if len(self.probing) >= self.max_incomplete:
                _bump(c, "drop_arp_table_full")
                return None
            n = self._new(nexthop)
            if n is None:
                _bump(c, "drop_arp_table_full")
                return None
            self.probing[nexthop] = n
            self._solicit(n, now)
        if len(n.queue) >= self.queue_len:
            n.queue.pop(0)
            _bump(c, "drop_arp_queue_full")
        n.queue.append((pkt, vh))
        return None

    def _solicit(self, n: Neighbour, now: float) -> None:
        dst = n.mac if n.state == STALE else BROADCAST
        self.out.append(self._arp(1, dst, ZERO_MAC, self.ip, n.ip))
        _bump(self.counters, f"arp_{self.iface}_requests")
        n.probes += 1
        n.next_probe = now + self.retrans

    def aging(self, now: float) -> bool:
        """Whether a REACHABLE neighbour has passed ``reachable`` since its confirmation (each
        confirmation reported once). Its next use (``lookup``) makes it STALE and probes it; a
        header cached elsewhere (the data plane's flow cache) skips ``lookup``, so its holder
        drops it when this says so."""
        if now < self.next_aging:
            return False
        due = False
        nxt = float("inf")
        for n in self.neigh.values():
            if n.state != REACHABLE or n.aged == n.confirmed:
                continue
            t = n.confirmed + self.reachable
            if now > t:
                n.aged = n.confirmed
                due = True
            elif t < nxt:
                nxt = t
        self.next_aging = nxt
        return due

    def tick(self, now: float) -> None:
        """Retransmit ARP requests; give up on silent neighbours."""
        if not self.probing:
            return
        for ip, n in list(self.probing.items()):
            if n.next_probe > now:
                continue
            if n.probes < self.max_probes:
                self._solicit(n, now)
                continue
            del self.probing[ip]
            self.neigh.pop(ip, None)
            self.version += 1
            if n.state == INCOMPLETE:
                _bump(self.counters, f"arp_{self.iface}_failed")
                for pkt, _vh in n.queue:
                    self.unreachable.append((ip, pkt))
                _bump(self.counters, "drop_arp_unresolved", len(n.queue))
            else:
                _bump(self.counters, f"arp_{self.iface}_stale_removed")

    # ------------------------------------------------------------------ helpers

    def _arp(self, op: int, eth_dst: bytes, tha: bytes, spa: int, tpa: int) -> bytes:
        frame = (
            eth_dst + self.mac + ETH_ARP + _ARP_HDR + struct.pack("!H", op) + self.mac
            + spa.to_bytes(4, "big") + tha + tpa.to_bytes(4, "big")
        )
        return frame + b"\x00" * (60 - len(frame))

    def table(self, now: float) -> list[dict[str, object]]:
        """The neighbour cache, for display."""
        names = {INCOMPLETE: "incomplete", REACHABLE: "reachable", STALE: "stale"}
        return [
            {
                "ip": ".".join(str(b) for b in n.ip.to_bytes(4, "big")),
                "mac": ":".join(f"{b:02x}" for b in n.mac),
                "state": names[n.state],
                "age": round(now - n.confirmed, 1) if n.state != INCOMPLETE else None,
                "queued": len(n.queue),
            }
            for n in self.neigh.values()
        ]


def _csum(data: bytes | bytearray) -> int:
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


# ICMP types that are queries (an error may be sent about them), RFC 1122 3.2.2
_ICMP_QUERIES = frozenset({0, 8, 13, 14, 15, 16, 17, 18})


def icmp_host_unreachable(pkt: bytes | bytearray, src: int, code: int = 1) -> bytes | None:
    """ICMP destination unreachable (default: host) from ``src`` about ``pkt``, to its sender.

    None when RFC 1122 forbids an error about this packet (a non-first
    fragment, an ICMP error, a broadcast/multicast or zero source).
    """
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        return None
    ihl = (pkt[0] & 15) * 4
    if ihl < 20 or len(pkt) < ihl:
        return None
    if ((pkt[6] << 8) | pkt[7]) & 0x1FFF:
        return None
    if pkt[9] == 1 and (len(pkt) <= ihl or pkt[ihl] not in _ICMP_QUERIES):
        return None
    sender = int.from_bytes(pkt[12:16], "big")
    if sender == 0 or sender >> 28 in (14, 15) or sender == 0xFFFFFFFF:
        return None
    quote = bytes(pkt[: ihl + 8])
    icmp = bytearray(b"\x03" + bytes([code]) + b"\x00" * 6 + quote)
    struct.pack_into("!H", icmp, 2, _csum(icmp))
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, 20 + len(icmp), 0, 0, 64, 1, 0,
                               src.to_bytes(4, "big"), bytes(pkt[12:16])))
    struct.pack_into("!H", ip, 10, _csum(ip))
    return bytes(ip + icmp)
