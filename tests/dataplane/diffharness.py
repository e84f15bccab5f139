"""Two data planes side by side over socket pairs: the native flow cache against the Python path.

One job: the apparatus of the differential tests (tests/dataplane/test_native.py)
and of the differential fuzz run (bench/fuzz.py --diff). ``make_side`` builds a
``Dataplane`` whose two devices are one end of a SOCK_SEQPACKET socket pair each
(packet boundaries kept, like a TUN/TAP fd), the test holding the other ends;
``Side.feed`` writes one frame and runs the reader the event loop would run.
``frame`` / ``unframe`` add and strip what the device carries around an IPv4
packet (virtio-net header, Ethernet header), ``event`` applies the same admin
step (expiry, flush, reload, neighbour change...) to every side, and
``counters`` / ``rows`` are what the two sides must agree on at the end.
No packet leaves the process.
"""

from __future__ import annotations

import asyncio
import random
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scapy.layers.l2 import ARP, Ether

from masqd.config import loads
from masqd.dataplane.device import Device, local_mac
from masqd.dataplane.l2 import EthernetHost
from masqd.dataplane.router import Dataplane, Port
from masqd.engine import Engine
from masqd.wire import vnet

LAN_HOSTS = ["10.0.0.2", "10.0.0.3"]
REMOTES = ["198.51.100.1", "198.51.100.2"]
WAN_IP, GW = "203.0.113.200", "203.0.113.1"
RULES = ('rules = """\nipchains -A forward -p udp -s 10.0.0.0/8 -d 0/0 53 -j MASQ\n'
         'ipchains -A forward -j MASQ\nipchains -A output -p tcp -j ACCEPT\n"""\n')


def side_modes(mode: str) -> dict[str, str]:
    """``tun``, ``tap`` or ``LAN/WAN`` (``tun/tap``): each side's mode."""
    lan, _, wan = mode.partition("/")
    return {"lan": lan, "wan": wan or lan}


def config(mode: str, offload: bool, fastpath: str, extra: str = "", rules: str = RULES, wan_mtu: int = 1400) -> str:
    """The two sides' configuration: ``rules`` is the [firewall] section's body, ``extra`` more sections.
    ``mode``: tun, tap, or the two sides' apart (``tun/tap``: LAN TUN, WAN TAP)."""
    off = "" if offload else "offload = false\n"
    m = side_modes(mode)
    return (f'[lan]\nname = "l"\nmode = "{m["lan"]}"\naddress = "10.0.0.1/8"\nmtu = 1500\n{off}'
            f'[wan]\nname = "w"\nmode = "{m["wan"]}"\naddress = "{WAN_IP}/24"\ngateway = "{GW}"\nmtu = {wan_mtu}\n{off}'
            f'[dataplane]\nfastpath = "{fastpath}"\n[firewall]\n{rules}{extra}')


def mac_of(host: str) -> str:
    """The MAC address a test host uses (02:aa: and its IPv4 address)."""
    return "02:aa:" + ":".join(f"{int(x):02x}" for x in host.split("."))


