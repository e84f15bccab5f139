"""Hostile floods cost bounded memory: 100,000 packets of each kind, then the tables are counted.

Each flood comes from ever new addresses and ports (what a spoofing attacker sends):
unsolicited TCP/UDP/ICMP to the WAN address, unknown ESP SPIs (from a remote with
IPsec state and from others), ISAKMP with unknown cookies, GRE with unknown Call
IDs, fragments that never complete, SYNs to a forwarded server, and one LAN host
opening new flows as fast as it can. On a fake clock (10 s of flood), every table
must stay within its bound during the flood, and once the timeouts have passed the
engine must hold what it held before: no session, no helper entry, no host record,
and (almost) no more Python objects than before.
"""

from __future__ import annotations

import gc
import struct
from collections.abc import Callable, Iterator

import pytest
from scapy.all import ESP, IP, UDP, raw
from scapy.layers.isakmp import ISAKMP

from masqd.engine import Engine
from masqd.engine.counters import EVENTS_MAX
from masqd.wire.gre import build_pptp_gre
from masqd.wire.ipv4 import set_ip_checksum
from tests.engine.conftest import H2, SRV, WAN_IP, make_cfg, one, tcp, udp

N = 100_000
STEP = 10.0 / N  # the flood lasts 10 s of the fake clock
_I = struct.Struct("!I")
_H = struct.Struct("!H")


def _remote(i: int) -> int:
    """198.51.100.2-251 (the WAN's remotes; 198.18/15 is routed to the LAN in these tests)."""
    return 0xC6336400 + 2 + i % 250


def _stream(tpl: bytes, mutate: Callable[[bytearray, int], None]) -> Iterator[bytes]:
    buf = bytearray(tpl)
    for i in range(N):
        mutate(buf, i)
        set_ip_checksum(buf, 20)
        yield bytes(buf)


def unsolicited(proto: str) -> Iterator[tuple[str, bytes]]:
    if proto == "icmp":
        tpl = raw(IP(src=SRV, dst=WAN_IP) / b"\x00\x00\x00\x00\x00\x01\x00\x01pingdata")
        tpl = tpl[:9] + b"\x01" + tpl[10:]
    else:
        tpl = udp(SRV, WAN_IP, 1, 1) if proto == "udp" else tcp(SRV, WAN_IP, 1, 1, "S")

    def m(b: bytearray, i: int) -> None:
        _I.pack_into(b, 12, _remote(i))
        _H.pack_into(b, 20, 1024 + i % 60000)
        _H.pack_into(b, 22, 1 + (i * 7919) % 65535)
        if proto == "icmp":
            b[20] = (0, 3, 11, 14)[i % 4]  # replies and errors nobody asked for
    for p in _stream(tpl, m):
        yield "wan", p


def esp_unknown() -> Iterator[tuple[str, bytes]]:
    tpl = raw(IP(src=SRV, dst=WAN_IP) / ESP(spi=1, seq=1, data=b"\xa5" * 48))

    def m(b: bytearray, i: int) -> None:
        _I.pack_into(b, 12, 0xC6336401 if i % 2 else _remote(i))  # SRV has IPsec state; others do not
        _I.pack_into(b, 20, 0x1000 + i)
    for p in _stream(tpl, m):
        yield "wan", p


def isakmp_unknown() -> Iterator[tuple[str, bytes]]:
    tpl = raw(IP(src=SRV, dst=WAN_IP) / UDP(sport=500, dport=500)
              / ISAKMP(init_cookie=b"\x01" * 8, resp_cookie=b"\x02" * 8, exch_type=2, next_payload=0))

    def m(b: bytearray, i: int) -> None:
        _I.pack_into(b, 12, 0xC6336401 if i % 2 else _remote(i))
        _I.pack_into(b, 28, i + 1)
        _I.pack_into(b, 36, 0 if i % 3 == 0 else i)
    for p in _stream(tpl, m):
        yield "wan", p


def gre_unknown() -> Iterator[tuple[str, bytes]]:
    tpl = raw(IP(src=SRV, dst=WAN_IP, proto=47) / build_pptp_gre(1, b"\xff\x03\x00\x21ppp", 1, None))

    def m(b: bytearray, i: int) -> None:
        _I.pack_into(b, 12, _remote(i))
        _H.pack_into(b, 26, i % 65536)
        b[20:22] = b"\x30\x01" if i % 2 else b"\x00\x00"  # enhanced (version 1) or plain GRE
    for p in _stream(tpl, m):
        yield "wan", p


def fragments(iface: str) -> Iterator[tuple[str, bytes]]:
    src, dst = (SRV, WAN_IP) if iface == "wan" else (H2, SRV)
    tpl = raw(IP(src=src, dst=dst, proto=17, flags="MF") / (b"\x00" * 8))

    def m(b: bytearray, i: int) -> None:
        _H.pack_into(b, 4, i % 65536)  # a new datagram, never completed
        _H.pack_into(b, 6, 0x2000 | (i % 50))
        if iface == "wan":
            _I.pack_into(b, 12, _remote(i))
    for p in _stream(tpl, m):
        yield iface, p


