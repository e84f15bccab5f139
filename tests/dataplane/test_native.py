"""The native fast path (dataplane.fastpath = "native") against the Python path, byte for byte.

Two data planes over socket pairs (SOCK_SEQPACKET keeps packet boundaries,
like a TUN/TAP fd): one with the flow cache, one without. The same random
traffic goes into both (flows in both directions, TCP flags, TTL 1, options,
wrong IPv4 header checksums, fragments, oversize packets, partial checksums, super-packet headers, frames
for other hosts, garbage), with flushes, expiry, reloads and neighbour
changes in between. Every step must write the same bytes on both sides, and at
the end the engines must agree on counters, the table (expiry times) and
firewall hits, while the native side forwarded most packets without Python.
The apparatus (the two sides, framing, events) is tests/dataplane/diffharness.py,
shared with the differential fuzz run of bench/fuzz.py.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import select
import socket
import struct
import threading
import time
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from masqd.config import loads
from masqd.dataplane import _fastpath  # type: ignore[attr-defined]
from masqd.ops.runtime import rule_rows
from masqd.wire import vnet
from tests.dataplane.diffharness import (
    GW,
    LAN_HOSTS,
    REMOTES,
    WAN_IP,
    Side,
    arp_in,
    config,
    counters,
    event,
    frame,
    mac_of,
    make_side,
    rows,
    side_modes,
)


class Traffic:
    """Random packets for both sides; replies go to the WAN ports the Python side mapped."""

    def __init__(self, seed: int, mode: str, offload: bool) -> None:
        self.r = random.Random(seed)
        self.mode, self.offload = mode, offload
        self.flows = [(self.r.choice(LAN_HOSTS), 4000 + i % 5, self.r.choice(REMOTES),
                       self.r.choice([53, 80, 5201]), self.r.choice(["tcp", "udp", "icmp"])) for i in range(12)]
        self.mapped: dict[tuple[str, int, str, int, str], int] = {}

    def learn(self, outs: list[tuple[str, bytes]]) -> None:
        """Note the WAN port given to each flow (from what went out on the WAN)."""
        for iface, data in outs:
            if iface != "wan":
                continue
            frame = data[vnet.SIZE:] if self.offload else data
            if self.mode == "tap":
                if frame[12:14] != b"\x08\x00":
                    continue
                frame = frame[14:]
            p = IP(frame)
            l4 = p.payload
            if isinstance(l4, ICMP) and l4.type == 8:
                for f in self.flows:
                    if f[2] == p.dst and f[4] == "icmp" and f[1] == l4.seq:  # the sequence names the flow
                        self.mapped.setdefault(f, l4.id)
                continue
            if not isinstance(l4, (TCP, UDP)):
                continue
            for f in self.flows:
                if f[2] == p.dst and f[3] == l4.dport and f[4] == ("tcp" if p.proto == 6 else "udp"):
                    self.mapped.setdefault(f, l4.sport)

    def frame(self, iface: str, ip: bytes, our_mac: str | None = None, partial: bool = False,
              gso: bool = False) -> bytes:
        peer = mac_of(LAN_HOSTS[0]) if iface == "lan" else mac_of(GW)
        return frame(self.r, self.mode, self.offload, iface, ip, our_mac, peer, partial, gso)

    def packet(self, our_macs: dict[str, str]) -> tuple[str, bytes]:
        r = self.r
        x = r.random()
        if x < 0.02:
            return r.choice(["lan", "wan"]), bytes(r.getrandbits(8) for _ in range(r.randrange(0, 80)))
        f = r.choice(self.flows)
        lan, lport, rem, rport, proto = f
        inbound = x < 0.45 and f in self.mapped
        if inbound:
            src, dst, sport, dport, iface = rem, WAN_IP, rport, self.mapped[f], "wan"
        else:
            src, dst, sport, dport, iface = lan, rem, lport, rport, "lan"
        payload = bytes(r.getrandbits(8) for _ in range(r.choice([0, 1, 18, 64, 200])))
        if r.random() < 0.02:
            payload = bytes(1500)  # over the WAN MTU (1400) or not
        ttl = 1 if r.random() < 0.02 else 64
        kw: dict[str, Any] = {"flags": "DF"} if r.random() < 0.5 else {}
        if r.random() < 0.02:
            kw = {"flags": "MF"}
        opts: dict[str, Any] = {"options": [b"\x01\x01\x01\x00"]} if r.random() < 0.02 else {}
        if proto == "icmp":  # echo request (id = the flow's LAN port) out, its reply in
            l4: Any = ICMP(type=0 if inbound else 8, id=dport if inbound else sport, seq=lport)
            if r.random() < 0.05:
                l4.type = 13 if not inbound else 14  # timestamp: also a query
        elif proto == "tcp":
            fl = r.choices(["A", "PA", "S", "SA", "F", "FA", "R"], [40, 40, 3, 3, 2, 2, 1])[0]
            l4 = TCP(sport=sport, dport=dport, flags=fl, seq=r.getrandbits(32), ack=r.getrandbits(32))
        else:
            l4 = UDP(sport=sport, dport=dport)
        p = IP(src=src, dst=dst, ttl=ttl, **kw, **opts) / l4 / payload
        raw = bytearray(bytes(p))
        if proto == "udp" and r.random() < 0.05:
            raw[26:28] = b"\x00\x00"  # no UDP checksum: stays 0
        if r.random() < 0.04:
            raw[11] ^= 1 << r.randrange(8)  # a wrong IPv4 header checksum: dropped and counted, never forwarded
        gso = self.offload and r.random() < 0.02
        return iface, self.frame(iface, bytes(raw), our_macs[iface], partial=self.offload and r.random() < 0.5,
                                 gso=gso)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("offload", [False, True], ids=["plain", "vnet"])
@pytest.mark.parametrize("mode", ["tun", "tap"])
@pytest.mark.parametrize("driver", ["drain", "reader", "threads", "2queues"])
def test_native_writes_what_python_writes(driver: str, mode: str, offload: bool, seed: int) -> None:
    """driver "drain": a test clock, Port.drain's loop calls the cache; "reader": the monotonic
    clock, and the loop's reader is the cache itself (on_readable), calling Python for misses;
    "threads": a reader thread forwards, Python takes its misses through the loop (service);
    "2queues": two queues per device, a thread each, every packet on either (one shared cache)."""
    same_on_both_paths(driver, mode, offload, seed)


ACCOUNTING = "[masquerade]\naccounting = true\n"
ACCT_KEYS = ("packets_out", "bytes_out", "packets_in", "bytes_in")


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "vnet"])
@pytest.mark.parametrize("mode", ["tun", "tap"])
def test_accounting_counts_the_same_on_both_paths(mode: str, offload: bool) -> None:
    """masquerade.accounting: each session's packet and byte counters (in the table rows compared
    at the end) are the same whether the flow cache or Python forwarded its packets."""
    table = same_on_both_paths("drain", mode, offload, 4, ACCOUNTING)
    assert table and all("bytes_in" in r for r in table if r["proto"] in ("tcp", "udp", "icmp"))


def same_on_both_paths(driver: str, mode: str, offload: bool, seed: int, extra: str = "") -> list[dict[str, Any]]:
    """Random traffic through a Python and a native data plane; returns the (equal) table rows."""
    real = driver != "drain"
    nq = 2 if driver == "2queues" else 1
    make = functools.partial(config, extra=extra)
    py = make_side(mode, offload, "python", real, make)
    nat = make_side(mode, offload, "native", real, make, threads=driver in ("threads", "2queues"), queues=nq)
    sides = [py, nat]
    try:
        assert py.dp.native is None and nat.dp.native is not None
        assert nat.dp.native.workers == {"threads": 1, "2queues": 2}.get(driver, 0)
        assert nat.dp.reader(nat.dp.ports["lan"])[0] == (nat.dp.native.on_readable if driver == "reader"
                                                         else nat.dp._on_readable)
        macs = {side: ":".join(f"{b:02x}" for b in nat.dp.ports[side].l2.mac) if mode == "tap" else ""
                for side in ("lan", "wan")}
        if mode == "tap":  # the hosts and the gateway announce themselves
            for iface, host, target in (("lan", LAN_HOSTS[0], "10.0.0.1"), ("lan", LAN_HOSTS[1], "10.0.0.1"),
                                        ("wan", GW, WAN_IP)):
                for s in sides:
                    s.feed(iface, (vnet.ZERO if offload else b"") + arp_in(host, target))
        changes: list[list[tuple[str, str, dict[str, Any]]]] = [[], []]
        for s, seen in zip(sides, changes, strict=True):  # what masqd events would show, on each side
            # (counters only on destroy: before that, the flow cache's counts are folded in lazily)
            s.dp.engine.nat.subscribe(lambda ch, e=s.dp.engine, seen=seen: seen.append(
                (ch.kind, ch.reason, {k: v for k, v in (e.entry_row(ch.entry, 0.0) or {}).items()
                                      if k != "expires_in" and (ch.kind == "destroy" or k not in ACCT_KEYS)})))
        t = Traffic(seed, mode, offload)
        r = random.Random(seed * 7919)
        for step in range(700):
            if r.random() < 0.03:
                event(sides, r, step)
                assert py.collect() == nat.collect(), step
                continue
            iface, data = t.packet(macs)
            for s in sides:
                s.clock[0] += 0.001
            a, b = py.feed(iface, data), nat.feed(iface, data, r.randrange(nq))
            assert a == b, (step, iface, data.hex())
            t.learn(a)
        native = nat.dp.all_counters().get("fastpath_native_packets", 0)
        assert native > 60, native  # established traffic skipped Python
        assert "fastpath_native_packets" not in py.dp.all_counters()
        assert counters(py) == counters(nat)
        assert counters(nat).get("drop_bad_ip_checksum", 0) > 0
        now = py.clock[0]
        assert rows(py, now, real) == rows(nat, now, real)
        assert changes[0] == changes[1] and changes[0]  # the same changes, destroys' counters included
        if extra:
            destroyed = [row for kind, _, row in changes[1] if kind == "destroy"]
            assert sum(row.get("packets_out", 0) + row.get("packets_in", 0) for row in destroyed) > 20
        assert rule_rows(py.dp.engine) == rule_rows(nat.dp.engine)
        assert any(row["pkts"] for row in rule_rows(nat.dp.engine) or [])
        return rows(nat, now, real)
    finally:
        for s in sides:
            s.close()


@pytest.mark.parametrize("mode", ["tun", "tap", "tun/tap", "tap/tun"])
def test_a_ping_goes_native_both_ways_once_established(mode: str) -> None:
    """Both sides TUN or TAP, or one of each (LAN/WAN): the native path writes a TAP frame in one
    piece in the buffer it read, and in pieces (writev) when the input's headers were shorter
    (TUN in, TAP out); the bytes are the same."""
    s = make_side(mode, True, "native")
    modes = side_modes(mode)
    head = {side: vnet.SIZE + (14 if modes[side] == "tap" else 0) for side in ("lan", "wan")}
    try:
        for iface, host, target in (("lan", LAN_HOSTS[0], "10.0.0.1"), ("wan", GW, WAN_IP)):
            if modes[iface] == "tap":
                s.feed(iface, vnet.ZERO + arp_in(host, target))
        macs = {side: s.dp.ports[side].l2.mac if modes[side] == "tap" else b"" for side in ("lan", "wan")}

        def frame(iface: str, p: bytes) -> bytes:
            if modes[iface] == "tap":
                peer = mac_of(LAN_HOSTS[0]) if iface == "lan" else mac_of(GW)
                p = bytes(Ether(src=peer, dst=":".join(f"{b:02x}" for b in macs[iface]), type=0x0800)) + p
            return vnet.ZERO + p

        def l2_ok(iface: str, f: bytes, to: str) -> None:
            assert f[:vnet.SIZE] == vnet.ZERO
            if modes[iface] == "tap":  # to the neighbour it learnt, from masqd's own MAC, IPv4
                assert f[vnet.SIZE:vnet.SIZE + 14] == bytes.fromhex(mac_of(to).replace(":", "")) + macs[iface] \
                    + b"\x08\x00"

        replies = []
        for seq in range(6):
            req = IP(src=LAN_HOSTS[0], dst=REMOTES[0]) / ICMP(type=8, id=777, seq=seq) / (b"p" * 56)
            (out,) = s.feed("lan", frame("lan", bytes(req)))
            l2_ok("wan", out[1], GW)
            q = IP(out[1][head["wan"]:])
            assert q.src == WAN_IP and q[ICMP].seq == seq
            rep_ = IP(src=REMOTES[0], dst=WAN_IP) / ICMP(type=0, id=q[ICMP].id, seq=seq) / (b"p" * 56)
            (back,) = s.feed("wan", frame("wan", bytes(rep_)))
            l2_ok("lan", back[1], LAN_HOSTS[0])
            b = IP(back[1][head["lan"]:])
            replies.append(b)
            assert b.dst == LAN_HOSTS[0] and b[ICMP].id == 777 and b[ICMP].seq == seq
            for pk in (q, b):  # checksums as scapy computes them
                raw_ = bytearray(bytes(pk))
                raw_[10:12] = b"\0\0"
                raw_[22:24] = b"\0\0"
                fresh = IP(bytes(raw_))
                del fresh.chksum
                del fresh[ICMP].chksum
                fresh = IP(bytes(fresh))
                assert (fresh.chksum, fresh[ICMP].chksum) == (pk.chksum, pk[ICMP].chksum)
        # the first request and reply made the session and taught the cache; then it all went native
        # (a request and a reply more went through Python before each direction was learnt)
        assert s.dp.all_counters()["fastpath_native_packets"] >= 8
        c = s.dp.engine.counters
        assert c["tx_wan_icmp_packets"] == 6 and c["tx_lan_icmp_packets"] == 6
    finally:
        s.close()


def test_cached_flows_stay_cached_across_neighbour_ticks_until_a_neighbour_ages() -> None:
    """TAP: the neighbour tick used to empty the flow cache four times a second (every flow's
    next packet through Python: the p99 of the added RTT). It now does so only when a neighbour
    passes its reachable time (60 s), so that its next use re-confirms it (a unicast probe)."""
    s = make_side("tap", False, "native")
    try:
        for iface, host, target in (("lan", LAN_HOSTS[0], "10.0.0.1"), ("wan", GW, WAN_IP)):
            s.feed(iface, arp_in(host, target))
        macs = {side: s.mac(side) for side in ("lan", "wan")}

        def ping(seq: int) -> None:
            req = IP(src=LAN_HOSTS[0], dst=REMOTES[0]) / ICMP(type=8, id=778, seq=seq) / (b"p" * 56)
            outs = s.feed("lan", bytes(Ether(src=mac_of(LAN_HOSTS[0]), dst=macs["lan"], type=0x0800) / req))
            q = IP([o for i, o in outs if i == "wan"][0][14:])
            rep = IP(src=REMOTES[0], dst=WAN_IP) / ICMP(type=0, id=q[ICMP].id, seq=seq) / (b"p" * 56)
            outs = s.feed("wan", bytes(Ether(src=mac_of(GW), dst=macs["wan"], type=0x0800) / rep))
            assert [IP(o[14:])[ICMP].seq for i, o in outs if i == "lan"] == [seq]

        for seq in range(3):
            ping(seq)
        fc = s.dp.native
        assert len(fc) == 2  # both directions cached
        native = s.dp.all_counters()["fastpath_native_packets"]
        for _ in range(8):  # two seconds of neighbour ticks
            s.clock[0] += 0.25
            s.dp._l2_tick()
        assert len(fc) == 2
        ping(3)
        assert s.dp.all_counters()["fastpath_native_packets"] == native + 2  # still native, both ways
        assert "dp_neighbour_aging_flushes" not in s.dp.counters
        # a minute on, the gateway has aged: the cache lets go, the next packet re-confirms it
        s.clock[0] += 60.0
        s.dp._l2_tick()
        assert len(fc) == 0 and s.dp.counters["dp_neighbour_aging_flushes"] == 1
        ping(4)
        s.clock[0] += 0.25
        s.dp._l2_tick()
        probes = [Ether(f) for i, f in s.collect() if i == "wan" and Ether(f).type == 0x0806]
        assert probes and probes[0].dst == mac_of(GW) and probes[0][ARP].pdst == GW  # unicast, as Linux
    finally:
        s.close()


def test_flow_cache_refuses_bad_entries_and_keeps_counts() -> None:
    fc = _fastpath.FlowCache()
    good = (0, 17, bytes(12), object(), bytes(4), 1, 1, 1, 1500, b"")
    assert fc.add(*good) is True and len(fc) == 1
    for bad in [(2, *good[1:]), (0, 2, *good[2:]), (0, 17, bytes(11), *good[3:]), (*good[:5], 70000, *good[6:]),
                (*good[:6], -1, *good[7:]), (*good[:9], bytes(13))]:
        with pytest.raises(ValueError):
            fc.add(*bad)
    with pytest.raises(TypeError):
        fc.drain(0)
    with pytest.raises(ValueError):
        fc.drain(0, 1, 0.0)  # no device set
    assert fc.sync() == [] and fc.clear() == [] and len(fc) == 0
    assert fc.take_errors() == (0, 0, 0, 0)


def test_flow_cache_fills_up_and_says_so() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        for s in (a, b, c, d):
            s.setblocking(False)
        fc = _fastpath.FlowCache()
        fc.set_port(0, a.fileno(), False, False, b"")
        fc.set_port(1, c.fileno(), False, False, b"")
        token = object()
        added = sum(fc.add(0, 17, struct.pack("!IIHH", i, 7, 1, 2), token, bytes(4), 9, 0, 0, 1500, b"")
                    for i in range(_fastpath.MAX_ENTRIES + 10))
        assert added == _fastpath.MAX_ENTRIES == len(fc)
        assert fc.take_errors() == (0, 0, 10, 0)
        # a cached flow is forwarded: source rewritten, TTL decremented; others come back as read
        pkt = bytes(IP(src="0.0.0.5", dst="0.0.0.7", ttl=9) / UDP(sport=1, dport=2) / (b"x" * 20))
        b.send(pkt)
        b.send(b"not a packet")
        reads, fwd, rest = fc.drain(0, 10, 5.0)
        assert (reads, fwd, rest) == (2, 1, b"not a packet")
        out = IP(d.recv(2000))
        assert out.src == "0.0.0.0" and out.ttl == 8 and out[UDP].sport == 9
        assert fc.drain(0, 10, 5.0) == (0, 0, None)  # would block
        rows = fc.clear()
        assert rows == [(token, 0, 17, 1, len(pkt), 5.0, 1)] and len(fc) == 0
        # a write that fails is counted, not raised
        fc.add(0, 17, struct.pack("!IIHH", 5, 7, 1, 2), token, bytes(4), 9, 0, 0, 1500, b"")
        ro = os.open("/dev/null", os.O_RDONLY)
        try:
            fc.set_port(1, ro, False, False, b"")
            b.send(pkt)
            assert fc.drain(0, 10, 6.0) == (1, 1, None)
            assert fc.take_errors() == (0, 1, 0, 0)
        finally:
            os.close(ro)
    finally:
        for s in (a, b, c, d):
            s.close()


def test_flow_cache_forgets_entries_one_by_one_and_finds_every_other_one_after() -> None:
    """forget drops the entries of the keys given that still hold the token given (their counts
    returned), out of a full table where probe runs are long; every entry left is still found
    (adding it again changes nothing) and a forgotten key can be taught again."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        for x in (a, b, c, d):
            x.setblocking(False)
        fc = _fastpath.FlowCache()
        fc.set_port(0, a.fileno(), False, False, b"")
        fc.set_port(1, c.fileno(), False, False, b"")
        n = _fastpath.MAX_ENTRIES
        keys = [struct.pack("!IIHH", i, 7, 1, 2) for i in range(n)]
        tokens = [object() for _ in range(n)]
        for k, t in zip(keys, tokens, strict=True):
            assert fc.add(0, 17, k, t, bytes(4), 9, 0, 0, 1500, b"") is True
        assert len(fc) == n
        b.send(bytes(IP(src="0.0.0.5", dst="0.0.0.7", ttl=9) / UDP(sport=1, dport=2) / (b"x" * 20)))
        assert fc.drain(0, 10, 5.0)[:2] == (1, 1)  # key 5 forwarded one packet
        r = random.Random(7)
        gone = set(r.sample(range(n), n // 2)) | {5}
        wrong = r.sample(sorted(set(range(n)) - gone), 100)  # right key, another token: kept
        rows = [(0, 17, keys[i], tokens[i]) for i in sorted(gone)] + [(0, 17, keys[i], object()) for i in wrong]
        counts = fc.forget(rows)
        assert [(c[0], c[3]) for c in counts] == [(tokens[5], 1)]  # the counts of what it dropped
        assert len(fc) == n - len(gone)
        for i in range(n):  # every entry left is found where it is: teaching it again adds nothing
            if i not in gone:
                assert fc.add(0, 17, keys[i], tokens[i], bytes(4), 9, 0, 0, 1500, b"") is True
        assert len(fc) == n - len(gone)
        assert fc.forget([(0, 17, keys[5], tokens[5])]) == [] and len(fc) == n - len(gone)  # gone already
        for i in sorted(gone)[:10]:
            assert fc.add(0, 17, keys[i], tokens[i], bytes(4), 9, 0, 0, 1500, b"") is True
        assert len(fc) == n - len(gone) + 10
        with pytest.raises(ValueError):
            fc.forget([(0, 17, bytes(11), tokens[0])])
        with pytest.raises(TypeError):
            fc.forget("not a list")
        assert len(fc) == n - len(gone) + 10
    finally:
        for x in (a, b, c, d):
            x.close()


@pytest.mark.parametrize("fastpath,real_clock,threads", [("native", True, True), ("native", True, False),
                                                         ("native", False, False), ("python", True, False)],
                         ids=["rounds-in-threads", "rounds-in-the-cache", "rounds-in-python", "python"])
def test_coalesce_drains_in_rounds_under_load_and_not_when_quiet(fastpath: str, real_clock: bool,
                                                                 threads: bool) -> None:
    """dataplane.coalesce: a wake-up that finds a burst sleeps and drains both ports again while
    packets keep coming (bounded in time); a lone packet is forwarded at once, no round. The
    rounds run inside the flow cache when the data plane's clock is the monotonic clock it reads
    (in the reader thread, which then never wakes the loop)."""
    s = make_side("tun", False, fastpath, real_clock, threads=threads)
    try:
        cfg = loads(config("tun", False, fastpath).replace(
            f'[dataplane]\nfastpath = "{fastpath}"\n', f'[dataplane]\nfastpath = "{fastpath}"\ncoalesce = 0.0005\n'))
        s.dp.sync_native()
        s.dp.engine.reload(cfg)
        s.dp.on_reload(cfg)
        assert s.dp.coalesce == 0.0005
        flow = bytes(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=4000, dport=53) / (b"q" * 32))
        assert len(s.feed("lan", flow)) == 1  # alone: no round
        assert "dp_coalesce_rounds" not in s.dp.counters
        # a sender keeps bursts coming every 100 µs or so for 30 ms; masqd is called when its fd
        # is readable, as the loop calls it
        stop = time.monotonic() + 0.03
        sent = [0]

        def sender() -> None:
            w = socket.socket(fileno=os.dup(s.wires["lan"].fileno()))
            try:
                while time.monotonic() < stop:
                    for _ in range(3):
                        w.send(flow)
                    sent[0] += 3
                    time.sleep(0.0001)
            finally:
                w.close()

        t = threading.Thread(target=sender)
        t.start()
        wakeups, longest = 0, 0.0
        fd = s.dp.ports["lan"].fd if not threads else s.dp.cache.efd
        while t.is_alive():
            if not select.select([fd], [], [], 0.005)[0]:  # what the loop's epoll does
                continue
            if threads:  # the thread handed something to Python: nothing should
                s.dp.native.service()
                wakeups += 1
                continue
            start = time.monotonic()
            s.readable("lan")
            longest = max(longest, time.monotonic() - start)
            wakeups += 1
        t.join()
        while True:  # what is left
            before = s.dp.all_counters().get("tx_wan_udp_packets", 0)
            s.readable("lan")
            if s.dp.all_counters().get("tx_wan_udp_packets", 0) == before:
                break
        rounds = s.dp.counters["dp_coalesce_rounds"]
        assert rounds >= 10, rounds
        if threads:
            assert wakeups == 0, wakeups
        # each wake-up held the loop for rounds of 500 µs, not more than COALESCE_HOLD and a pause
        # (and a slow machine's margin); without rounds there would be hundreds of wake-ups
        assert wakeups < 60, wakeups
        assert longest < 0.002 + 0.0005 + 0.01, longest
        out = s.collect()
        assert len(out) == sent[0] and all(i == "wan" for i, _ in out)
        if fastpath == "native":  # all of them: the flow's first packet (fed alone above) made the
            # session, and the cache learnt the flow from it
            assert s.dp.all_counters()["fastpath_native_packets"] == len(out)
        assert not any(k.endswith("_errors") for k in s.dp.counters), s.dp.counters
        assert s.dp.snapshot()["coalesce"] == 0.0005
    finally:
        s.close()
    with pytest.raises(Exception, match="coalesce"):
        loads(config("tun", False, "native").replace('fastpath = "native"\n', 'fastpath = "native"\ncoalesce = 0.01\n'))


def test_while_a_capture_runs_every_packet_goes_through_python() -> None:
    """ops capture (pcap) records what Python sees: while it is active, the flow cache's reader
    hands every packet back, so nothing is forwarded unseen; when it stops, the cache resumes."""

    class Tap:
        def __init__(self) -> None:
            self.active = False
            self.seen: list[tuple[str, bytes]] = []

        def record(self, iface: str, packet: bytes | bytearray | memoryview) -> None:
            self.seen.append((iface, bytes(packet)))

    s = make_side("tun", False, "native", real_clock=True)
    tap = Tap()
    try:
        s.dp.set_capture(tap)
        flow = bytes(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=4000, dport=53) / (b"q" * 32))
        for _ in range(3):  # the session (the cache learns the flow from it), then natively
            assert len(s.feed("lan", flow)) == 1
        native = s.dp.all_counters()["fastpath_native_packets"]
        assert native == 2 and tap.seen == []
        tap.active = True
        s.dp._capture_tick()  # (the data plane looks every CAPTURE_TICK)
        for _ in range(4):
            assert len(s.feed("lan", flow)) == 1
        assert s.dp.all_counters()["fastpath_native_packets"] == native
        assert [i for i, _ in tap.seen] == ["lan", "wan"] * 4  # each packet in and out
        tap.active = False
        s.dp._capture_tick()
        assert len(s.feed("lan", flow)) == 1
        assert s.dp.all_counters()["fastpath_native_packets"] == native + 1 and len(tap.seen) == 8
    finally:
        s.close()