@dataclass
class Side:
    """One data plane and the far ends of its two devices."""

    dp: Dataplane
    wires: dict[str, socket.socket]
    clock: list[float]
    mode: str = "tun"
    offload: bool = False
    make_config: Callable[..., str] = config
    socks: list[socket.socket] = field(default_factory=list)
    qwires: dict[str, list[socket.socket]] = field(default_factory=dict)  # every queue's far end

    @property
    def threads(self) -> bool:
        return self.dp.native is not None and self.dp.native.workers > 0

    def readable(self, iface: str) -> None:
        """What the event loop does when the device fd is readable: its registered reader; with
        reader threads, they read it: wait until they are done (and the loop served them)."""
        if self.threads:
            self.settle()
            return
        cb, arg = self.dp.reader(self.dp.ports[iface])
        cb(arg)

    def settle(self) -> None:
        """Reader threads: run the loop (it serves their misses, ends holds) until every thread
        waits in poll with its devices' fds empty: nothing is in flight any more."""
        fc, loop = self.dp.native, self.dp.loop
        assert loop is not None
        fds = [fd for p in self.dp.ports.values() for fd in p.fds]
        deadline = time.monotonic() + 10
        quiet = 0
        while quiet < 2:  # (twice in a row: a thread may wake between the two looks)
            loop.run_until_complete(asyncio.sleep(0))
            if fc.idle() and not select.select(fds, [], [], 0)[0]:
                quiet += 1
            else:
                quiet = 0
                time.sleep(0.0001)
            assert time.monotonic() < deadline, "reader threads did not settle"

    def feed(self, iface: str, data: bytes, queue: int = 0) -> list[tuple[str, bytes]]:
        (self.qwires.get(iface) or [self.wires[iface]])[queue].send(data)
        self.readable(iface)
        return self.collect()

    def collect(self) -> list[tuple[str, bytes]]:
        out = []
        for iface, w0 in self.wires.items():
            for w in self.qwires.get(iface) or [w0]:
                while True:
                    try:
                        out.append((iface, w.recv(70000)))
                    except BlockingIOError:
                        break
        return out

    def mac(self, iface: str) -> str:
        """masqd's MAC on that side ("" in TUN mode)."""
        l2 = self.dp.ports[iface].l2
        return l2.mac.hex(":") if l2 is not None else ""

    def close(self) -> None:
        self.dp.stop()
        assert self.dp.loop is not None
        self.dp.loop.close()
        for s in self.socks:
            s.close()


def make_side(mode: str, offload: bool, fastpath: str, real_clock: bool = False,
              make_config: Callable[..., str] = config, queues: int = 1, threads: bool = True) -> Side:
    """A data plane in ``mode`` (tun, tap, or LAN/WAN apart: ``tun/tap``; each device as its
    configuration section says) with or without virtio-net headers, "native" or "python";
    its clock is ``Side.clock[0]`` (moved by the test) unless ``real_clock`` (the monotonic clock:
    with the native fast path, reader threads, one per queue, unless ``threads`` is False: then the
    cache's on_readable is the loop's reader). ``queues``: socket pairs per device
    (IFF_MULTI_QUEUE). ``make_config(mode, offload, fastpath)`` gives its configuration text
    (default: :func:`config`)."""
    cfg = loads(make_config(mode, offload, fastpath))
    clock = [1000.0]
    dp = Dataplane(cfg, Engine(cfg), clock=time.monotonic if real_clock else lambda: clock[0])
    wires: dict[str, socket.socket] = {}
    qwires: dict[str, list[socket.socket]] = {}
    socks = []
    for side in ("lan", "wan"):
        icfg = getattr(cfg, side)
        ends = []
        for _ in range(queues):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for x in (a, b):
                x.setblocking(False)
                x.setsockopt(socket.SOL_SOCKET, 32, 1 << 23)  # SO_SNDBUFFORCE: room for the bursts of the tests
            socks += [a, b]
            ends.append((a, b))
        a, b = ends[0]
        dev = Device(icfg.name, icfg.mode, icfg.mtu, None, False, a, fd=a.fileno(), vnet=offload,
                     fds=[x.fileno() for x, _ in ends])
        qwires[side] = [y for _, y in ends]
        l2 = None
        if icfg.mode == "tap":
            l2 = EthernetHost(side, local_mac(icfg.name, str(icfg.address)), int(icfg.address.ip),
                              icfg.address.network.prefixlen, dp.counters)
        dp.add_port(Port(side, dev, l2, dp.counters))
        wires[side] = b
    dp.loop = asyncio.new_event_loop()  # timers are scheduled on it; only Side.settle runs it
    dp._started = True
    dp.reader_threads = threads
    dp._set_native()
    dp._register_readers()
    return Side(dp, wires, clock, mode, offload, make_config, socks, qwires)


def arp_in(host: str, target: str) -> bytes:
    """An ARP request from ``host`` (its :func:`mac_of` MAC) for ``target``, broadcast."""
    return bytes(Ether(src=mac_of(host), dst="ff:ff:ff:ff:ff:ff") /
                 ARP(op=1, hwsrc=mac_of(host), psrc=host, pdst=target))