def syn_to_forward() -> Iterator[tuple[str, bytes]]:
    tpl = tcp(SRV, WAN_IP, 1, 8080, "S")

    def m(b: bytearray, i: int) -> None:
        _I.pack_into(b, 12, _remote(i))
        _H.pack_into(b, 20, 1024 + i % 60000)
    for p in _stream(tpl, m):
        yield "wan", p


def new_flows() -> Iterator[tuple[str, bytes]]:
    tpl = udp(H2, SRV, 1, 53)

    def m(b: bytearray, i: int) -> None:
        _I.pack_into(b, 16, _remote(i))
        _H.pack_into(b, 20, 1 + i % 65535)
        _H.pack_into(b, 22, 1 + (i // 65535))
    for p in _stream(tpl, m):
        yield "lan", p


FLOODS: dict[str, Callable[[], Iterator[tuple[str, bytes]]]] = {
    "unsolicited-udp": lambda: unsolicited("udp"),
    "unsolicited-tcp": lambda: unsolicited("tcp"),
    "unsolicited-icmp": lambda: unsolicited("icmp"),
    "esp-unknown-spi": esp_unknown,
    "isakmp-unknown-cookies": isakmp_unknown,
    "gre-unknown-call-id": gre_unknown,
    "fragments-wan": lambda: fragments("wan"),
    "fragments-lan": lambda: fragments("lan"),
    "syn-to-forwarded-server": syn_to_forward,
    "one-host-new-flows": new_flows,
}

CFG = '[forwarding]\nportfw = [{proto = "tcp", port = 8080, to = "10.0.0.3", to_port = 80}]\n'


def _prime(eng: Engine) -> None:
    """Some legitimate state the floods aim at: a LAN client's UDP and ISAKMP/ESP with SRV."""
    p = one(eng.process("lan", udp(H2, SRV, 4000, 53), 0.0), "wan")
    one(eng.process("wan", udp(SRV, WAN_IP, 53, p[UDP].sport), 0.0), "lan")
    ike = raw(IP(src=H2, dst=SRV) / UDP(sport=500, dport=500)
              / ISAKMP(init_cookie=b"\x11" * 8, resp_cookie=b"\0" * 8, exch_type=2, next_payload=0))
    one(eng.process("lan", ike, 0.0), "wan")
    one(eng.process("lan", raw(IP(src=H2, dst=SRV) / ESP(spi=0x777, seq=1, data=b"\xa5" * 48)), 0.0), "wan")


def _objects() -> int:
    gc.collect()
    return len(gc.get_objects())


@pytest.mark.parametrize("kind", list(FLOODS))
def test_a_flood_of_100k_hostile_packets_leaves_nothing_behind(kind: str) -> None:
    eng = Engine(make_cfg(CFG))
    # warm up every code path the flood takes (first-use caches are not the flood's memory)
    for j, (iface, pkt) in enumerate(FLOODS[kind]()):
        eng.process(iface, pkt, 0.0)
        if j == 300:
            break
    eng.expire(100_000.0)
    eng.drain_events()
    _prime(eng)
    before = _objects()
    t0 = 200_000.0
    now = t0
    peak: dict[str, int] = {}
    for j, (iface, pkt) in enumerate(FLOODS[kind]()):
        now = t0 + j * STEP
        eng.process(iface, pkt, now)
        if j % 10_000 == 0:
            eng.expire(now)
            for name, (size, limit) in eng.tables().items():
                assert size <= limit, (name, size, limit)
                peak[name] = max(peak.get(name, 0), size)
    lim = eng.nat.limits
    assert eng.counters["sessions"] <= max(lim.max_entries, lim.half_open) + 2
    assert len(eng.nat.offenders.hosts) <= 2 * eng.nat.offenders.n
    ipsec = next(h for h in eng.helpers if h.name == "ipsec")
    assert len(ipsec._quiet) <= 4097  # the helpers' rate-limit map stays small
    assert len(eng.drain_events()) <= EVENTS_MAX
    # the timeouts pass: everything the flood made is gone, the primed state expires too
    for k in range(1, 40):
        eng.expire(now + k * 300.0)
    assert eng.counters["sessions"] == 0
    assert [m for m in eng.nat.maps.values() if not m.static] == []  # (the port forward's own stays)
    assert all(h.size() == 0 for h in eng.helpers)
    assert len(eng.defrag) == 0 and eng.defrag.bytes == 0
    assert eng.nat.hosts == {} and len(eng.nat.wheel) == 0 and eng.nat.half_open == {}
    assert not eng.full.reset_keys and not eng.pool.quarantined
    eng.drain_events()
    grown = _objects() - before
    assert grown < 500, grown