@pytest.mark.parametrize("threads", [False, True], ids=["reader", "threads"])
def test_a_miss_handler_that_raises_reaches_the_loop_and_the_reader_goes_on(threads: bool) -> None:
    """A bug in Python under the reader must not wedge it: the exception propagates to the loop
    (which logs it) and the next wake-up works. With reader threads it comes out of the loop's
    callback for their eventfd (service), and the thread that waited goes on."""
    s = make_side("tun", False, "native", real_clock=True, threads=threads)
    try:
        calls = []

        def bad(data: bytes | int, now: float) -> int:
            calls.append(data)
            raise RuntimeError("boom")

        s.dp.native.set_miss(0, bad)
        s.wires["lan"].send(b"\x45" + bytes(30))
        with pytest.raises(RuntimeError, match="boom"):
            if threads:
                assert s.dp.cache.efd is not None
                assert select.select([s.dp.cache.efd], [], [], 5)[0]  # the thread waits with it
                s.dp.native.service()
            else:
                s.readable("lan")
        s.dp.native.set_miss(0, s.dp.ports["lan"].native_miss)
        flow = bytes(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=4000, dport=53) / (b"q" * 32))
        assert len(s.feed("lan", flow)) == 1 and len(calls) == 1
    finally:
        s.close()


def test_one_wake_up_of_the_loop_serves_a_burst_of_misses_from_a_reader_thread() -> None:
    """A flood of new flows (every packet a miss): the thread hands its first miss to the loop,
    and service() reads what queued up behind it on that queue itself, in order, in the same
    wake-up. One wake-up per packet was what let one host's flood starve everyone (bench/flood.py:
    at 20 000 new flows a second masqd read 70 % of them and another host's pings lost 21 %)."""
    s = make_side("tun", False, "native", real_clock=True, threads=True)
    try:
        n = 40
        for i in range(n):  # 40 new flows, all queued before the loop runs
            s.wires["lan"].send(bytes(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=5000 + i, dport=53)
                                      / (b"q" * 32)))
        assert s.dp.cache.efd is not None
        wakeups, out = 0, []
        deadline = time.monotonic() + 10
        while len(out) < n and time.monotonic() < deadline:
            if select.select([s.dp.cache.efd], [], [], 0.05)[0]:
                s.dp.native.service()
                wakeups += 1
            out += s.collect()
        assert len(out) == n and all(i == "wan" for i, _ in out)
        assert [IP(p)[UDP].dport for _, p in out] == [53] * n
        # 40 sessions (ports preserved), their packets in the order sent
        assert [IP(p)[UDP].sport for _, p in out] == [5000 + i for i in range(n)]
        assert wakeups <= 3, wakeups
    finally:
        s.close()


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "vnet"])
@pytest.mark.parametrize("mode", ["tun", "tap"])
def test_mangled_packets_of_cached_flows_get_what_python_gives_them(mode: str, offload: bool) -> None:
    """The cache's own checks against the engine's: packets of established (cached) flows with
    one to three header bytes changed, or cut short, or padded, give the same bytes out (or
    nothing) as on the Python side, and the flows stay cached for their intact packets."""
    py, nat = make_side(mode, offload, "python", True), make_side(mode, offload, "native", True)
    sides = [py, nat]
    r = random.Random(4242)
    try:
        macs = {side: nat.dp.ports[side].l2.mac.hex(":") if mode == "tap" else "" for side in ("lan", "wan")}
        if mode == "tap":
            for iface, host, target in (("lan", LAN_HOSTS[0], "10.0.0.1"), ("wan", GW, WAN_IP)):
                for s in sides:
                    s.feed(iface, (vnet.ZERO if offload else b"") + arp_in(host, target))
        t = Traffic(7, mode, offload)
        head = (vnet.SIZE if offload else 0) + (14 if mode == "tap" else 0)

        def ours(iface: str, p: bytes) -> bytes:
            """A frame of ``p`` addressed to masqd (frame() sometimes addresses another host)."""
            while True:
                f = t.frame(iface, p, macs[iface])
                if mode == "tun" or f[head - 14: head - 8] == nat.dp.ports[iface].l2.mac:
                    return f

        lan, rem = LAN_HOSTS[0], REMOTES[0]
        outs = [bytes(IP(src=lan, dst=rem) / UDP(sport=5000, dport=53) / (b"u" * 40)),
                bytes(IP(src=lan, dst=rem) / TCP(sport=5001, dport=80, flags="A") / (b"t" * 40)),
                bytes(IP(src=lan, dst=rem) / ICMP(type=8, id=9, seq=1) / (b"i" * 40))]
        for p in outs:  # establish each flow both ways: session, reply, lessons
            for _ in range(3):
                f = ours("lan", p)
                a = [s.feed("lan", f) for s in sides]
                assert a[0] == a[1]
                q = IP(a[0][0][1][head:])
                if ICMP in q:
                    back = IP(src=rem, dst=WAN_IP) / ICMP(type=0, id=q[ICMP].id, seq=1) / (b"i" * 40)
                elif TCP in q:
                    back = IP(src=rem, dst=WAN_IP) / TCP(sport=80, dport=q[TCP].sport, flags="A") / (b"t" * 40)
                else:
                    back = IP(src=rem, dst=WAN_IP) / UDP(sport=53, dport=q[UDP].sport) / (b"u" * 40)
                f = ours("wan", bytes(back))
                b = [s.feed("wan", f) for s in sides]
                assert b[0] == b[1] and b[0]
        replies = []
        for p in outs:
            f = ours("lan", p)
            a = [s.feed("lan", f) for s in sides]
            q = IP(a[0][0][1][head:])
            l4 = q.payload
            if isinstance(l4, ICMP):
                replies.append(bytes(IP(src=rem, dst=WAN_IP) / ICMP(type=0, id=l4.id, seq=1) / (b"i" * 40)))
            else:
                cls = type(l4)
                replies.append(bytes(IP(src=rem, dst=WAN_IP) / cls(sport=l4.dport, dport=l4.sport) / (b"x" * 40)))
        before = nat.dp.all_counters()["fastpath_native_packets"]
        for _ in range(500):
            iface = r.choice(["lan", "wan"])
            base = r.choice(outs if iface == "lan" else replies)
            frame = bytearray(t.frame(iface, base, macs[iface]))
            how = r.random()
            if how < 0.8:
                for _ in range(r.randint(1, 3)):
                    frame[r.randrange(0, min(len(frame), head + 40))] = r.getrandbits(8)
            elif how < 0.9:
                del frame[r.randrange(0, len(frame)):]
            else:
                frame += bytes(r.randrange(1, 30))
            got = [s.feed(iface, bytes(frame)) for s in sides]
            assert got[0] == got[1], (iface, t.frame(iface, base, macs[iface]).hex(), frame.hex())
            good = t.frame(iface, base, macs[iface])  # (one frame for both: frame() draws at random)
            intact = [s.feed(iface, good) for s in sides]
            assert intact[0] == intact[1]
        assert nat.dp.all_counters()["fastpath_native_packets"] > before + 300  # intact ones, mostly
        assert counters(py) == counters(nat)
    finally:
        for s in sides:
            s.close()


