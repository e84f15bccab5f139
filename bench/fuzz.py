#!/usr/bin/env python3
"""Hostile input for the engine: millions of random and mutated packets, then the flow cache against Python.

One job: show that bad packets change nothing. A generator plays LAN hosts and
remote peers holding real conversations through a real ``Engine`` with its
helpers and forwarders on (UDP, ICMP echo, TCP, ICMP errors about live flows,
fragments, ISAKMP + ESP, PPTP control on TCP 1723 with its GRE, a port forward
to a LAN server, an ipfwd protocol forward, firewall rules that deny, reject and
log, hairpinning, packets for masqd itself), both directions, on a fake clock
that moves forward (small steps, now and then a jump of minutes). Between the
valid packets go mutants of them: bit flips, truncation, garbage appended,
length lies (IPv4 total length and IHL, UDP length, TCP data offset, ISAKMP and
PPTP lengths, GRE flags), IP and TCP option garbage, overlapping / duplicated /
tiny fragments, random SPIs, cookies, Call IDs and ports, spoofed and odd
addresses, TTL 0/1, PPTP control segments split or shifted, pure junk. Most
mutants get their IPv4 header checksum (often their TCP/UDP/ICMP checksum too)
made right again, so that they get past the first checks. Now and then an
admin step: a reload (two configurations in turn: other rules, filtering, port
range, a small ``max_entries``, flush on address change), a new WAN address, a
flush, the table listed.

Checked, per worker: no packet raised (the engine counts ``drop_internal_error``
for anything that did; other calls raising are caught here and counted too);
the bytes out are sane (every output has a correct IPv4 header checksum when
its input had one; outputs of valid packets carry correct TCP/UDP/ICMP
checksums; PPTP Call IDs come back as the client chose them, GRE keys too);
RSS sampled along the way; and after the clock is moved past every timeout,
the table, the helpers' tables and every container the engine holds are back
to their size at the start. A finding prints the seed, the packet's index and
its bytes: ``--workers 1 --seed S --packets N`` replays it exactly (the engine
and the generator are deterministic).

The differential run (``--diff-packets``, on by default) feeds the same random
streams, framed as the devices carry them (TUN and TAP, with and without
virtio-net headers), to two data planes over socket pairs, one with the C flow
cache and one Python only (tests/dataplane/diffharness.py), and requires the
same bytes out, packet for packet, and the same counters, table and rule hits
at the end.

Usage: ``.venv/bin/python bench/fuzz.py [--packets N] [--seed S] [--workers W]
[--diff-packets N] [--quick] [--json FILE]`` (defaults: 10 million packets
over all CPUs, 200 000 differential packets; ``--quick``: 50 000 and 8 000).
Exit status 0 only if every check held.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import multiprocessing
import os
import random
import struct
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from masqd.config import Config, loads  # noqa: E402
from masqd.engine import Engine  # noqa: E402

# ---------------------------------------------------------------------------------------------
# addresses (RFC 5737 / 198.18.0.0/15 outside, 10/8 inside) and the configurations


def ip(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


HOSTS = [ip(f"10.0.0.{i}") for i in range(2, 10)]
REMOTES = [ip(f"198.51.100.{i}") for i in range(1, 9)] + [ip("198.18.0.1"), ip("198.18.7.9")]
ROUTER = ip("198.51.100.254")
WAN_ADDRS = [ip("203.0.113.200"), ip("203.0.113.201")]
LAN_IP = ip("10.0.0.1")
TCP_SERVER, UDP_SERVER, GRE_SERVER = ip("10.0.0.3"), ip("10.0.0.4"), ip("10.0.0.7")
TCP_FWD, UDP_FWD = 8080, 5060
ODD_ADDRS = [0, 0xFFFFFFFF, ip("127.0.0.1"), ip("224.0.0.1"), ip("240.0.0.1"), ip("10.255.255.255"),
             ip("203.0.113.255"), ip("203.0.113.0"), LAN_IP, ip("169.254.1.1")]

RULES_A = """
ipchains -A input -p tcp -d 0/0 23 -j DENY -l
ipchains -A forward -p tcp -s 10.0.0.8 -d 0/0 25 -j REJECT
ipchains -A forward -p udp -s 10.0.0.9 -d 198.51.100.6 -j DENY
ipchains -A forward -p icmp -s 0/0 13 -j DENY
ipchains -A forward -s 10.0.0.0/8 -j MASQ
"""
RULES_B = """
ipchains -M -S 3600 60 90
ipchains -A input -p udp -d 0/0 9 -j REJECT
ipchains -A forward -p tcp -s 10.0.0.5 -d 198.51.100.7 -j DENY -l
ipchains -A forward -s 10.0.0.0/8 -j MASQ
ipchains -A output -p icmp -d 198.51.100.8 -j DENY
"""
FORWARDS = f"""
[forwarding]
portfw = [
  {{proto = "tcp", port = {TCP_FWD}, to = "10.0.0.3", to_port = 80}},
  {{proto = "udp", port = {UDP_FWD}, to = "10.0.0.4", to_port = {UDP_FWD}}},
]
protofw = [{{proto = 47, to = "10.0.0.7"}}]
"""
# Config B: other rules and filtering, a port range that excludes live mappings, a small table
# (table-full), a flush on address change, IPsec parallel sessions and short pending times.
EXTRA_B = """
[masquerade]
inbound_filtering = "endpoint-independent"
port_preservation = false
ports = [20000, 40000]
max_entries = 3000
[ipsec]
parallel_sessions = true
pending_lifetime = 20
[pptp]
max_calls_per_server = 8
"""


def engine_config(variant: str, wan_mtu: int = 1400) -> str:
    """The fuzz's configuration "a" or "b" as TOML (the [lan]/[wan] sections included)."""
    wan_extra = 'dynaddr_mode = "flush"\n' if variant == "b" else ""
    return (f'[lan]\naddress = "10.0.0.1/8"\nmtu = 1500\n'
            f'[wan]\naddress = "203.0.113.200/24"\ngateway = "203.0.113.1"\nmtu = {wan_mtu}\n{wan_extra}'
            f'[firewall]\n{firewall_body(variant)}{FORWARDS}{EXTRA_B if variant == "b" else ""}')


def firewall_body(variant: str) -> str:
    return f'rules = """{RULES_B if variant == "b" else RULES_A}"""\n'


def configs() -> dict[str, Config]:
    return {v: loads(engine_config(v)) for v in ("a", "b")}


# ---------------------------------------------------------------------------------------------
# packets, built and checked here (not with masqd's own code: it is what is under test)

_LE = sys.byteorder == "little"
_IPH = struct.Struct("!BBHHHBBHII")
_TCPH = struct.Struct("!HHIIBBHHH")
_UDPH = struct.Struct("!HHHH")
M32 = 0xFFFFFFFF
FIN, SYN, RST, PSH, ACK = 1, 2, 4, 8, 16


