"""IPv4 reassembly ("always defragment") and fragmentation on the egress MTU.

Reassembly is bounded in datagrams, bytes and time; each fragment is charged its
payload plus ``FRAG_OVERHEAD`` bytes (what holding it costs), so a flood of tiny
fragments meets the byte bound as a flood of big ones does, and a new datagram
in a full queue evicts the oldest at constant cost. Overlapping fragments make
the whole datagram invalid (dropped and counted), the safe choice of RFC 5722
applied to IPv4, so no fragment can overwrite already received data.
"""

from __future__ import annotations

from masqd.wire.ipv4 import IP_DF, IP_MF, IP_OFFMASK, Malformed, set_ip_checksum

FRAG_OVERHEAD = 64  # bytes charged per fragment held, beyond its payload


class _Datagram:
    __slots__ = ("header", "parts", "total", "received", "charged", "deadline")

    def __init__(self, deadline: float) -> None:
        self.header: bytes | None = None  # header of the first fragment
        self.parts: list[tuple[int, int, bytes]] = []  # (start, end, data)
        self.total = -1  # payload length once the last fragment is seen
        self.received = 0
        self.charged = 0  # payload + FRAG_OVERHEAD per fragment
        self.deadline = deadline


class Reassembler:
    def __init__(self, timeout: float, max_datagrams: int, max_bytes: int, counters: dict[str, int]) -> None:
        self.timeout = timeout
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.bytes = 0
        self._q: dict[bytes, _Datagram] = {}
        self._c = counters

    def _drop(self, key: bytes, reason: str) -> None:
        d = self._q.pop(key, None)
        if d is not None:
            self.bytes -= d.charged
        self._c[reason] = self._c.get(reason, 0) + 1

    def add(self, pkt: bytearray, ihl: int, now: float) -> bytearray | None:
        """Feed one fragment; return the whole datagram when complete, else None.

        Raises Malformed for fragments that can never be valid.
        """
        ff = (pkt[6] << 8) | pkt[7]
        off = (ff & IP_OFFMASK) << 3
        more = bool(ff & IP_MF)
        data = bytes(pkt[ihl:])
        n = len(data)
        if n == 0:
            raise Malformed("frag_empty")
        if more and n & 7:
            raise Malformed("frag_bad_length")
        end = off + n
        if end > 65535 - 20:
            raise Malformed("frag_too_long")
        key = bytes(pkt[12:20]) + bytes(pkt[4:6]) + bytes(pkt[9:10])
        d = self._q.get(key)
        if d is None:
            if len(self._q) >= self.max_datagrams:
                self._expire_oldest(now)
                if len(self._q) >= self.max_datagrams:
                    # evict the oldest datagram to make room (bounded memory)
                    oldest = next(iter(self._q))
                    self._drop(oldest, "drop_frag_evicted")
            d = _Datagram(now + self.timeout)
            self._q[key] = d
        for s, e, _ in d.parts:
            if off < e and s < end:
                self._drop(key, "drop_frag_overlap")
                return None
        if not more:
            if d.total >= 0 and d.total != end:
                self._drop(key, "drop_frag_inconsistent")
                return None
            d.total = end
        if d.total >= 0 and end > d.total:
            self._drop(key, "drop_frag_inconsistent")
            return None
        cost = n + FRAG_OVERHEAD
        if self.bytes + cost > self.max_bytes:
            self._drop(key, "drop_frag_memory")
            return None
        d.parts.append((off, end, data))
        d.received += n
        d.charged += cost
        self.bytes += cost
        if off == 0:
            d.header = bytes(pkt[:ihl])
        if d.total < 0 or d.received != d.total or d.header is None:
            return None
        del self._q[key]
        self.bytes -= d.charged
        d.parts.sort()
        hdr = bytearray(d.header)
        body = b"".join(p[2] for p in d.parts)
        tot = len(hdr) + len(body)
        if tot > 65535:
            raise Malformed("frag_too_long")
        hdr[2] = tot >> 8
        hdr[3] = tot & 255
        hdr[6] = (hdr[6] & 0x40)  # keep DF (should be clear), clear MF and offset
        hdr[7] = 0
        set_ip_checksum(hdr, len(hdr))
        hdr += body
        return hdr

    def _expire_oldest(self, now: float) -> None:
        """Drop the timed-out datagrams at the front (the oldest first: no walk of the queue)."""
        q = self._q
        while q:
            key = next(iter(q))
            if q[key].deadline > now:
                return
            self._drop(key, "drop_frag_timeout")

    def expire(self, now: float) -> None:
        for key in [k for k, d in self._q.items() if d.deadline <= now]:
            self._drop(key, "drop_frag_timeout")

    def __len__(self) -> int:
        return len(self._q)


def _copied_options(pkt: bytearray, ihl: int) -> bytes:
    """Options with the 'copied' bit, for fragments after the first."""
    out = bytearray()
    i = 20
    while i < ihl:
        t = pkt[i]
        if t == 0:
            break
        if t == 1:
            i += 1
            continue
        ln = pkt[i + 1]
        if t & 0x80:
            out += pkt[i : i + ln]
        i += ln
    while len(out) & 3:
        out.append(0)
    return bytes(out)


def fragment(pkt: bytearray, ihl: int, mtu: int) -> list[bytearray]:
    """Split ``pkt`` (DF clear) into fragments that fit ``mtu``."""
    ff = (pkt[6] << 8) | pkt[7]
    base_off = (ff & IP_OFFMASK) << 3
    last_more = bool(ff & IP_MF)
    payload = bytes(pkt[ihl:])
    first_hdr = bytes(pkt[:ihl])
    later_opts = _copied_options(pkt, ihl)
    out: list[bytearray] = []
    pos = 0
    first = True
    while pos < len(payload):
        h = first_hdr if first else first_hdr[:20] + later_opts
        room = (mtu - len(h)) & ~7
        if room <= 0:
            raise Malformed("mtu_too_small")
        chunk = payload[pos : pos + room]
        more = (pos + len(chunk) < len(payload)) or last_more
        f = bytearray(h)
        f[0] = 0x40 | (len(h) >> 2)
        tot = len(h) + len(chunk)
        f[2] = tot >> 8
        f[3] = tot & 255
        v = ((base_off + pos) >> 3) | (IP_MF if more else 0) | (ff & IP_DF)
        f[6] = v >> 8
        f[7] = v & 255
        set_ip_checksum(f, len(h))
        f += chunk
        out.append(f)
        pos += len(chunk)
        first = False
    return out