def test_a_reload_switches_the_fast_path_and_the_readers_follow() -> None:
    s = make_side("tun", False, "native", real_clock=True)
    try:
        flow = bytes(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=4000, dport=53) / (b"q" * 32))
        for _ in range(3):  # the session (the cache learns the flow from it), then natively
            assert len(s.feed("lan", flow)) == 1
        assert s.dp.all_counters()["fastpath_native_packets"] == 2
        for fastpath, native in (("python", False), ("native", True)):
            cfg = loads(config("tun", False, fastpath))
            s.dp.sync_native()
            s.dp.engine.reload(cfg)
            s.dp.on_reload(cfg)
            assert (s.dp.native is not None) == native
            # native: the loop serves the reader threads' eventfd, not the device fds
            registered = set(s.dp.loop._selector.get_map())  # type: ignore[attr-defined]
            lan_fd = s.dp.ports["lan"].fd
            if native:
                assert s.dp.cache.efd in registered and lan_fd not in registered
            else:
                assert s.dp.cache.efd is None and lan_fd in registered
            assert s.dp.snapshot()["fastpath"] == fastpath
            for _ in range(3):
                assert len(s.feed("lan", flow)) == 1
        # counted: two native packets, none while off, then two again (the reload voided the
        # session's cached decision: its first packet after it took the full path, and taught the cache)
        assert s.dp.all_counters()["fastpath_native_packets"] == 4
        assert s.dp.engine.counters["tx_wan_udp_packets"] == 9
    finally:
        s.close()