def ones(data: bytes | bytearray) -> int:
    """Ones-complement sum of the 16-bit big-endian words of ``data``, folded."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    s = sum(memoryview(data).cast("H"))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ((s & 0xFF) << 8 | s >> 8) if _LE else s


def csum(data: bytes | bytearray, start: int = 0) -> int:
    s = ones(data) + start
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def pseudo(src: int, dst: int, proto: int, n: int) -> int:
    return (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + proto + n


def ipv4(src: int, dst: int, proto: int, payload: bytes, ttl: int = 64, ident: int = 0, frag: int = 0,
         tos: int = 0, opts: bytes = b"") -> bytes:
    ihl = 5 + (len(opts) >> 2)
    h = bytearray(_IPH.pack(0x40 | ihl, tos, 4 * ihl + len(payload), ident & 0xFFFF, frag, ttl, proto, 0, src, dst))
    h += opts
    c = csum(h)
    h[10], h[11] = c >> 8, c & 255
    return bytes(h) + payload


def l4(src: int, dst: int, proto: int, seg: bytearray, off: int, udp: bool = False) -> bytes:
    c = csum(seg, pseudo(src, dst, proto, len(seg)))
    if udp and c == 0:
        c = 0xFFFF
    seg[off], seg[off + 1] = c >> 8, c & 255
    return bytes(seg)


def udp(src: int, dst: int, sp: int, dp: int, payload: bytes, zero: bool = False, **kw: Any) -> bytes:
    seg = bytearray(_UDPH.pack(sp, dp, 8 + len(payload), 0)) + payload
    return ipv4(src, dst, 17, bytes(seg) if zero else l4(src, dst, 17, seg, 6, True), **kw)


def tcp(src: int, dst: int, sp: int, dp: int, seq: int, ack: int, flags: int, payload: bytes = b"",
        opts: bytes = b"", win: int = 29200, **kw: Any) -> bytes:
    doff = (20 + len(opts)) >> 2
    seg = bytearray(_TCPH.pack(sp, dp, seq & M32, ack & M32, doff << 4, flags, win, 0, 0)) + opts + payload
    return ipv4(src, dst, 6, l4(src, dst, 6, seg, 16), **kw)


def icmp(src: int, dst: int, typ: int, code: int, rest: int, body: bytes, **kw: Any) -> bytes:
    m = bytearray(struct.pack("!BBHI", typ, code, 0, rest & M32)) + body
    c = csum(m)
    m[2], m[3] = c >> 8, c & 255
    return ipv4(src, dst, 1, bytes(m), **kw)


def gre1(src: int, dst: int, cid: int, payload: bytes, seq: int | None = None, ack: int | None = None) -> bytes:
    """Enhanced GRE (PPTP): key present, version 1, PPP; optional sequence and acknowledgment."""
    b0 = 0x20 | (0x10 if seq is not None else 0)
    b1 = 0x01 | (0x80 if ack is not None else 0)
    h = struct.pack("!BBHHH", b0, b1, 0x880B, len(payload), cid)
    if seq is not None:
        h += struct.pack("!I", seq & M32)
    if ack is not None:
        h += struct.pack("!I", ack & M32)
    return ipv4(src, dst, 47, h + payload)


def isakmp(icookie: bytes, rcookie: bytes, exch: int, msgid: int, body: bytes, flags: int = 0) -> bytes:
    n = 28 + len(body)
    return icookie + rcookie + struct.pack("!BBBBII", 1, 0x10, exch, flags, msgid, n) + body


PPTP_LEN = {1: 156, 2: 156, 3: 16, 4: 16, 5: 16, 6: 20, 7: 168, 8: 32, 9: 220, 10: 24, 11: 28, 12: 16,
            13: 148, 14: 40, 15: 24}


def pptp(ctype: int, f12: int = 0, f14: int = 0, result: int | None = None) -> bytes:
    n = PPTP_LEN[ctype]
    b = bytearray(n)
    struct.pack_into("!HHIH", b, 0, n, 1, 0x1A2B3C4D, ctype)
    if ctype in (1, 2):
        b[12:14] = b"\x01\x00"  # protocol version 1.0
    else:
        struct.pack_into("!HH", b, 12, f12 & 0xFFFF, f14 & 0xFFFF)
    if result is not None:
        b[12 if n == 16 else 16] = result
    return bytes(b)


def ihl_of(p: bytes) -> int:
    return (p[0] & 15) << 2


def is_frag(p: bytes) -> bool:
    return bool(((p[6] << 8) | p[7]) & 0x3FFF)


def ip_ok(p: bytes) -> bool:
    """A well-formed IPv4 header with a correct checksum."""
    if len(p) < 20 or p[0] >> 4 != 4:
        return False
    n = ihl_of(p)
    return n >= 20 and len(p) >= n and csum(p[:n]) == 0


def l4_ok(p: bytes) -> bool:
    """TCP/UDP/ICMP checksum of a whole (unfragmented) packet; True for other protocols."""
    n = ihl_of(p)
    proto = p[9]
    tot = (p[2] << 8) | p[3]
    seg = p[n:tot]
    if proto == 1:
        return csum(seg) == 0
    if proto not in (6, 17):
        return True
    if proto == 17 and len(seg) >= 8 and seg[6:8] == b"\0\0":
        return True
    src, dst = struct.unpack_from("!II", p, 12)
    return csum(seg, pseudo(src, dst, proto, len(seg))) == 0


def fix_ip(b: bytearray) -> None:
    if len(b) >= 20:
        n = ihl_of(bytes(b[:1]) + b"\0")
        if 20 <= n <= len(b):
            b[10] = b[11] = 0
            c = csum(b[:n])
            b[10], b[11] = c >> 8, c & 255


def fix_l4(b: bytearray) -> None:
    """Make the TCP/UDP/ICMP checksum right for the bytes as they are (if the header allows)."""
    if len(b) < 20:
        return
    n = (b[0] & 15) << 2
    if n < 20 or is_frag(bytes(b[:8])):
        return
    tot = min(len(b), (b[2] << 8) | b[3])
    proto = b[9]
    seg = bytearray(b[n:tot])
    off = {6: 16, 17: 6, 1: 2}.get(proto)
    if off is None or len(seg) < off + 2:
        return
    seg[off] = seg[off + 1] = 0
    if proto == 1:
        c = csum(seg)
    else:
        src, dst = struct.unpack_from("!II", b, 12)
        c = csum(seg, pseudo(src, dst, proto, len(seg))) or (0xFFFF if proto == 17 else 0)
    b[n + off], b[n + off + 1] = c >> 8, c & 255


def fragments(p: bytes, r: random.Random, size: int | None = None) -> list[bytes]:
    """Valid fragments of ``p`` (offsets in 8-byte units, MF on all but the last)."""
    n = ihl_of(p)
    hdr, data = bytearray(p[:n]), p[n:]
    size = size or r.choice([8, 16, 64, 512, 1200, 1480])
    size = max(8, size - size % 8)
    out = []
    for off in range(0, len(data), size):
        chunk = data[off:off + size]
        h = bytearray(hdr)
        mf = 0x2000 if off + size < len(data) else 0
        struct.pack_into("!H", h, 2, n + len(chunk))
        struct.pack_into("!H", h, 6, mf | (off >> 3))
        h[10] = h[11] = 0
        c = csum(h)
        h[10], h[11] = c >> 8, c & 255
        out.append(bytes(h) + chunk)
    return out


# ---------------------------------------------------------------------------------------------
# the world: the clock, the current WAN address, recent outputs, findings


class World:
    def __init__(self, r: random.Random) -> None:
        self.r = r
        self.now = 1000.0
        self.wan = WAN_ADDRS[0]
        self.recent: deque[tuple[str, bytes]] = deque(maxlen=64)
        self.findings: list[dict[str, Any]] = []
        self.nfindings = 0
        self.index = 0  # the current packet's index in the stream
        self.stats = {"conv_done": 0, "conv_broken": 0}

    def finding(self, kind: str, **kw: Any) -> None:
        self.nfindings += 1
        if len(self.findings) < 20:
            self.findings.append({"kind": kind, "index": self.index, **kw})


def out_on(outs: list[tuple[str, bytes]], iface: str, proto: int) -> bytes | None:
    """The first output on ``iface`` of ``proto`` that is not a non-first fragment."""
    for oif, p in outs:
        if oif == iface and len(p) >= 20 and p[9] == proto and not ((p[6] << 8 | p[7]) & 0x1FFF):
            return p
    return None


Pkt = tuple[str, bytes]


class Conv:
    """A conversation: ``next`` gives its next valid packet(s), ``saw`` what masqd made of them."""

    done = False
    tainted = False  # a mutant of one of its packets was sent: no semantic checks

    def __init__(self, w: World) -> None:
        return None

    def next(self, w: World) -> list[Pkt]:
        raise NotImplementedError

    def saw(self, w: World, iface: str, pkt: bytes, outs: list[tuple[str, bytes]]) -> None:
        return None

    def broken(self, w: World) -> None:
        if not self.done:
            w.stats["conv_broken"] += 1
        self.done = True

    def finish(self, w: World) -> list[Pkt]:
        if not self.done:
            w.stats["conv_done"] += 1
        self.done = True
        return []


class Udp(Conv):
    def __init__(self, w: World, lan: int | None = None, lport: int | None = None) -> None:
        r = w.r
        self.lan = lan or r.choice(HOSTS)
        self.lport = lport or r.choice([r.randrange(1024, 65536), 53, 123, 5000 + r.randrange(8)])
        self.rem = r.choice(REMOTES)
        self.rport = r.choice([53, 123, 5201, 4500, 33434, 9, r.randrange(1, 65536)])
        self.n = r.randrange(2, 30)
        self.wport: int | None = None
        self.queue: list[Pkt] = []
        self.zero = r.random() < 0.1

    def next(self, w: World) -> list[Pkt]:
        if self.queue:
            return [self.queue.pop(0)]
        if self.n <= 0:
            return self.finish(w)
        self.n -= 1
        r = w.r
        size = r.choice([0, 1, 20, 100, 512]) if r.random() > 0.04 else r.randrange(1400, 4000)
        payload = r.randbytes(size)
        out = self.wport is None or r.random() < 0.5
        ident = r.getrandbits(16)
        if out:
            p = udp(self.lan, self.rem, self.lport, self.rport, payload, self.zero, ident=ident,
                    frag=0x4000 if r.random() < 0.3 and size < 1400 else 0, ttl=r.choice([64, 64, 64, 2, 1]))
            iface = "lan"
        else:
            assert self.wport is not None
            p = udp(self.rem, w.wan, self.rport, self.wport, payload, self.zero, ident=ident)
            iface = "wan"
        if len(p) > 1500 or r.random() < 0.02:
            frs = fragments(p, r, 1480 if len(p) > 1500 and r.random() < 0.7 else None)
            if r.random() < 0.2:
                r.shuffle(frs)
            self.queue = [(iface, f) for f in frs[1:]]
            return [(iface, frs[0])]
        return [(iface, p)]

    def saw(self, w: World, iface: str, pkt: bytes, outs: list[tuple[str, bytes]]) -> None:
        if iface == "lan" and self.wport is None:
            o = out_on(outs, "wan", 17)
            if o is not None:
                n = ihl_of(o)
                self.wport = (o[n] << 8) | o[n + 1]


class Echo(Conv):
    def __init__(self, w: World) -> None:
        r = w.r
        self.lan = r.choice(HOSTS)
        self.rem = r.choice(REMOTES + [LAN_IP])
        self.ident = r.getrandbits(16)
        self.seq = 0
        self.n = r.randrange(2, 12)
        self.wid: int | None = None
        self.ts = r.random() < 0.1  # timestamp request / reply instead of echo

    def next(self, w: World) -> list[Pkt]:
        if self.n <= 0:
            return self.finish(w)
        self.n -= 1
        r = w.r
        body = r.randbytes(12 if self.ts else r.choice([0, 8, 56, 1472]))
        if self.wid is None or self.rem == LAN_IP or r.random() < 0.5:
            self.seq += 1
            return [("lan", icmp(self.lan, self.rem, 13 if self.ts else 8, 0, self.ident << 16 | self.seq, body))]
        return [("wan", icmp(self.rem, w.wan, 14 if self.ts else 0, 0, self.wid << 16 | self.seq, body))]

    def saw(self, w: World, iface: str, pkt: bytes, outs: list[tuple[str, bytes]]) -> None:
        if iface == "lan" and self.wid is None:
            o = out_on(outs, "wan", 1)
            if o is not None:
                n = ihl_of(o)
                self.wid = (o[n + 4] << 8) | o[n + 5]


class Tcp(Conv):
    """A TCP connection, both ends played here: A opens it (a LAN client, or a remote client of
    the port forward), B answers. Sequence numbers are kept right; data is delivered only as far as
    masqd passed it (a helper may trim a segment); no output for a valid packet ends the connection."""

    def __init__(self, w: World, kind: str = "plain") -> None:
        r = w.r
        self.kind = kind
        self.fwd = kind == "portfw"
        if self.fwd:
            self.a, self.ap = r.choice(REMOTES), r.randrange(1024, 65536)
            self.b, self.bp = TCP_SERVER, 80
        else:
            self.a, self.ap = r.choice(HOSTS), r.randrange(1024, 65536)
            self.b = r.choice(REMOTES)
            self.bp = 1723 if kind == "pptp" else r.choice([80, 443, 25, 22, 5201, 23])
        self.isn = [r.getrandbits(32), r.getrandbits(32)]
        self.stream = [bytearray(), bytearray()]
        self.sent = [0, 0]
        self.rcvd = [bytearray(), bytearray()]
        self.fin = [False, False]
        self.phase = "syn"
        self.wport: int | None = None
        self.app: PptpApp | None = PptpApp(self, r) if kind == "pptp" else None
        self.rounds = r.randrange(1, 6)
        self.closer = 0
        self.idle = 0

    # addressing: which interface each end's packets arrive on, and where its packets come out
    def iface(self, side: int) -> str:
        return ("wan" if side == 0 else "lan") if self.fwd else ("lan" if side == 0 else "wan")

    def build(self, w: World, side: int, flags: int, payload: bytes = b"", opts: bytes = b"") -> Pkt:
        other = 1 - side
        seq = self.isn[side] + (0 if flags & SYN else 1 + self.sent[side])
        ack = self.isn[other] + 1 + len(self.rcvd[side]) + (1 if self.fin[other] else 0) if flags & ACK else 0
        if side == 0 and self.fwd:
            p = tcp(self.a, w.wan, self.ap, TCP_FWD, seq, ack, flags, payload, opts)
        elif side == 0:
            p = tcp(self.a, self.b, self.ap, self.bp, seq, ack, flags, payload, opts)
        elif self.fwd:
            p = tcp(self.b, self.a, self.bp, self.ap, seq, ack, flags, payload, opts)
        else:
            if self.wport is None:
                return ("", b"")
            p = tcp(self.b, w.wan, self.bp, self.wport, seq, ack, flags, payload, opts)
        return (self.iface(side), p)

    def next(self, w: World) -> list[Pkt]:
        r = w.r
        ph = self.phase
        if ph == "syn":
            opts = r.choice([b"", b"\x02\x04\x05\xb4", b"\x02\x04\x05\xb4\x04\x02\x01\x03\x03\x07",
                             b"\x02\x04\xff\xff\x01\x01\x08\x0a" + r.randbytes(8) + b"\x00\x00"])
            self.phase = "synack"
            return [self.build(w, 0, SYN, opts=opts)]
        if ph == "synack":
            self.phase = "ack"
            return self.checked([self.build(w, 1, SYN | ACK, opts=b"\x02\x04\x05\x78")], w)
        if ph == "ack":
            self.phase = "data"
            return [self.build(w, 0, ACK)]
        if ph == "data":
            if self.app is not None:
                extra = self.app.step(w)
                if extra:
                    return extra
            pending = [s for s in (0, 1) if len(self.stream[s]) > self.sent[s]]
            if not pending:
                if self.app is None and self.rounds > 0:
                    self.rounds -= 1
                    side = r.randrange(2)
                    self.stream[side] += r.randbytes(r.choice([1, 100, 1000, 3000]))
                    return self.next(w)
                if self.app is not None and not self.app.finished and self.idle < 4:
                    self.idle += 1  # waiting for the other end (which may never answer)
                    return [self.build(w, r.randrange(2), ACK)]
                self.phase = "fin" if r.random() > 0.1 else "rst"
                return [self.build(w, r.randrange(2), ACK)]
            self.idle = 0
            side = r.choice(pending)
            left = len(self.stream[side]) - self.sent[side]
            n = min(left, 1300)
            if r.random() < 0.4:
                n = r.randint(1, n)  # a message split across segments
            data = bytes(self.stream[side][self.sent[side]:self.sent[side] + n])
            return [self.build(w, side, PSH | ACK, data)]
        if ph == "rst":
            self.phase = "end"
            return [self.build(w, r.randrange(2), RST | ACK)]
        if ph == "fin":
            self.closer = r.randrange(2)
            self.phase = "finack"
            return [self.build(w, self.closer, FIN | ACK)]
        if ph == "finack":
            self.phase = "lastack"
            return [self.build(w, 1 - self.closer, FIN | ACK)]
        if ph == "lastack":
            self.phase = "end"
            return [self.build(w, self.closer, ACK)]
        return self.finish(w)

    def checked(self, pkts: list[Pkt], w: World) -> list[Pkt]:
        if pkts and not pkts[0][0]:  # B cannot answer: A's SYN never came out
            self.broken(w)
            return []
        return pkts

    def saw(self, w: World, iface: str, pkt: bytes, outs: list[tuple[str, bytes]]) -> None:
        if pkt[9] == 47:
            if self.app is not None:
                self.app.saw_gre(w, iface, pkt, outs)
            return
        side = 0 if iface == self.iface(0) else 1
        o = out_on(outs, self.iface(1 - side), 6)
        n = ihl_of(pkt)
        flags = pkt[n + 13]
        if o is None:
            if self.phase != "end":
                self.broken(w)  # refused (a rule), or state upset by a mutant or an admin step
            return
        on = ihl_of(o)
        if side == 0 and not self.fwd and self.wport is None:
            self.wport = (o[on] << 8) | o[on + 1]
        payload = o[on + ((o[on + 12] >> 4) << 2):(o[2] << 8) | o[3]]
        if payload:
            self.rcvd[1 - side] += payload
            self.sent[side] += len(payload)
        if flags & FIN:
            self.fin[side] = True


class PptpApp:
    """Both ends of a PPTP control connection (A the client, PNS; B the server, PAC), its call
    and the call's GRE. Checks that masqd hands each end the Call IDs it should see."""

    def __init__(self, t: Tcp, r: random.Random) -> None:
        self.t = t
        self.parsed = [0, 0]
        self.cid = r.getrandbits(16)  # the client's Call ID
        self.sid = r.getrandbits(16)  # the server's
        self.masq: int | None = None  # the client's Call ID as the server saw it
        self.step_no = 0
        self.up = False
        self.gre = r.randrange(0, 12)
        self.incoming = r.random() < 0.3  # the server places an (incoming) call instead
        self.finished = False
        self.t.stream[0] += pptp(1)  # Start-Control-Connection-Request

    def messages(self, side: int) -> list[bytes]:
        buf, out = self.t.rcvd[side], []
        while len(buf) - self.parsed[side] >= 12:
            n = (buf[self.parsed[side]] << 8) | buf[self.parsed[side] + 1]
            if n < 12 or len(buf) - self.parsed[side] < n:
                break
            out.append(bytes(buf[self.parsed[side]:self.parsed[side] + n]))
            self.parsed[side] += n
        return out

    def step(self, w: World) -> list[Pkt]:
        t, r = self.t, w.r
        for m in self.messages(1):  # the server reads
            ctype = (m[8] << 8) | m[9]
            if ctype == 1:
                t.stream[1] += pptp(2, result=1)
                if self.incoming:
                    t.stream[1] += pptp(9, self.sid)  # Incoming-Call-Request
            elif ctype == 7:  # Outgoing-Call-Request: the client's ID as masqd passed it
                self.masq = (m[12] << 8) | m[13]
                t.stream[1] += pptp(8, self.sid, self.masq, result=1)
                self.up = True
            elif ctype == 10:  # Incoming-Call-Reply
                self.masq = (m[12] << 8) | m[13]
                if ((m[14] << 8) | m[15]) != self.sid and not self.t.tainted:
                    w.finding("pptp_peer_call_id", want=self.sid, got=(m[14] << 8) | m[15])
                t.stream[1] += pptp(11, self.masq)
                self.up = True
            elif ctype == 5:
                t.stream[1] += pptp(6, result=1)
            elif ctype == 12:
                t.stream[1] += pptp(13, self.sid, result=3)
            elif ctype == 3:
                t.stream[1] += pptp(4, result=1)
        for m in self.messages(0):  # the client reads
            ctype = (m[8] << 8) | m[9]
            if ctype == 2:
                if not self.incoming:
                    t.stream[0] += pptp(7, self.cid)
            elif ctype == 8 or ctype == 11:  # its own Call ID must come back
                got = (m[14] << 8) | m[15] if ctype == 8 else (m[12] << 8) | m[13]
                if got != self.cid and not self.t.tainted:
                    w.finding("pptp_call_id_back", want=self.cid, got=got, ctype=ctype)
            elif ctype == 9:
                t.stream[0] += pptp(10, self.cid, self.sid, result=1)
            elif ctype == 13:
                t.stream[0] += pptp(3)  # Stop-Control-Connection-Request
            elif ctype == 4:
                self.finished = True
        pending = any(len(t.stream[s]) > t.sent[s] for s in (0, 1))
        if self.up and self.masq is not None and self.gre > 0 and (not pending or r.random() < 0.3):
            self.gre -= 1
            ppp = b"\xff\x03\x00\x21" + r.randbytes(r.choice([0, 20, 200]))
            if r.random() < 0.5:
                return [("lan", gre1(t.a, t.b, self.sid, ppp, seq=r.getrandbits(32) if r.random() < 0.8 else None))]
            return [("wan", gre1(t.b, w.wan, self.masq, ppp, ack=r.getrandbits(32) if r.random() < 0.5 else None,
                                 seq=r.getrandbits(32)))]
        if self.up and self.gre <= 0 and not pending and self.step_no == 0:
            self.step_no = 1
            if r.random() < 0.3:
                t.stream[1] += pptp(5)  # an Echo-Request from the server
            t.stream[0] += pptp(15, self.sid) + pptp(12, self.cid)  # Set-Link-Info, Call-Clear-Request
        if not self.up and not pending and self.step_no == 0 and len(t.rcvd[0]) >= 156 and not self.incoming \
                and self.masq is None and t.sent[0] >= 156 + 168:
            self.finished = True  # the call was never answered
        return []

    def saw_gre(self, w: World, iface: str, pkt: bytes, outs: list[tuple[str, bytes]]) -> None:
        """GRE of the call: the server's packets reach the client with the client's own Call ID as
        the key, the client's leave from the WAN address with the server's."""
        if self.t.tainted:
            return
        o = out_on(outs, "lan" if iface == "wan" else "wan", 47)
        if o is None:
            return
        n = ihl_of(o)
        key = (o[n + 6] << 8) | o[n + 7]
        want = self.cid if iface == "wan" else self.sid
        if key != want:
            w.finding("pptp_gre_key", iface=iface, want=want, got=key, packet=pkt.hex(), out=o.hex())