def announce(sides: list[Side], hosts: list[tuple[str, str, str]]) -> None:
    """TAP mode: each (iface, host, target) host asks for masqd's address, so masqd learns its MAC."""
    for s in sides:
        if s.mode != "tap":
            continue
        for iface, host, target in hosts:
            s.feed(iface, (vnet.ZERO if s.offload else b"") + arp_in(host, target))


def frame(r: random.Random, mode: str, offload: bool, iface: str, ip: bytes, our_mac: str | None,
          peer_mac: str, partial: bool = False, gso: bool = False) -> bytes:
    """``ip`` as the device would carry it: in TAP mode behind an Ethernet header from ``peer_mac``
    (to ``our_mac``, sometimes to another host: flooded unicast; sometimes padded to 60 bytes);
    with ``offload`` behind a virtio-net header (a partial checksum, a super-packet, or none)."""
    data = ip
    if mode == "tap":
        dst = our_mac if r.random() > 0.03 else "02:00:00:00:00:99"  # sometimes flooded unicast
        data = bytes(Ether(src=peer_mac, dst=dst, type=0x0800)) + ip
        if len(data) < 60 and r.random() < 0.5:
            data += bytes(60 - len(data))  # a short frame's padding
    if offload:
        shift = 14 if mode == "tap" else 0
        if gso:
            vh = vnet.pack(vnet.F_NEEDS_CSUM, 1, shift + 40, 1448, shift + 20, 16)
        elif partial and len(ip) > 9 and ip[9] in (6, 17):
            vh = vnet.pack(vnet.F_NEEDS_CSUM, 0, 0, 0, shift + 20, 16 if ip[9] == 6 else 6)
            if r.random() < 0.05:  # a bad checksum offset: the engine refuses it
                vh = vnet.pack(vnet.F_NEEDS_CSUM, 0, 0, 0, shift + 20, 4)
        else:
            vh = vnet.ZERO
        data = vh + data
    return data


def unframe(mode: str, offload: bool, data: bytes) -> bytes | None:
    """The IPv4 packet inside a frame written by masqd (None for ARP and other non-IPv4 frames)."""
    if offload:
        data = data[vnet.SIZE:]
    if mode == "tap":
        if data[12:14] != b"\x08\x00":
            return None
        data = data[14:]
    return data


def event(sides: list[Side], r: random.Random, step: int, flush_ip: str = LAN_HOSTS[0]) -> str:
    """Something that can void cached decisions, the same on both sides."""
    what = r.choice(["expire", "flush", "tick", "reload", "neighbour", "time"])
    later = r.choice([5.0, 40.0, 400.0])
    for s in sides:
        eng = s.dp.engine
        if what == "expire":
            s.clock[0] += later
            s.dp._expire()
        elif what == "flush":
            s.dp.sync_native()  # as ops does before it changes the engine
            eng.flush(lan_ip=int.from_bytes(bytes(int(x) for x in flush_ip.split(".")), "big"))
        elif what == "tick":
            s.dp._l2_tick()
        elif what == "reload":
            mtu = 1400 if step % 2 else 1300
            cfg = loads(s.make_config(s.mode, s.offload, "native" if s.dp.native is not None else "python",
                                      wan_mtu=mtu))
            s.dp.sync_native()
            eng.reload(cfg)
            s.dp.on_reload(cfg)
        elif what == "neighbour" and s.mode == "tap":
            # the gateway answers from a new MAC: packets must follow it at once
            new = f"02:bb:00:00:00:{step % 250:02x}"
            f = bytes(Ether(src=new, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=new, psrc=GW, pdst=WAN_IP))
            s.wires["wan"].send((vnet.ZERO if s.offload else b"") + f)
            s.readable("wan")
        else:
            s.clock[0] += 0.5
    return what


def counters(s: Side) -> dict[str, int]:
    """Every counter but the flow cache's own (which only the native side has: its packets, its
    reader threads' stops)."""
    return {k: v for k, v in s.dp.all_counters().items() if not k.startswith(("fastpath_", "dp_reader_", "dp_cache_"))}


def rows(s: Side, now: float, real_clock: bool = False) -> list[dict[str, Any]]:
    """The table as ``masqd table`` lists it (without expiry times when the clock was real)."""
    return [{k: v for k, v in row.items() if not real_clock or k != "expires_in"} for row in s.dp.engine.table(now)]