class Vpn:
    """An ESP pair and a PPTP call set up through both sides, and their packets (with mangling)."""

    def __init__(self, sides: list[Side], t: Traffic, macs: dict[str, str], r: random.Random) -> None:
        self.sides, self.t, self.macs, self.r = sides, t, macs, r
        self.head = (vnet.SIZE if t.offload else 0) + (14 if t.mode == "tap" else 0)
        self.spi_out = self.spi_in = 0
        self.masq = self.tcp_port = self.wport = 0
        self.seq = 0
        self.old: list[tuple[int, int]] = []  # earlier pairs' SPIs (replaced, then expired)
        self.rem_cid = 0x900
        self.old_calls: list[tuple[int, int]] = []  # earlier calls' (server's, masqueraded) Call IDs
        self.req_len = self.rep_len = 0

    def ours(self, iface: str, p: bytes) -> bytes:
        nat = self.sides[1].dp
        while True:
            f = self.t.frame(iface, p, self.macs[iface])
            if self.t.mode == "tun" or f[self.head - 14: self.head - 8] == nat.ports[iface].l2.mac:
                return f

    def feed(self, iface: str, p: bytes) -> list[tuple[str, bytes]]:
        f = self.ours(iface, p)
        a, b = (s.feed(iface, f) for s in self.sides)
        assert a == b, (iface, f.hex())
        return a

    def esp(self, inbound: bool, spi: int) -> bytes:
        self.seq += 1
        body = struct.pack("!II", spi, self.seq) + bytes(self.r.getrandbits(8) for _ in range(self.r.choice([8, 40, 200])))
        src, dst = (REMOTES[0], WAN_IP) if inbound else (LAN_HOSTS[0], REMOTES[0])
        return bytes(IP(src=src, dst=dst, proto=50, flags="DF") / body)

    def gre(self, inbound: bool, call: tuple[int, int] | None = None) -> bytes:
        from masqd.wire.gre import build_pptp_gre

        rem_cid, masq = call or (self.rem_cid, self.masq)
        self.seq += 1
        ppp = b"\xff\x03\x00\x21" + bytes(self.r.getrandbits(8) for _ in range(self.r.choice([4, 28, 300])))
        ack = self.seq if self.r.random() < 0.3 else None
        if inbound:
            return bytes(IP(src=REMOTES[0], dst=WAN_IP, proto=47) / build_pptp_gre(masq, ppp, self.seq, ack))
        return bytes(IP(src=LAN_HOSTS[0], dst=REMOTES[0], proto=47) / build_pptp_gre(rem_cid, ppp, self.seq, ack))

    def setup(self) -> None:
        """A new ESP pair (fresh SPIs: an older pair is replaced) and a new PPTP call (a new control
        connection from a new port), each established both ways with its firewall decisions cached."""
        from masqd.wire import pptp as W

        r = self.r
        lan, rem = LAN_HOSTS[0], REMOTES[0]
        if self.masq:  # the previous call is cleared by the client (it goes after call_clear_timeout)
            clr = W.build(W.CALL_CLEAR_REQ, call_id=0x100)
            self.feed("lan", bytes(IP(src=lan, dst=rem) / TCP(sport=self.tcp_port, dport=1723, flags="PA",
                                                              seq=1 + self.req_len, ack=1 + self.rep_len) / clr))
            self.old_calls.append((self.rem_cid, self.masq))
            self.rem_cid += 1
        for s in self.sides:  # pending entries left by mangled SPIs go (they would block the new SA)
            if s.dp.clock is time.monotonic:
                s.dp.sync_native()
                s.dp.engine.flush()
            else:  # they expire
                s.clock[0] += s.dp.cfg.ipsec.pending_lifetime + 1
                s.dp._expire()
        if self.t.mode == "tap":  # the neighbours answer again (time has aged them out)
            for iface, host, target in (("lan", LAN_HOSTS[0], "10.0.0.1"), ("wan", GW, WAN_IP)):
                for s in self.sides:
                    s.feed(iface, (vnet.ZERO if self.t.offload else b"") + arp_in(host, target))
        if self.spi_out:
            self.old.append((self.spi_out, self.spi_in))
        self.spi_out, self.spi_in = r.randrange(0x100, 1 << 31), r.randrange(0x100, 1 << 31)
        for _ in range(3):  # pending, paired by the reply; then the cached decisions
            assert self.feed("lan", self.esp(False, self.spi_out))
            assert self.feed("wan", self.esp(True, self.spi_in))
        self.tcp_port = r.randrange(20000, 60000)
        o = self.feed("lan", bytes(IP(src=lan, dst=rem) / TCP(sport=self.tcp_port, dport=1723, flags="S", seq=0)))
        self.wport = IP(o[0][1][self.head:])[TCP].sport
        self.feed("wan", bytes(IP(src=rem, dst=WAN_IP) / TCP(sport=1723, dport=self.wport, flags="SA", seq=0, ack=1)))
        req = W.build(W.OUT_CALL_REQ, call_id=0x100)
        self.req_len = len(req)
        o = self.feed("lan", bytes(IP(src=lan, dst=rem) / TCP(sport=self.tcp_port, dport=1723, flags="PA", seq=1, ack=1)
                                   / req))
        self.masq = int.from_bytes(bytes(IP(o[0][1][self.head:])[TCP].payload)[12:14], "big")
        rep = W.build(W.OUT_CALL_REPLY, call_id=self.rem_cid, peer_call_id=self.masq)
        self.rep_len = len(rep)
        self.feed("wan", bytes(IP(src=rem, dst=WAN_IP) / TCP(sport=1723, dport=self.wport, flags="PA", seq=1,
                                                             ack=1 + len(req)) / rep))
        for _ in range(3):
            assert self.feed("lan", self.gre(False))
            assert self.feed("wan", self.gre(True))


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "vnet"])
@pytest.mark.parametrize("mode", ["tun", "tap"])
@pytest.mark.parametrize("driver", ["drain", "reader", "threads", "2queues"])
def test_native_vpn_writes_what_python_writes(driver: str, mode: str, offload: bool) -> None:
    """ESP pairs and PPTP calls' GRE are forwarded by the flow cache once established (ESP: the
    address; GRE: the address and, inbound, the key back to the client's Call ID): the same
    bytes as the Python path, intact or mangled, through re-keys, new calls, flushes, expiry,
    reloads and neighbour changes; the same counters, table (expiry) and firewall hits after."""
    real = driver != "drain"
    nq = 2 if driver == "2queues" else 1
    py = make_side(mode, offload, "python", real)
    nat = make_side(mode, offload, "native", real, threads=driver in ("threads", "2queues"), queues=nq)
    sides = [py, nat]
    r = random.Random(1701)
    try:
        macs = {side: nat.dp.ports[side].l2.mac.hex(":") if mode == "tap" else "" for side in ("lan", "wan")}
        if mode == "tap":
            for iface, host, target in (("lan", LAN_HOSTS[0], "10.0.0.1"), ("wan", GW, WAN_IP)):
                for s in sides:
                    s.feed(iface, (vnet.ZERO if offload else b"") + arp_in(host, target))
        t = Traffic(11, mode, offload)
        v = Vpn(sides, t, macs, r)
        native0 = 0
        for rnd in range(4):
            v.setup()
            before = nat.dp.all_counters().get("fastpath_native_packets", 0)
            for step in range(150):
                if r.random() < 0.02:
                    what = event(sides, r, rnd * 1000 + step)
                    assert py.collect() == nat.collect(), what
                    continue
                inbound = r.random() < 0.5
                iface = "wan" if inbound else "lan"
                spis = (v.spi_out, v.spi_in) if not v.old or r.random() < 0.8 else r.choice(v.old)
                call = None if not v.old_calls or r.random() < 0.8 else r.choice(v.old_calls)
                pkt = v.esp(inbound, spis[inbound]) if r.random() < 0.5 else v.gre(inbound, call)
                frame = bytearray(v.ours(iface, pkt))
                how = r.random()
                if how < 0.15:  # a header byte (IPv4, ESP's SPI, GRE's flags, length, key) changed
                    frame[v.head + r.choice([0, 2, 3, 8, 9, 12, 16, 19, 20, 21, 22, 24, 25, 26, 27])] ^= 1 << r.randrange(8)
                elif how < 0.2:
                    del frame[r.randrange(0, len(frame)):]
                got = [py.feed(iface, bytes(frame)), nat.feed(iface, bytes(frame), r.randrange(nq))]
                assert got[0] == got[1], (rnd, step, iface, bytes(frame).hex())
            native0 = nat.dp.all_counters().get("fastpath_native_packets", 0)
            assert native0 > before + 25, (rnd, before, native0)  # established VPN traffic skipped Python
            if rnd == 2:  # everything goes, the helpers' entries too
                for s in sides:
                    s.dp.sync_native()
                    assert s.dp.engine.flush() > 0
        assert counters(py) == counters(nat)
        now = py.clock[0]

        assert rows(py, now, real) == rows(nat, now, real)
        assert rule_rows(py.dp.engine) == rule_rows(nat.dp.engine)
        c = nat.dp.all_counters()
        assert c["tx_wan_esp_packets"] > 100 and c["tx_lan_gre_packets"] > 100, c
    finally:
        for s in sides:
            s.close()