class Ipsec(Conv):
    """ISAKMP main mode + quick mode on UDP 500, then ESP both ways, maybe a re-key."""

    def __init__(self, w: World) -> None:
        r = w.r
        self.lan, self.rem = r.choice(HOSTS), r.choice(REMOTES[:4])
        self.ic, self.rc = r.randbytes(8), r.randbytes(8)
        self.msgs = 6 + 3 * r.randrange(1, 3)
        self.i = 0
        self.esp = r.randrange(0, 16)
        self.spi_o, self.spi_i = r.getrandbits(32) | 0x100, r.getrandbits(32) | 0x100
        self.seq = [0, 0]
        self.rekeys = r.randrange(0, 2)

    def next(self, w: World) -> list[Pkt]:
        r = w.r
        if self.i < self.msgs:
            i = self.i
            self.i += 1
            exch, msgid = (2, 0) if i < 6 else (32, 0x10000 + i // 3)
            body = r.randbytes(r.choice([0, 40, 300]))
            if i % 2 == 0:
                return [("lan", udp(self.lan, self.rem, 500, 500,
                                    isakmp(self.ic, self.rc if i else bytes(8), exch, msgid, body, i > 4)))]
            return [("wan", udp(self.rem, w.wan, 500, 500, isakmp(self.ic, self.rc, exch, msgid, body, 1)))]
        if self.esp > 0:
            self.esp -= 1
            side = 0 if self.seq[0] == 0 or r.random() < 0.5 else 1
            self.seq[side] += 1
            body = struct.pack("!II", self.spi_o if side == 0 else self.spi_i, self.seq[side]) + r.randbytes(
                r.choice([16, 64, 200]))
            if side == 0:
                return [("lan", ipv4(self.lan, self.rem, 50, body))]
            return [("wan", ipv4(self.rem, w.wan, 50, body))]
        if self.rekeys > 0:
            self.rekeys -= 1
            self.msgs += 3
            self.esp = r.randrange(2, 10)
            self.spi_o, self.spi_i, self.seq = r.getrandbits(32) | 0x100, r.getrandbits(32) | 0x100, [0, 0]
            return self.next(w)
        if r.random() < 0.5:  # an informational exchange (a delete) ends it
            return [("lan", udp(self.lan, self.rem, 500, 500, isakmp(self.ic, self.rc, 5, r.getrandbits(32),
                                                                     r.randbytes(28), 1)))] + self.finish(w)
        return self.finish(w)


class Forwarded(Conv):
    """Inbound to the port forward (UDP 5060 -> 10.0.0.4) or the protocol forward (GRE -> 10.0.0.7)."""

    def __init__(self, w: World) -> None:
        r = w.r
        self.proto = r.choice([17, 47])
        self.rem, self.rport = r.choice(REMOTES), r.randrange(1024, 65536)
        self.n = r.randrange(1, 10)
        self.key = r.getrandbits(16)

    def next(self, w: World) -> list[Pkt]:
        if self.n <= 0:
            return self.finish(w)
        self.n -= 1
        r = w.r
        body = r.randbytes(r.choice([0, 30, 300]))
        inbound = r.random() < 0.6
        if self.proto == 17:
            if inbound:
                return [("wan", udp(self.rem, w.wan, self.rport, UDP_FWD, body))]
            return [("lan", udp(UDP_SERVER, self.rem, UDP_FWD, self.rport, body))]
        g = (gre1(self.rem, w.wan, self.key, body, seq=1) if r.random() < 0.7
             else ipv4(self.rem, w.wan, 47, b"\x00\x00\x08\x00" + body))
        if inbound:
            return [("wan", g)]
        return [("lan", gre1(GRE_SERVER, self.rem, self.key, body, seq=2))]


class IcmpError(Conv):
    """One ICMP error about a packet masqd just sent: from a router or the remote (WAN side), or
    from a LAN host about a packet it received."""

    def next(self, w: World) -> list[Pkt]:
        r = w.r
        self.done = True
        if not w.recent:
            return []
        oif, orig = r.choice(w.recent)
        typ, code = r.choice([(3, 0), (3, 1), (3, 3), (3, 4), (3, 13), (11, 0), (11, 1), (12, 0), (4, 0), (5, 1)])
        rest = 1400 if (typ, code) == (3, 4) else (r.randrange(0, 40) << 24 if typ == 12 else 0)
        quote = orig[:ihl_of(orig) + 8] if r.random() < 0.6 else orig[:548]
        if oif == "wan":
            src = ROUTER if r.random() < 0.5 else struct.unpack_from("!I", orig, 16)[0]
            return [("wan", icmp(src, w.wan, typ, code, rest, quote))]
        dst = struct.unpack_from("!I", orig, 12)[0]
        src = struct.unpack_from("!I", orig, 16)[0]
        return [("lan", icmp(src, dst, 3, 3, 0, quote))]


class Hairpin(Conv):
    """A LAN host sends to the WAN address and a port masqd mapped for another flow."""

    def next(self, w: World) -> list[Pkt]:
        r = w.r
        self.done = True
        wan = [p for i, p in w.recent if i == "wan" and len(p) >= 28 and p[9] in (6, 17) and not is_frag(p)]
        if not wan:
            return []
        o = r.choice(wan)
        n = ihl_of(o)
        port = (o[n] << 8) | o[n + 1]
        lan = r.choice(HOSTS)
        if o[9] == 17:
            return [("lan", udp(lan, w.wan, r.randrange(1024, 65536), port, r.randbytes(20)))]
        return [("lan", tcp(lan, w.wan, r.randrange(1024, 65536), port, r.getrandbits(32), 0, SYN))]


class Probe(Conv):
    """One packet nobody asked for, mostly from outside: to masqd itself, to random ports, with
    random SPIs, cookies, Call IDs; traceroute-like TTLs from inside."""

    def next(self, w: World) -> list[Pkt]:
        r = w.r
        self.done = True
        rem, lan = r.choice(REMOTES), r.choice(HOSTS)
        k = r.randrange(10)
        if k == 0:
            return [("wan", tcp(rem, w.wan, r.randrange(1, 65536), r.choice([23, 22, 80, TCP_FWD, 1723,
                                                                                r.randrange(1, 65536)]),
                                r.getrandbits(32), r.getrandbits(32), r.choice([SYN, ACK, RST, FIN | ACK, 0, 0xFF])))]
        if k == 1:
            return [("wan", udp(rem, w.wan, r.randrange(1, 65536), r.choice([9, 53, 500, 4500, r.randrange(1, 65536)]),
                                r.randbytes(r.choice([0, 10, 100]))))]
        if k == 2:
            return [("wan", ipv4(rem, w.wan, 50, struct.pack("!II", r.getrandbits(32), 1) + r.randbytes(32)))]
        if k == 3:
            return [("wan", udp(rem, w.wan, 500, 500, isakmp(r.randbytes(8), r.choice([bytes(8), r.randbytes(8)]),
                                                                  r.choice([2, 4, 32, 34, 35, 37]), r.getrandbits(32),
                                                                  r.randbytes(40))))]
        if k == 4:
            return [("wan", gre1(rem, w.wan, r.getrandbits(16), r.randbytes(20), seq=1))]
        if k == 5:
            return [("wan", icmp(rem, w.wan, r.choice([0, 8, 13, 14, 17]), 0, r.getrandbits(32), r.randbytes(16)))]
        if k == 6:
            return [("lan", udp(lan, r.choice(REMOTES), r.randrange(1024, 65536), 33434 + r.randrange(30),
                                b"trace", ttl=r.choice([1, 2])))]
        if k == 7:
            return [("lan", r.choice([icmp(lan, LAN_IP, 8, 0, 1, b"x"), tcp(lan, LAN_IP, 40000, 22, 1, 0, SYN),
                                      udp(lan, LAN_IP, 40000, 53, b"q"), udp(lan, w.wan, 40000, 9, b"h")]))]
        if k == 8:
            return [("lan", ipv4(lan, rem, r.choice([4, 41, 51, 89, 132, 255]), r.randbytes(40)))]
        return [("wan", ipv4(rem, w.wan, r.choice([4, 41, 51, 89, 132, 0]), r.randbytes(40)))]


CONVS: list[tuple[Callable[[World], Conv], int]] = [
    (Udp, 22), (Echo, 8), (lambda w: Tcp(w), 16), (lambda w: Tcp(w, "portfw"), 6), (lambda w: Tcp(w, "pptp"), 10),
    (Ipsec, 8), (Forwarded, 5), (IcmpError, 8), (Hairpin, 3), (Probe, 10),
]


# ---------------------------------------------------------------------------------------------
# mutations


def _mut_fields(b: bytearray, r: random.Random) -> None:
    """A random SPI, ISAKMP cookie, Call ID, port or ICMP id where the packet has one."""
    if len(b) < 20:
        return
    n = (b[0] & 15) << 2
    proto = b[9]
    if len(b) < n + 8:
        return
    if proto == 50:
        b[n:n + 4] = r.randbytes(4)
    elif proto == 47:
        b[n + 6:n + 8] = r.randbytes(2)
    elif proto == 17 and len(b) >= n + 24 and b[n:n + 2] == b"\x01\xf4":
        at = n + 8 + r.choice([0, 8])  # the initiator's or the responder's cookie
        b[at:at + 8] = r.randbytes(8)
    elif proto == 6 and len(b) >= n + 20:
        doff = (b[n + 12] >> 4) << 2
        if len(b) >= n + doff + 16 and r.random() < 0.6:
            at = n + doff + 12 + r.choice([0, 2])  # a PPTP Call ID field
        else:
            at = n + r.choice([0, 2])  # a port
        b[at:at + 2] = r.randbytes(2)
    elif proto == 1:
        b[n + 4:n + 6] = r.randbytes(2)
    else:
        b[n:n + 2] = r.randbytes(2)


def _mut_l4len(b: bytearray, r: random.Random) -> None:
    """A length or layout field of the transport or the application lies."""
    if len(b) < 28:
        return
    n = (b[0] & 15) << 2
    proto = b[9]
    if len(b) < n + 8:
        return
    if proto == 17:
        if len(b) >= n + 8 + 28 and r.random() < 0.5:  # ISAKMP length
            b[n + 8 + 24:n + 8 + 28] = r.choice([0, 27, 28, len(b), 0xFFFFFFFF, r.getrandbits(32)]).to_bytes(4, "big")
        else:
            b[n + 4:n + 6] = r.choice([0, 7, 8, len(b) - n + 1, len(b) - n - 1, 0xFFFF]).to_bytes(2, "big")
    elif proto == 6 and len(b) >= n + 20:
        if r.random() < 0.5:
            b[n + 12] = (r.randrange(16) << 4) | (b[n + 12] & 15)
        else:
            doff = (b[n + 12] >> 4) << 2
            if len(b) >= n + doff + 2:  # a PPTP length
                b[n + doff:n + doff + 2] = r.choice([0, 11, 12, 15, 156, 168, 513, 0xFFFF]).to_bytes(2, "big")
    elif proto == 47:
        b[n] = r.getrandbits(8)
        b[n + 1] = r.getrandbits(8)
    elif proto == 1 and len(b) >= n + 28:  # the quoted packet's header
        b[n + 8 + r.choice([0, 2, 3])] = r.getrandbits(8)
    else:
        b[n + r.randrange(8)] = r.getrandbits(8)


IP_OPTS = [b"\x01\x01\x01\x00", b"\x94\x04\x00\x00", b"\x44\x08\x05\x00\x00\x00\x00\x00",
           b"\x44\x08\xff\x00\x00\x00\x00\x00", b"\x83\x07\x04\x0a\x00\x00\x05", b"\x83\x03\x04\x00",
           b"\x89\x27\x04" + bytes(36), b"\x07\x0b\x04" + bytes(8) + b"\x00", b"\x00\xff\xff\xff",
           b"\x44\x00", b"\x44\x01", b"\x82\x0b" + bytes(9), b"\x88\x04\x12\x34", b"\x01\x01\x44\x28"]


def _mut_ipopts(b: bytearray, r: random.Random) -> bytearray:
    if len(b) < 20:
        return b
    n = (b[0] & 15) << 2
    if n < 20 or n > len(b):
        return b
    opts = r.choice(IP_OPTS) if r.random() < 0.7 else r.randbytes(r.randrange(1, 41))
    opts = opts + bytes(-len(opts) % 4)
    room = 60 - n
    opts = opts[:room]
    if not opts:
        return b
    b = b[:n] + opts + b[n:]
    b[0] = 0x40 | ((n + len(opts)) >> 2)
    tot = ((b[2] << 8) | b[3]) + len(opts)
    b[2:4] = (tot & 0xFFFF).to_bytes(2, "big")
    return b


TCP_OPTS = [b"\x02\x04\x00\x00", b"\x02\x03\x05", b"\x02\x00", b"\x03\x03\x0f", b"\x03\x03\xff", b"\x04\x02",
            b"\x05\x0a" + bytes(8), b"\x05\x03\x00", b"\x08\x0a" + bytes(8), b"\x08\x01", b"\x1e\x04\x00\x00",
            b"\x00\xff\xff\xff", b"\x02\x04", b"\x01\x01\x01\x01" * 10]


def _mut_tcpopts(b: bytearray, r: random.Random) -> bytearray:
    if len(b) < 40 or b[9] != 6:
        return b
    n = (b[0] & 15) << 2
    if len(b) < n + 20:
        return b
    doff = (b[n + 12] >> 4) << 2
    if doff < 20 or n + doff > len(b):
        return b
    opts = r.choice(TCP_OPTS) if r.random() < 0.7 else r.randbytes(r.randrange(1, 41))
    opts = (opts + bytes(-len(opts) % 4))[:60 - doff]
    if not opts:
        return b
    b = b[:n + doff] + opts + b[n + doff:]
    b[n + 12] = (((doff + len(opts)) >> 2) << 4) | (b[n + 12] & 15)
    tot = ((b[2] << 8) | b[3]) + len(opts)
    b[2:4] = (tot & 0xFFFF).to_bytes(2, "big")
    return b


def _mut_frag(p: bytes, r: random.Random) -> list[bytearray]:
    """Bad fragments of ``p``: overlapping, duplicated, tiny, beyond 64 KiB, MF wrong, gaps."""
    if len(p) < 28:
        return [bytearray(p)]
    n = ihl_of(p)
    if n < 20 or n > len(p):
        return [bytearray(p)]
    data = p[n:]
    out: list[bytearray] = []
    for _ in range(r.randint(2, 4)):
        off = r.choice([0, 0, 8, 16, r.randrange(0, max(8, len(data))) & ~7, 8184, 65528])
        ln = r.choice([8, 16, len(data), r.randrange(1, max(2, len(data) + 1))])
        chunk = data[off:off + ln] if off < len(data) else r.randbytes(ln)
        mf = r.choice([0x2000, 0x2000, 0])
        h = bytearray(p[:n])
        struct.pack_into("!H", h, 2, (n + len(chunk)) & 0xFFFF)
        struct.pack_into("!H", h, 6, mf | ((off >> 3) & 0x1FFF))
        out.append(h + chunk)
    if r.random() < 0.3:
        out.append(bytearray(out[0]))  # a duplicate
    return out


def mutate(iface: str, p: bytes, r: random.Random) -> list[Pkt]:
    """Mutants of one valid packet (most with their checksums made right again)."""
    b = bytearray(p)
    k = r.randrange(16)
    many: list[bytearray] | None = None
    if k == 0:
        for _ in range(r.randint(1, 8)):
            i = r.randrange(len(b))
            b[i] ^= 1 << r.randrange(8)
    elif k == 1:
        for _ in range(r.randint(1, 4)):
            b[r.randrange(min(len(b), 64))] = r.getrandbits(8)
    elif k == 2:
        b = b[:r.randrange(len(b))]
    elif k == 3:
        b += r.randbytes(r.randint(1, 64))
    elif k == 4:
        b[2:4] = r.choice([0, 19, 20, len(b) - 1, len(b) + 1, len(b) + 100, 0xFFFF, r.getrandbits(16)]).to_bytes(2, "big")
    elif k == 5:
        b[0] = 0x40 | r.randrange(16) if r.random() < 0.8 else r.getrandbits(8)
    elif k == 6:
        _mut_l4len(b, r)
    elif k == 7:
        b = _mut_ipopts(b, r)
    elif k == 8:
        b = _mut_tcpopts(b, r) if b[9] == 6 else _mut_ipopts(b, r)
    elif k == 9:
        many = _mut_frag(p, r)
    elif k == 10:
        _mut_fields(b, r)
    elif k == 11:
        which = r.choice([12, 16])
        b[which:which + 4] = r.choice(ODD_ADDRS + [r.getrandbits(32), WAN_ADDRS[0], r.choice(HOSTS)]).to_bytes(4, "big")
    elif k == 12:
        b[8] = r.choice([0, 1])
    elif k == 13:
        b[9] = r.getrandbits(8)
    elif k == 14:
        iface = "wan" if iface == "lan" else "lan"  # the wrong side
    else:
        return [(r.choice(["lan", "wan"]), r.randbytes(r.randrange(0, 100)) if r.random() < 0.5
                 else b"\x45" + r.randbytes(r.randrange(19, 100)))]
    res = []
    for x in many if many is not None else [b]:
        if r.random() < 0.4:
            fix_l4(x)
        if r.random() < 0.7:
            fix_ip(x)
        res.append((iface, bytes(x)))
    return res


# ---------------------------------------------------------------------------------------------
# drivers: the engine alone, or the two data planes of the differential run


class EngineDriver:
    """The engine itself; admin steps as ops would call them."""

    def __init__(self, cfgs: dict[str, Config]) -> None:
        self.cfgs = cfgs
        self.variant = "a"
        self.eng = Engine(cfgs["a"])
        self.c = self.eng.ctr.c

    def send(self, iface: str, p: bytes, now: float) -> list[tuple[str, bytes]]:
        return self.eng.process(iface, p, now)

    def expire(self, now: float) -> None:
        self.eng.expire(now)

    def internal_errors(self) -> int:
        return self.c.get("drop_internal_error", 0)

    def drain(self) -> list[tuple[str, str, dict[str, Any]]]:
        return self.eng.drain_events()

    def reload(self, now: float) -> None:
        self.variant = "b" if self.variant == "a" else "a"
        self.eng.reload(self.cfgs[self.variant])

    def set_wan(self, addr: int, now: float) -> None:
        self.eng.set_wan_address(ipaddress.IPv4Interface(f"{ipaddress.IPv4Address(addr)}/24"), now)

    def flush(self, proto: int | None, lan: int | None) -> None:
        self.eng.flush(proto, lan)

    def listing(self, now: float) -> None:
        self.eng.table(now)
        self.eng.table_summary()
        _ = self.eng.counters

    def wan_ip(self) -> int:
        return self.eng.wan_ip


def admin(d: Any, w: World) -> str:
    """One admin step (what ops or an operator would do), the same for both drivers."""
    r = w.r
    k = r.randrange(6)
    if k == 0:
        d.reload(w.now)
        what = "reload"
    elif k == 1:
        d.set_wan(WAN_ADDRS[1] if d.wan_ip() == WAN_ADDRS[0] else WAN_ADDRS[0], w.now)
        what = "wan"
    elif k == 2:
        d.flush(r.choice([None, 6, 17, 1, 50]), r.choice([None, r.choice(HOSTS)]))
        what = "flush"
    elif k == 3:
        d.listing(w.now)
        what = "list"
    else:
        w.now += r.choice([1.0, 30.0, 130.0, 400.0, 2000.0])
        d.expire(w.now)
        what = "time"
    w.wan = d.wan_ip()
    return what


def check_outputs(w: World, iface: str, p: bytes, outs: list[tuple[str, bytes]], valid: bool) -> None:
    """Bytes out must be sane: a correct IPv4 header checksum when the input had one; correct
    transport checksums when the input was a valid packet."""
    if not outs:
        return
    in_ok = ip_ok(p)
    for oif, o in outs:
        w.recent.append((oif, o))
        if in_ok and not ip_ok(o):
            w.finding("bad_ip_checksum_out", iface=iface, packet=p.hex(), out=o.hex())
        elif valid and not is_frag(o) and not is_frag(p) and ip_ok(o) and not l4_ok(o):
            w.finding("bad_l4_checksum_out", iface=iface, packet=p.hex(), out=o.hex())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def deep_len(v: Any) -> int:
    """len(); for a dict of containers (e.g. protocol -> port -> owner) the sum of theirs; for a
    dict of counts (protocol -> ports in use) the number of counts that are not zero."""
    if isinstance(v, dict) and v:
        vals = list(v.values())
        if all(isinstance(x, (dict, list, set, deque)) for x in vals):
            return sum(deep_len(x) for x in vals)
        if all(type(x) is int for x in vals):
            return sum(1 for x in vals if x)
    return len(v)


def container_sizes(obj: Any, depth: int = 3) -> dict[str, int]:
    """len() of every dict/list/set/deque reachable from ``obj`` through attributes (``depth`` hops):
    the places where state could be left behind."""
    out: dict[str, int] = {}
    seen: set[int] = set()

    def attrs(o: Any) -> list[tuple[str, Any]]:
        items: list[tuple[str, Any]] = []
        d = getattr(o, "__dict__", None)
        if isinstance(d, dict):
            items += list(d.items())
        for cls in type(o).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(o, name):
                    items.append((name, getattr(o, name)))
        return items

    # breadth first, so that an object shared by several paths is named by its shortest one
    queue: deque[tuple[Any, str, int]] = deque([(obj, "engine", depth)])
    seen.add(id(obj))
    while queue:
        o, path, left = queue.popleft()
        for name, v in attrs(o):
            p = f"{path}.{name}"
            if id(v) in seen:
                continue
            if isinstance(v, (dict, list, set, deque, bytearray)):
                seen.add(id(v))
                out[p] = deep_len(v)
                if left <= 0:
                    continue
                if isinstance(v, list) and v and not isinstance(v[0], (int, float, str, bytes)):
                    for i, x in enumerate(v[:8]):
                        if id(x) not in seen and type(x).__module__.startswith("masqd"):
                            seen.add(id(x))
                            queue.append((x, f"{p}[{i}]", left - 1))
                elif isinstance(v, dict) and len(v) <= 16:
                    for kk, x in list(v.items()):
                        if id(x) not in seen and type(x).__module__.startswith("masqd"):
                            seen.add(id(x))
                            queue.append((x, f"{p}[{kk!r}]", left - 1))
            elif left > 0 and type(v).__module__.startswith("masqd") and not callable(v):
                seen.add(id(v))
                queue.append((v, p, left - 1))
    return out


# ---------------------------------------------------------------------------------------------
# one worker's run


def run_stream(d: Any, seed: int, packets: int, sample_every: int,
               on_sample: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Drive ``packets`` packets (valid and mutants) through driver ``d``."""
    r = random.Random(seed)
    w = World(r)
    makers, weights = zip(*CONVS, strict=True)
    active: list[Conv] = [r.choices(makers, weights)[0](w) for _ in range(48)]
    sent = valid = mutants = 0
    exceptions: list[dict[str, Any]] = []
    nexc = 0
    admins: dict[str, int] = {}
    last_err = d.internal_errors()
    t0 = time.perf_counter()
    next_sample = sample_every
    while sent < packets:
        i = r.randrange(len(active))
        conv = active[i]
        if conv.done:
            active[i] = r.choices(makers, weights)[0](w)
            continue
        try:
            pkts = conv.next(w)
        except Exception as exc:  # a bug in this generator, not in masqd: say so and go on
            exceptions.append({"where": "generator", "error": repr(exc), "trace": traceback.format_exc()[-800:]})
            nexc += 1
            conv.done = True
            continue
        for iface, p in pkts:
            if not iface:
                continue
            batch: list[tuple[str, bytes, bool]] = []
            if r.random() < 0.35:
                conv.tainted = True
                for _ in range(r.randint(1, 3)):
                    batch += [(mi, mp, False) for mi, mp in mutate(iface, p, r)]
            batch.append((iface, p, True))
            for bi, bp, ok in batch:
                w.index = sent
                w.now += r.random() * 0.004
                try:
                    outs = d.send(bi, bp, w.now)
                except Exception as exc:
                    nexc += 1
                    if len(exceptions) < 20:
                        exceptions.append({"where": "send", "index": sent, "iface": bi, "packet": bp.hex(),
                                           "error": repr(exc), "trace": traceback.format_exc()[-800:]})
                    outs = []
                err = d.internal_errors()
                if err != last_err:
                    nexc += err - last_err
                    last_err = err
                    if len(exceptions) < 20:
                        evs = [e for e in d.drain() if e[1] == "internal_error"]
                        exceptions.append({"where": "engine (drop_internal_error)", "index": sent, "iface": bi,
                                           "packet": bp.hex(), "error": evs[-1][2].get("error") if evs else "?"})
                sent += 1
                if ok:
                    valid += 1
                    check_outputs(w, bi, bp, outs, getattr(d, "l4_checkable", True))
                    try:
                        conv.saw(w, bi, bp, outs)
                    except Exception as exc:
                        exceptions.append({"where": "generator", "error": repr(exc),
                                           "trace": traceback.format_exc()[-800:]})
                        conv.done = True
                else:
                    mutants += 1
                    check_outputs(w, bi, bp, outs, False)
                if sent & 255 == 0:
                    d.expire(w.now)
                    if sent & 1023 == 0:
                        d.drain()  # as ops does: the engines' event queues stay short
                if r.random() < 1 / 20000:
                    what = admin(d, w)
                    admins[what] = admins.get(what, 0) + 1
                if sent >= next_sample:
                    next_sample += sample_every
                    if on_sample is not None:
                        on_sample(sent)
    elapsed = time.perf_counter() - t0
    return {"packets": sent, "valid": valid, "mutants": mutants, "exceptions": nexc, "exception_samples": exceptions,
            "findings": w.nfindings, "finding_samples": w.findings, "seconds": elapsed,
            "pps": sent / elapsed if elapsed else 0.0, "admin_steps": admins, "now": w.now, **w.stats}


# Caches that are bounded by design (cleared or trimmed at a size), not state: they may be
# larger at the end than in an engine that saw no traffic.
# ``_quiet``: the IPsec helper's rate limit of its log events (cleared at 4096 keys);
# ``proto_hits``: the protocol forward's hit counts, one key per IP protocol; ``fw_entry``: the
# PPTP helper's pointer to the call it handled last (one object).
BOUNDED_CACHES = ("._quiet", ".proto_hits", ".fw_entry.", ".offenders.")  # offenders: top 2N by design


def state_of(eng: Engine, now: float) -> dict[str, Any]:
    """What must be back to a traffic-free engine's after the timeouts: sizes and the table's rows
    (without hit counts)."""
    c = eng.counters
    return {"sessions": eng.nsessions, "frag_queue": c.get("frag_queue", 0),
            # a port forward's server keeps its (static) mapping while the forward is configured
            "mappings": sum(1 for m in eng.nat.maps.values() if not m.static),
            "pool_used": sum(c.get(f"pool_used_{p}", 0) for p in ("tcp", "udp", "icmp")),
            "rows": sorted(str({k: v for k, v in row.items() if k not in ("hits", "expires_in")})
                           for row in eng.table(now))}


def baseline(cfgs: dict[str, Config]) -> Engine:
    """An engine that saw the fuzz's admin steps (both configurations, both WAN addresses) and one
    connection to each port forward (their servers' static mappings), all timed out."""
    eng = Engine(cfgs["a"])
    for v in ("b", "a"):
        eng.reload(cfgs[v])
    for addr in (WAN_ADDRS[1], WAN_ADDRS[0]):
        eng.set_wan_address(ipaddress.IPv4Interface(f"{ipaddress.IPv4Address(addr)}/24"), 0.0)
    rem = REMOTES[0]
    eng.process("wan", tcp(rem, WAN_ADDRS[0], 40000, TCP_FWD, 1, 0, SYN), 1.0)
    eng.process("wan", udp(rem, WAN_ADDRS[0], 40000, UDP_FWD, b"x"), 1.0)
    eng.expire(1e6)
    return eng


def fuzz_worker(args: tuple[int, int, int]) -> dict[str, Any]:
    """One process: ``packets`` packets from ``seed`` through one engine; RSS every ``every`` packets."""
    seed, packets, every = args
    cfgs = configs()
    d = EngineDriver(cfgs)
    gc.collect()
    rss0 = rss_bytes()
    curve: list[tuple[int, int, int]] = [(0, rss0, 0)]
    peak = {"sessions": 0, "mappings": 0}

    def sample(n: int) -> None:
        curve.append((n, rss_bytes(), d.eng.nsessions))
        peak["sessions"] = max(peak["sessions"], d.eng.nsessions)
        peak["mappings"] = max(peak["mappings"], len(d.eng.nat.maps))

    res = run_stream(d, seed, packets, every, sample)
    eng = d.eng
    end = res["now"]
    before = state_of(eng, end)
    before_expiry = {"sessions": before["sessions"], "mappings": before["mappings"], "rows": len(before["rows"])}
    # back to the first configuration and address, then past every timeout (the longest: TCP
    # established, 7440 s; IPsec table lifetime, 1800 s)
    errors_before = d.internal_errors()
    try:
        if d.variant != "a":
            d.reload(end)
        d.set_wan(WAN_ADDRS[0], end)
        for step in (10_000.0, 100_000.0, 200_000.0):
            eng.expire(end + step)
    except Exception as exc:
        res["exceptions"] += 1
        res["exception_samples"].append({"where": "expire", "error": repr(exc), "trace": traceback.format_exc()[-800:]})
    res["exceptions"] += d.internal_errors() - errors_before
    eng.drain_events()
    gc.collect()
    late = end + 200_000.0
    after, empty = state_of(eng, late), state_of(baseline(cfgs), late)
    base_sizes, end_sizes = container_sizes(baseline(cfgs)), container_sizes(eng)
    grown = {k: (base_sizes.get(k, 0), v) for k, v in end_sizes.items() if v > base_sizes.get(k, 0)
             and not k.startswith(("engine.ctr.c", "engine.c")) and not any(b in k + "." for b in BOUNDED_CACHES)}
    c = eng.counters
    drops = sorted(((k, v) for k, v in c.items() if k.startswith("drop_")), key=lambda kv: -kv[1])
    res.update({
        "seed": seed, "rss_before": rss0, "rss_after": rss_bytes(), "rss_curve": curve, "peak": peak,
        "before_expiry": before_expiry,
        "after_expiry": {k: (len(v) if k == "rows" else v) for k, v in after.items()},
        "left_over": {k: (v, empty[k]) for k, v in after.items() if v != empty[k]},
        "grown_containers": grown,
        "table_empty": after == empty and not grown,
        "drops_top": drops[:12], "drops_total": sum(v for _, v in drops),
    })
    return res


# ---------------------------------------------------------------------------------------------
# the differential run: the flow cache against the Python path


class DiffDriver:
    """The same frames into a native and a Python data plane; outputs compared packet for packet."""

    def __init__(self, mode: str, offload: bool, seed: int) -> None:
        from tests.dataplane import diffharness as h

        self.h = h
        self.mode, self.offload = mode, offload
        self.r = random.Random(seed ^ 0x5EED)  # framing choices (the same frame goes to both sides)
        self.variant = "a"

        def make(mode: str, offload: bool, fastpath: str, wan_mtu: int = 1400, variant: str = "a") -> str:
            extra = FORWARDS + (EXTRA_B if variant == "b" else "")
            text = h.config(mode, offload, fastpath, extra, firewall_body(variant), wan_mtu)
            if variant == "b":
                text = text.replace('gateway = "203.0.113.1"\n', 'gateway = "203.0.113.1"\ndynaddr_mode = "flush"\n')
            return text

        self.make = make
        self.py = h.make_side(mode, offload, "python", make_config=make)
        self.nat = h.make_side(mode, offload, "native", make_config=make)
        self.sides = [self.py, self.nat]
        self.eng = self.py.dp.engine
        self.mismatches: list[dict[str, Any]] = []
        self.nmismatch = 0
        self.l4_checkable = True
        self.macs = {i: self.nat.mac(i) for i in ("lan", "wan")}
        names = [str(ipaddress.IPv4Address(x)) for x in HOSTS + [GRE_SERVER]]
        h.announce(self.sides, [("lan", x, "10.0.0.1") for x in names] + [("wan", h.GW, h.WAN_IP)])
        self.known = set(names) | {h.GW}

    def _clock(self, now: float) -> None:
        for s in self.sides:
            s.clock[0] = now

    def _compare(self, what: str, a: list[tuple[str, bytes]], b: list[tuple[str, bytes]], **kw: Any) -> None:
        if a != b:
            self.nmismatch += 1
            if len(self.mismatches) < 10:
                self.mismatches.append({"what": what, "python": [(i, x.hex()) for i, x in a],
                                        "native": [(i, x.hex()) for i, x in b], **kw})

    def send(self, iface: str, p: bytes, now: float) -> list[tuple[str, bytes]]:
        h = self.h
        self._clock(now)
        src = str(ipaddress.IPv4Address(p[12:16])) if len(p) >= 16 else "0.0.0.0"
        peer = h.mac_of(src if iface == "lan" and src in self.known else h.GW if iface == "wan" else "10.0.0.2")
        partial, gso = self.offload and self.r.random() < 0.5, self.offload and self.r.random() < 0.02
        f = h.frame(self.r, self.mode, self.offload, iface, p, self.macs[iface], peer, partial=partial, gso=gso)
        a, b = self.py.feed(iface, f), self.nat.feed(iface, f)
        self._compare("packet", a, b, iface=iface, frame=f.hex())
        outs = a
        vs = h.vnet.SIZE if self.offload else 0
        for _ in range(2):  # masqd asks for a neighbour: the known ones answer (both sides)
            asks = [(oif, x[vs + 14:]) for oif, x in outs
                    if self.mode == "tap" and x[vs + 12:vs + 14] == b"\x08\x06" and x[vs + 20:vs + 22] == b"\x00\x01"]
            if not asks:
                break
            more: list[tuple[str, bytes]] = []
            for oif, arp in asks:
                target = str(ipaddress.IPv4Address(arp[24:28]))
                if target in self.known:
                    ans = h.arp_in(target, str(ipaddress.IPv4Address(arp[14:18])))
                    ans = (h.vnet.ZERO if self.offload else b"") + ans
                    a2, b2 = self.py.feed(oif, ans), self.nat.feed(oif, ans)
                    self._compare("arp answer", a2, b2)
                    more += a2
            outs = outs + more
            if not more:
                break
        # a partial checksum (ours, or one masqd wrote) is finished by the kernel, not in the bytes
        self.l4_checkable = not (partial or gso) and not any(self.offload and x[0] for _, x in outs)
        res = []
        for oif, x in outs:
            ipp = h.unframe(self.mode, self.offload, x)
            if ipp is not None:
                res.append((oif, ipp))
        return res

    def expire(self, now: float) -> None:
        self._clock(now)
        for s in self.sides:
            s.dp._expire()
        self._compare("expire", self.py.collect(), self.nat.collect())

    def drain(self) -> list[tuple[str, str, dict[str, Any]]]:
        return [e for s in self.sides for e in s.dp.engine.drain_events()]

    def internal_errors(self) -> int:
        return sum(s.dp.engine.ctr.c.get("drop_internal_error", 0) + s.dp.counters.get("drop_engine_error", 0)
                   + s.dp.counters.get("dp_expire_errors", 0) for s in self.sides)

    def reload(self, now: float) -> None:
        self._clock(now)
        self.variant = "b" if self.variant == "a" else "a"
        for s in self.sides:
            cfg = loads(self.make(self.mode, self.offload, "native" if s.dp.native is not None else "python",
                                  variant=self.variant))
            s.dp.sync_native()
            s.dp.engine.reload(cfg)
            s.dp.on_reload(cfg)
        self._compare("reload", self.py.collect(), self.nat.collect())

    def set_wan(self, addr: int, now: float) -> None:
        self._clock(now)
        for s in self.sides:
            s.dp.set_wan_address(ipaddress.IPv4Interface(f"{ipaddress.IPv4Address(addr)}/24"))
        self._compare("wan address", self.py.collect(), self.nat.collect())

    def flush(self, proto: int | None, lan: int | None) -> None:
        for s in self.sides:
            s.dp.sync_native()
            s.dp.engine.flush(proto, lan)

    def listing(self, now: float) -> None:
        self._clock(now)
        for s in self.sides:
            s.dp._l2_tick()  # the neighbour timers too
        self._compare("l2 tick", self.py.collect(), self.nat.collect())

    def wan_ip(self) -> int:
        return int(self.py.dp.engine.wan_ip)

    def close(self) -> None:
        for s in self.sides:
            s.close()


def diff_worker(args: tuple[str, bool, int, int]) -> dict[str, Any]:
    mode, offload, seed, packets = args
    from masqd.ops.runtime import rule_rows

    d = DiffDriver(mode, offload, seed)
    try:
        res = run_stream(d, seed, packets, packets + 1)
        h = d.h
        now = res["now"]
        d._clock(now)
        cp, cn = h.counters(d.py), h.counters(d.nat)
        diff_counters = {k: (cp.get(k), cn.get(k)) for k in set(cp) | set(cn) if cp.get(k) != cn.get(k)}
        rows_same = h.rows(d.py, now) == h.rows(d.nat, now)
        rules_same = rule_rows(d.py.dp.engine) == rule_rows(d.nat.dp.engine)
        native = d.nat.dp.all_counters().get("fastpath_native_packets", 0)
        res.update({"mode": mode, "offload": offload, "seed": seed, "mismatches": d.nmismatch,
                    "mismatch_samples": d.mismatches, "counters_differ": diff_counters, "table_same": rows_same,
                    "rules_same": rules_same, "native_packets": native,
                    "ok": d.nmismatch == 0 and not diff_counters and rows_same and rules_same
                    and res["exceptions"] == 0})
        return res
    finally:
        d.close()


# ---------------------------------------------------------------------------------------------
# the report


def count(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k" if n else "0"


def mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def report(runs: list[dict[str, Any]], diffs: list[dict[str, Any]], wall: float, args: argparse.Namespace) -> str:
    out = []
    total = sum(x["packets"] for x in runs)
    out.append(f"bench/fuzz.py: {total:,} packets through the engine in {wall:.1f} s "
               f"({len(runs)} worker(s), seed {args.seed}; {total / wall:,.0f} packets/s overall)")
    out.append(f"{'worker seed':<12}{'packets':>12}{'valid':>11}{'mutants':>11}{'pkts/s':>9}{'exceptions':>11}"
               f"{'findings':>9}{'RSS before':>11}{'after MB':>9}{'peak sess':>10}{'empty':>7}")
    for x in runs:
        out.append(f"{x['seed']:<12}{x['packets']:>12,}{x['valid']:>11,}{x['mutants']:>11,}{x['pps']:>9,.0f}"
                   f"{x['exceptions']:>11}{x['findings']:>9}{mb(x['rss_before']):>11}{mb(x['rss_after']):>9}"
                   f"{x['peak']['sessions']:>10,}{'yes' if x['table_empty'] else 'NO':>7}")
    out.append("RSS curve (MB; sessions in the table) per worker:")
    for x in runs:
        pts = ", ".join(f"{count(n)}: {mb(rss)} ({s:,})" for n, rss, s in x["rss_curve"])
        out.append(f"  seed {x['seed']}: {pts}")
    for x in runs:
        out.append(f"  seed {x['seed']}: before the final expiry {x['before_expiry']}; after {x['after_expiry']}; "
                   f"conversations completed {x['conv_done']:,}, cut short {x['conv_broken']:,}; "
                   f"admin steps {x['admin_steps']}")
        out.append(f"    drops {x['drops_total']:,}, top: " + ", ".join(f"{k[5:]} {v:,}" for k, v in x["drops_top"]))
        if x["left_over"]:
            out.append(f"    LEFT OVER after the timeouts (got, an idle engine's): {x['left_over']}")
        if x["grown_containers"]:
            out.append(f"    containers larger than at the start after expiry: {x['grown_containers']}")
        for e in x["exception_samples"][:5]:
            out.append(f"    EXCEPTION {e}")
        for f in x["finding_samples"][:5]:
            out.append(f"    FINDING {f}")
    if diffs:
        out.append(f"differential run (flow cache vs Python), {sum(x['packets'] for x in diffs):,} packets:")
        out.append(f"{'mode':<10}{'packets':>10}{'native':>9}{'pkts/s':>8}{'mismatch':>9}{'counters':>9}"
                   f"{'table':>7}{'rules':>7}{'exc':>5}{'findings':>9}")
        for x in diffs:
            out.append(f"{x['mode'] + ('+vnet' if x['offload'] else ''):<10}{x['packets']:>10,}"
                       f"{x['native_packets']:>9,}{x['pps']:>8,.0f}{x['mismatches']:>9}"
                       f"{'same' if not x['counters_differ'] else 'DIFFER':>9}{'same' if x['table_same'] else 'DIFF':>7}"
                       f"{'same' if x['rules_same'] else 'DIFF':>7}{x['exceptions']:>5}{x['findings']:>9}")
            for m in x["mismatch_samples"][:3]:
                out.append(f"    MISMATCH {m}")
            if x["counters_differ"]:
                out.append(f"    counters differ: {x['counters_differ']}")
            for e in x["exception_samples"][:3]:
                out.append(f"    EXCEPTION {e}")
            for f in x["finding_samples"][:3]:
                out.append(f"    FINDING {f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packets", type=int, default=10_000_000, help="packets through the engine, all workers")
    ap.add_argument("--seed", type=int, default=1, help="worker i uses seed + i")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--diff-packets", type=int, default=None,
                    help="packets of the differential run, over its four modes (default 200 000; 0: none)")
    ap.add_argument("--rss-every", type=int, default=None, help="RSS sample interval per worker (default 1 M)")
    ap.add_argument("--quick", action="store_true", help="50 000 packets and 8 000 differential ones")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.packets = min(args.packets, 50_000) if "--packets" in (argv or sys.argv) else 50_000
        args.diff_packets = 8_000 if args.diff_packets is None else args.diff_packets
    diff_packets = 200_000 if args.diff_packets is None else args.diff_packets
    workers = max(1, min(args.workers, 16))
    per = [args.packets // workers + (1 if i < args.packets % workers else 0) for i in range(workers)]
    every = args.rss_every or (1_000_000 if args.packets >= 2_000_000 else max(1000, args.packets // 10))
    t0 = time.perf_counter()
    jobs = [(args.seed + i, n, every) for i, n in enumerate(per) if n]
    diff_jobs = [(m, o, args.seed + 100 + i, diff_packets // 4)
                 for i, (m, o) in enumerate([("tun", False), ("tun", True), ("tap", False), ("tap", True)])
                 if diff_packets // 4]
    if workers == 1:
        runs = [fuzz_worker(j) for j in jobs]
        wall = time.perf_counter() - t0
        diffs = [diff_worker(j) for j in diff_jobs]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            runs = pool.map(fuzz_worker, jobs)
            wall = time.perf_counter() - t0
            diffs = pool.map(diff_worker, diff_jobs)
    print(report(runs, diffs, wall, args), flush=True)
    ok = (all(x["exceptions"] == 0 and x["findings"] == 0 and x["table_empty"] for x in runs)
          and all(x["ok"] and x["findings"] == 0 for x in diffs))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"command": " ".join(sys.argv), "ok": ok, "wall_seconds": wall, "runs": runs, "diff": diffs,
                       "packets": sum(x["packets"] for x in runs),
                       "exceptions": sum(x["exceptions"] for x in runs) + sum(x["exceptions"] for x in diffs),
                       "findings": sum(x["findings"] for x in runs) + sum(x["findings"] for x in diffs),
                       "diff_mismatches": sum(x["mismatches"] for x in diffs)}, f, indent=1, default=str)
    print("OK: no exceptions, no bad bytes, tables empty after the timeouts, flow cache = Python"
          if ok else "FAILED: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