def test_reader_threads_under_load_with_the_engine_changing_under_them() -> None:
    """Two queues, a reader thread each, both forwarding at once while the main thread folds
    counts, flushes the table (the cache empties; the next packets make new sessions through
    Python) and expires: nothing is lost or counted twice, nothing deadlocks."""
    s = make_side("tun", False, "native", real_clock=True, queues=2)
    try:
        assert s.dp.native.workers == 2
        flows = [bytes(IP(src=LAN_HOSTS[i % 2], dst=REMOTES[0]) / UDP(sport=6000 + i, dport=53) / (b"z" * 40))
                 for i in range(8)]
        for q, f in enumerate(flows):
            assert len(s.feed("lan", f, q % 2)) == 1
        sent = [0, 0]
        n_each = 3000

        def sender(q: int) -> None:
            w = s.qwires["lan"][q]
            for k in range(n_each):
                while True:
                    try:
                        w.send(flows[(k % 4) * 2 + q])
                        break
                    except BlockingIOError:
                        time.sleep(0.0002)
                sent[q] += 1
                if k % 100 == 99:
                    time.sleep(0.001)  # (a sender that lasts: the main thread works meanwhile)

        ts = [threading.Thread(target=sender, args=(q,)) for q in (0, 1)]
        for t in ts:
            t.start()
        flushes = rounds = 0
        out = 0
        while any(t.is_alive() for t in ts):
            s.dp.loop.run_until_complete(asyncio.sleep(0.001))  # serves misses, ends holds
            s.dp.sync_native()
            rounds += 1
            if flushes < 5 and rounds % 2 == 1:
                s.dp.engine.flush(lan_ip=int.from_bytes(bytes([10, 0, 0, 2]), "big"))
                flushes += 1
            s.dp._expire()
            out += len(s.collect())
        for t in ts:
            t.join()
        s.settle()
        out += len(s.collect())
        assert flushes >= 1
        assert out == sum(sent) == 2 * n_each
        c = s.dp.all_counters()
        assert c["tx_wan_udp_packets"] == c["rx_lan_udp_packets"] == out + len(flows)
        assert c["fastpath_native_packets"] > sum(sent) // 2, c
        assert not any(k.endswith("_errors") for k in s.dp.counters), s.dp.counters
    finally:
        s.close()


def test_with_the_python_fast_path_every_queue_is_read() -> None:
    """Devices opened with two queues for reader threads, then a reload to fastpath = "python":
    the loop reads both queues (the kernel may send a flow to either)."""
    s = make_side("tun", False, "native", real_clock=True, queues=2)
    try:
        assert s.dp.native.workers == 2
        cfg = loads(config("tun", False, "python"))
        s.dp.sync_native()
        s.dp.engine.reload(cfg)
        s.dp.on_reload(cfg)
        assert s.dp.native is None and s.dp.cache.efd is None
        registered = set(s.dp.loop._selector.get_map())  # type: ignore[attr-defined]
        assert set(s.dp.ports["lan"].fds) <= registered and set(s.dp.ports["wan"].fds) <= registered
        flow = bytes(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=4000, dport=53) / (b"q" * 32))
        for q in (0, 1, 1, 0):
            s.qwires["lan"][q].send(flow)
            s.dp.loop.run_until_complete(asyncio.sleep(0.01))  # the loop's readers take it
            out = s.collect()
            assert len(out) == 1 and out[0][0] == "wan", (q, out)
    finally:
        s.close()


def test_without_the_compiled_module_python_forwards_from_every_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed without a C compiler: fastpath = "native" runs as "python", counted, and the
    loop reads every queue of the multiqueue devices."""
    from masqd.dataplane import native as native_mod

    monkeypatch.setattr(native_mod, "_fastpath", None)
    s = make_side("tun", False, "native", real_clock=True, queues=2)
    try:
        assert s.dp.native is None and s.dp.counters["fastpath_native_unavailable"] == 1
        flow = bytes(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=4000, dport=53) / (b"q" * 32))
        for q in (0, 1):
            s.qwires["lan"][q].send(flow)
            s.dp.loop.run_until_complete(asyncio.sleep(0.01))
            assert [i for i, _ in s.collect()] == ["wan"], q
        assert s.dp.snapshot()["fastpath"] == "python"
    finally:
        s.close()


def test_what_python_writes_for_a_thread_goes_out_on_its_queue() -> None:
    """A flow's first packets go through Python; what Python writes goes out on the queue they
    came in on, so tun's flow table keeps the flow's replies on that queue's reader thread (and
    the flows spread over the readers instead of all following queue 0)."""
    s = make_side("tun", False, "native", real_clock=True, queues=2)
    try:
        for q in (0, 1):
            flow = bytes(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=4100 + q, dport=53) / (b"q" * 32))
            s.qwires["lan"][q].send(flow)
            s.settle()
            got = [k for k, w in enumerate(s.qwires["wan"]) for _ in iter(lambda w=w: _recv(w), None)]
            assert got == [q], (q, got)
    finally:
        s.close()


def _recv(w: socket.socket) -> bytes | None:
    try:
        return w.recv(70000)
    except BlockingIOError:
        return None


def _flood(side: Side, mode: str, src: str, first: int, n: int) -> list[bytes]:
    """``n`` new UDP flows from ``src`` (source ports ``first``...), framed for the LAN device."""
    tpl = bytearray(bytes(IP(src=src, dst=REMOTES[0]) / UDP(sport=1, dport=53) / (b"f" * 32)))
    tpl[26:28] = b"\0\0"  # (no UDP checksum: the source port changes)
    head = bytes(Ether(src=mac_of(src), dst=side.mac("lan"), type=0x0800)) if mode == "tap" else b""
    out = []
    for i in range(n):
        struct.pack_into("!H", tpl, 20, first + i)
        out.append(head + bytes(tpl))
    return out


def _count_handled(side: Side) -> list[int]:
    """Count the LAN packets the data plane hands to its Python handler (``[n]``, kept up to date)."""
    calls = [0]
    port = side.dp.ports["lan"]
    handle = port.handle

    def counted(pkt: bytes | bytearray, now: float) -> None:
        calls[0] += 1
        handle(pkt, now)

    port.handle = counted  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("mode", ["tun", "tap"])
def test_a_flood_of_new_flows_from_one_host_is_bounded_the_same_on_both_paths(mode: str) -> None:
    """A host over its mapping rate (defaults: 1000/s, burst 4000) gets twice that rate (a second's
    worth of burst) of flow-opening packets through to the full path; the native side drops the
    rest where they were read, without calling Python, the Python side in the engine: the same
    packets out, the same counters, and the other host's new flow goes through on both."""
    py, nat = make_side(mode, False, "python"), make_side(mode, False, "native")
    sides = [py, nat]
    try:
        if mode == "tap":
            for iface, host, target in (("lan", LAN_HOSTS[0], "10.0.0.1"), ("lan", LAN_HOSTS[1], "10.0.0.1"),
                                        ("wan", GW, WAN_IP)):
                for s in sides:
                    s.feed(iface, arp_in(host, target))
        calls = _count_handled(nat)
        n = 7000
        sent = 0
        for f in _flood(nat, mode, LAN_HOSTS[0], 10000, n):
            a, b = py.feed("lan", f), nat.feed("lan", f)
            assert a == b
            sent += len(a)
        assert sent == 4000  # the mapping bucket's burst
        cp, cn = counters(py), counters(nat)
        assert cp == cn
        assert cn["drop_host_rate_limit"] == 1 + 2000 and cn["drop_host_slowpath_limit"] == n - 4000 - 2001
        assert calls[0] == 4000 + 2001  # what the cache dropped never reached Python
        top = nat.dp.engine.host_limits()["top_offenders"]
        assert top[0]["host"] == LAN_HOSTS[0] and top[0]["reasons"]["host_slowpath_limit"] == n - 6001
        other = _flood(nat, mode, LAN_HOSTS[1], 20000, 1)[0]
        a, b = py.feed("lan", other), nat.feed("lan", other)
        assert a == b and len(a) == 1
        # a second and a half later the hold is over on both sides: the host opens flows again
        for s in sides:
            s.clock[0] += 1.5
            s.dp.engine.expire(s.clock[0])
        f = _flood(nat, mode, LAN_HOSTS[0], 30000, 1)[0]
        a, b = py.feed("lan", f), nat.feed("lan", f)
        assert a == b and len(a) == 1
    finally:
        for s in sides:
            s.close()


def test_a_reader_thread_drops_a_flooding_host_s_misses_without_waking_python() -> None:
    """The same with reader threads (the data plane's way): the thread drops the flood's packets
    beyond the budget; every packet either reached Python or was dropped and counted."""
    s = make_side("tun", False, "native", real_clock=True, threads=True)
    try:
        calls = _count_handled(s)
        assert s.dp.cache.efd is not None
        n = 12000
        frames = _flood(s, "tun", LAN_HOSTS[0], 10000, n)
        out: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + 30
        i = 0
        while time.monotonic() < deadline:
            while i < n:
                try:
                    s.wires["lan"].send(frames[i])
                except BlockingIOError:
                    break
                i += 1
            if select.select([s.dp.cache.efd], [], [], 0.05)[0]:
                s.dp.native.service()
            out += s.collect()
            if i == n and not select.select([s.dp.cache.efd], [], [], 0.2)[0]:
                break
        assert i == n
        s.dp.sync_native()
        c = counters(s)
        policed = c.get("drop_host_slowpath_limit", 0)
        assert policed > 1000, c
        assert calls[0] + policed == n, (calls[0], policed)
        assert len(out) == c["sessions"] and len(out) >= 4000
    finally:
        s.close()


def _forwarded_within(s: Side, seconds: float) -> list[tuple[str, bytes]]:
    """What the reader threads write within ``seconds``, the loop not run meanwhile."""
    out: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + seconds
    while not out and time.monotonic() < deadline:
        time.sleep(0.005)
        out = s.collect()
    return out


def test_reads_of_the_engine_leave_the_reader_threads_running_and_their_stops_are_counted() -> None:
    """A read (counters, the table, the state file) folds the cache's counts without stopping the
    reader threads past the fold; a caller that changes the engine next stops them until the loop
    iteration ends, and expiry only until it is done. The stops are counted and timed: each one
    delays every packet in flight (docs/dataplane.md)."""
    s = make_side("tun", False, "native", real_clock=True, threads=True)
    try:
        flow = bytes(IP(src=LAN_HOSTS[0], dst=REMOTES[0]) / UDP(sport=4000, dport=53) / (b"q" * 32))
        for _ in range(2):  # the session, then the cache taught: the next ones go native
            assert [i for i, _ in s.feed("lan", flow)] == ["wan"]
        base = s.dp.all_counters()
        for read in (s.dp.all_counters, s.dp.snapshot, lambda: s.dp.sync_native(hold=False)):
            read()
            s.wires["lan"].send(flow)
            assert [i for i, _ in _forwarded_within(s, 5)] == ["wan"]  # the loop did not run
        s.dp.sync_native()  # before a change: stopped until the end of this loop iteration
        s.wires["lan"].send(flow)
        assert _forwarded_within(s, 0.3) == []
        s.dp.cache.release()  # (what the loop does at the end of the iteration)
        assert [i for i, _ in _forwarded_within(s, 5)] == ["wan"]
        s.dp._expire()  # expiry stops them only while it runs
        s.wires["lan"].send(flow)
        assert [i for i, _ in _forwarded_within(s, 5)] == ["wan"]
        c = s.dp.all_counters()
        assert c["fastpath_native_packets"] - base.get("fastpath_native_packets", 0) == 5
        stops = c["dp_reader_stops"] - base.get("dp_reader_stops", 0)
        assert 5 <= stops <= 20, stops  # the folds, the hold, the expiry (and nothing left held)
        assert c["dp_reader_stopped_us"] - base.get("dp_reader_stopped_us", 0) >= 300_000
        assert c["dp_reader_stops_over_1ms"] - base.get("dp_reader_stops_over_1ms", 0) >= 1
        assert s.dp.snapshot()["reader_longest_stop_ms"] >= 300
    finally:
        s.close()


def test_an_ha_resync_leaves_the_reader_threads_running() -> None:
    """The active of an HA pair making a full resync for its peer (a restarted standby) only reads
    the engine: the reader threads go on forwarding while the records are made, where they used
    to stay stopped until the end of that loop iteration (the whole export of a large table).
    Becoming active changes the engine (its timers re-armed): that stops them, as before."""
    from masqd.ops import ha as hamod

    class Quiet:
        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    class Wire:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def sendto(self, data: bytes, addr: Any) -> None:
            self.sent.append(data)

    s = make_side("tun", False, "native", real_clock=True, threads=True)
    try:
        flow = bytes(IP(src=LAN_HOSTS[0], dst=REMOTES[0]) / UDP(sport=4100, dport=53) / (b"q" * 32))
        for _ in range(2):  # the session, then the cache taught
            assert [i for i, _ in s.feed("lan", flow)] == ["wan"]
        cfg = loads(config("tun", False, "native")
                    + '\n[ha]\nenabled = false\nlisten = "10.254.0.1:7017"\npeer = "10.254.0.2:7017"\n')
        wire = Wire()
        h = hamod.HA(s.dp.engine, cfg, b"k" * 32, clock=time.monotonic, set_active=lambda on: None,
                     sync=s.dp.sync_native, log=Quiet())
        h.transport = wire  # type: ignore[assignment]
        h.set_role("active", "test")  # a change of the engine: the threads wait for the loop
        s.wires["lan"].send(flow)
        assert _forwarded_within(s, 0.3) == []
        s.dp.cache.release()  # (what the loop does at the end of the iteration)
        assert [i for i, _ in _forwarded_within(s, 5)] == ["wan"]
        h.bulk_wanted = True  # the peer's HELLO asked for a full resync
        h.tick()
        assert any(b'"recs"' in d for d in wire.sent)  # the records went out...
        s.wires["lan"].send(flow)
        assert [i for i, _ in _forwarded_within(s, 5)] == ["wan"]  # ... and the threads forward, no loop run
    finally:
        s.close()


def test_a_mass_expiry_goes_in_slices_and_packets_are_served_in_between(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Timed-out sessions go ``EXPIRE_SLICE`` at a time, the rest in the next loop iterations:
    between two slices the loop serves the packets waiting (and the reader threads, released
    after each slice, forward), so a flood's sessions timing out together do not stop every
    packet in flight for seconds (about 7 µs a session). A removal moves the engine's epoch and
    empties the cache, so the live flow's next packet is a miss that the loop serves."""
    from masqd.dataplane import router
    monkeypatch.setattr(router, "EXPIRE_SLICE", 10)  # (the setting under test: 30 sessions, 3 slices)
    s = make_side("tun", False, "native")
    try:
        for i in range(30):
            p = bytes(IP(src=LAN_HOSTS[0], dst=REMOTES[0]) / UDP(sport=5000 + i, dport=53) / b"q")
            assert [i for i, _ in s.feed("lan", p)] == ["wan"]
        t0 = s.clock[0]
        timeout = max(r["expires_in"] for r in s.dp.engine.table(t0))
        s.clock[0] = t0 + timeout - 1
        live = bytes(IP(src=LAN_HOSTS[0], dst=REMOTES[0]) / UDP(sport=4000, dport=53) / (b"q" * 32))
        for _ in range(2):  # the session, then the cache taught: the next ones go native
            assert [i for i, _ in s.feed("lan", live)] == ["wan"]
        s.clock[0] = t0 + timeout + 1  # the 30 are due, the live one is not
        base = s.dp.all_counters()
        out_before: list[bool] = []  # at each slice: has the live packet gone out already?
        expire = s.dp.engine.expire

        def slice_(now: float, budget: int | None = None) -> bool:
            out_before.append(bool(select.select([s.wires["wan"]], [], [], 0)[0]))
            return expire(now, budget)

        monkeypatch.setattr(s.dp.engine, "expire", slice_)
        s.dp._expire()
        assert s.dp.all_counters()["sessions"] == 21
        assert "expire_more" in s.dp._timers
        s.wires["lan"].send(live)  # a miss now: the reader thread hands it to the loop
        time.sleep(0.2)
        assert s.dp.loop is not None
        for _ in range(10):
            s.dp.loop.run_until_complete(asyncio.sleep(0))
        c = s.dp.all_counters()
        assert c["sessions"] == 1 and c["expired"] - base.get("expired", 0) == 30
        assert "expire_more" not in s.dp._timers and "expire" in s.dp._timers
        assert c["expiry_deferred"] - base.get("expiry_deferred", 0) == 2
        assert [r["lan"].rsplit(":", 1)[1] for r in s.dp.engine.table(s.clock[0])] == ["4000"]
        assert out_before == [False, True, True]  # served between the first slice and the second
        assert [i for i, _ in s.collect()] == ["wan"]
    finally:
        s.close()


def test_a_removed_session_leaves_the_cache_and_the_other_flows_stay_cached() -> None:
    """A session the engine removes (here: expired) voids its own cached flows only: the cache
    forgets them, its counts folded, and every other flow stays native. (Any removal used to
    empty the whole cache: each flow's next packet through Python after every expiry tick that
    removed anything, every replacement of a session, every early drop of a full table.)"""
    s = make_side("tun", False, "native")
    try:
        fc = s.dp.native

        def udp(sport: int) -> bytes:  # (shorter than 40 bytes: Python's)
            return bytes(IP(src=LAN_HOSTS[0], dst=REMOTES[0]) / UDP(sport=sport, dport=53) / (b"q" * 32))

        for sport in (4000, 4001):
            for _ in range(2):  # the session, then the cache taught
                assert [i for i, _ in s.feed("lan", udp(sport))] == ["wan"]
        assert len(fc) == 2
        t0 = s.clock[0]
        timeout = max(r["expires_in"] for r in s.dp.engine.table(t0))
        s.clock[0] = t0 + timeout - 1
        assert [i for i, _ in s.feed("lan", udp(4001))] == ["wan"]  # 4001 lives on, natively
        s.clock[0] = t0 + timeout + 1
        s.dp._expire()  # 4000 goes
        c = s.dp.all_counters()
        assert c["sessions"] == 1 and c["expired"] == 1
        native = c["fastpath_native_packets"]
        out = s.feed("lan", udp(4001))
        assert [i for i, _ in out] == ["wan"]
        assert len(fc) == 1  # 4000's entry forgotten, 4001's kept ...
        c = s.dp.all_counters()
        assert c["fastpath_native_packets"] == native + 1  # ... and it forwarded this one
        assert c["dp_cache_forgotten"] == 1
        out = s.feed("lan", udp(4000))  # a new session for the forgotten flow, through Python
        assert [i for i, _ in out] == ["wan"] and IP(out[0][1]).src == WAN_IP
        c = s.dp.all_counters()
        assert c["sessions"] == 2 and c["fastpath_native_packets"] == native + 1
        assert c["rx_lan_udp_packets"] == 7  # every packet counted once, through either path
    finally:
        s.close()
