"""The TAP port's Ethernet host, driven directly with frames and a fake clock (scapy as the oracle)."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether

from masqd.dataplane.l2 import EthernetHost, icmp_host_unreachable

ME = "02:00:00:00:00:01"
PEER = "02:00:00:00:00:02"
MY_IP, PEER_IP, GW = "203.0.113.200", "203.0.113.1", "203.0.113.1"


def ip(a: str) -> int:
    return int.from_bytes(bytes(int(x) for x in a.split(".")), "big")


def host(**kw: float) -> EthernetHost:
    return EthernetHost("wan", bytes.fromhex(ME.replace(":", "")), ip(MY_IP), 24, {}, **kw)  # type: ignore[arg-type]


def arp(op: int, psrc: str, pdst: str, hwsrc: str = PEER, dst: str = "ff:ff:ff:ff:ff:ff") -> bytes:
    return bytes(Ether(src=hwsrc, dst=dst) / ARP(op=op, hwsrc=hwsrc, psrc=psrc, pdst=pdst,
                                                 hwdst="00:00:00:00:00:00" if op == 1 else ME))


def packet(dst: str = "198.51.100.1") -> bytes:
    return bytes(IP(src=MY_IP, dst=dst) / UDP(sport=1000, dport=2000) / b"hello")


def test_answers_arp_for_its_address_and_learns_the_asker() -> None:
    h = host()
    assert h.rx(arp(1, PEER_IP, MY_IP), 0.0) is None
    (reply,) = h.out
    r = Ether(reply)
    assert r.dst == PEER and r[ARP].op == 2 and r[ARP].hwsrc == ME and r[ARP].psrc == MY_IP
    assert r[ARP].pdst == PEER_IP and r[ARP].hwdst == PEER
    # learnt: a packet to the asker needs no resolution
    hdr = h.header(ip(PEER_IP), packet(), 0.1)
    assert hdr is not None and Ether(hdr + packet()).dst == PEER


def test_ignores_arp_for_other_addresses() -> None:
    h = host()
    h.rx(arp(1, PEER_IP, "203.0.113.7"), 0.0)
    assert h.out == [] and h.neigh == {}


def test_resolves_next_hop_then_releases_the_queue() -> None:
    h = host()
    pkts = [packet(f"198.51.100.{i}") for i in range(3)]
    for p in pkts:
        assert h.header(ip(GW), p, 0.0) is None
    (req,) = h.out  # one request for three packets
    r = Ether(req)
    assert r.dst == "ff:ff:ff:ff:ff:ff" and r[ARP].op == 1 and r[ARP].pdst == GW and r[ARP].psrc == MY_IP
    h.out.clear()
    h.rx(arp(2, GW, MY_IP, dst=ME), 0.5)
    assert [bytes(Ether(f)[IP]) for f in h.out] == pkts
    assert all(Ether(f).dst == PEER and Ether(f).src == ME for f in h.out)


def test_queue_is_bounded() -> None:
    h = host(queue_len=4)
    for _ in range(7):
        h.header(ip(GW), packet(), 0.0)
    assert len(h.neigh[ip(GW)].queue) == 4
    assert h.counters["drop_arp_queue_full"] == 3


def test_resolution_failure_hands_packets_back_for_host_unreachable() -> None:
    h = host()
    p = packet()
    h.header(ip(GW), p, 0.0)
    for t in (0.5, 1.0, 2.0, 3.0):
        h.tick(t)
    assert h.counters["arp_wan_requests"] == 3
    assert h.unreachable == [(ip(GW), p)] and ip(GW) not in h.neigh
    err = icmp_host_unreachable(p, ip(GW))
    assert err is not None
    e = IP(err)
    assert e.src == GW and e.dst == MY_IP and e[ICMP].type == 3 and e[ICMP].code == 1
    assert bytes(e[ICMP].payload)[:28] == p[:28]
    # checksums as scapy computes them
    ref = IP(err)
    del ref.chksum
    del ref[ICMP].chksum
    ref = IP(bytes(ref))
    assert ref.chksum == e.chksum and ref[ICMP].chksum == e[ICMP].chksum


def test_stale_entry_keeps_working_while_reconfirmed() -> None:
    h = host(reachable=10.0)
    h.rx(arp(1, PEER_IP, MY_IP), 0.0)
    h.out.clear()
    assert h.header(ip(PEER_IP), packet(), 20.0) is not None  # stale: still used
    h.tick(20.0)
    (probe,) = h.out
    assert Ether(probe).dst == PEER  # unicast re-confirmation


def test_aging_says_once_when_a_confirmed_neighbour_passes_its_reachable_time() -> None:
    """What the data plane drops its cached headers (and flows) on: not every tick, only when a
    neighbour it may be using has aged, once per confirmation."""
    h = host(reachable=10.0)
    h.rx(arp(1, PEER_IP, MY_IP), 0.0)
    assert not h.aging(5.0)
    assert h.aging(10.5)
    assert not h.aging(11.0) and not h.aging(100.0)  # reported once
    h.rx(arp(1, PEER_IP, MY_IP), 20.0)  # confirmed again
    assert not h.aging(29.0)
    assert h.aging(30.5)


def test_frames_not_for_us_and_non_ipv4_are_counted() -> None:
    h = host()
    other = bytes(Ether(src=PEER, dst="02:00:00:00:00:99") / IP(dst=MY_IP) / UDP())
    assert h.rx(other, 0.0) is None and h.counters["drop_l2_not_for_us"] == 1
    v6 = bytes(Ether(src=PEER, dst="33:33:00:00:00:02", type=0x86DD)) + b"\x60" + b"\x00" * 39
    assert h.rx(v6, 0.0) is None and h.counters["drop_non_ipv4"] == 1
    assert h.rx(b"\x00" * 10, 0.0) is None and h.counters["drop_l2_runt"] == 1


def test_ethernet_padding_is_removed() -> None:
    h = host()
    small = IP(src=PEER_IP, dst=MY_IP) / ICMP()
    frame = bytes(Ether(src=PEER, dst=ME) / small) + b"\x00" * 18
    assert h.rx(frame, 0.0) == bytes(small)


def test_no_error_about_errors_or_fragments() -> None:
    err = bytes(IP(src="198.51.100.1", dst=MY_IP) / ICMP(type=3, code=3) / packet()[:28])
    assert icmp_host_unreachable(err, ip(GW)) is None
    frag = bytes(IP(src=MY_IP, dst="198.51.100.1", frag=10) / (b"x" * 16))
    assert icmp_host_unreachable(frag, ip(GW)) is None
    echo = bytes(IP(src=MY_IP, dst="198.51.100.1") / ICMP(type=8))
    assert icmp_host_unreachable(echo, ip(GW)) is not None


def test_gratuitous_arp_on_address_change() -> None:
    h = host()
    h.set_address(ip("203.0.113.77"), 24, 5.0)
    (g,) = h.out
    a = Ether(g)[ARP]
    assert a.op == 1 and a.psrc == a.pdst == "203.0.113.77" and Ether(g).dst == "ff:ff:ff:ff:ff:ff"


def test_packets_with_offload_headers_wait_with_their_header() -> None:
    """A super-packet or partial-checksum packet queued for ARP keeps its virtio-net header: it is
    released in ``out_offload`` as (header, frame), ordinary packets in ``out`` as before."""
    h = host()
    plain, offl = packet("198.51.100.1"), packet("198.51.100.2")
    vh = bytes([1, 0, 0, 0, 0, 0, 34, 0, 6, 0])
    assert h.header(ip(GW), plain, 0.0) is None
    assert h.header(ip(GW), offl, 0.0, vh) is None
    h.out.clear()
    h.rx(arp(2, GW, MY_IP, dst=ME), 0.5)
    assert [bytes(Ether(f)[IP]) for f in h.out] == [plain]
    assert [(v, bytes(Ether(f)[IP])) for v, f in h.out_offload] == [(vh, offl)]
    # when resolution fails, the packet (without its header) is handed back for host-unreachable
    h2 = host()
    h2.header(ip(GW), offl, 0.0, vh)
    for t in (1.0, 2.0, 3.0, 4.0):
        h2.tick(t)
    assert h2.unreachable == [(ip(GW), offl)]


def test_a_silent_host_answers_no_arp_and_announces_nothing() -> None:
    """The standby of an active/backup pair: it learns its neighbours but says nothing."""
    from masqd.dataplane.l2 import EthernetHost

    c: dict[str, int] = {}
    h = EthernetHost("lan", b"\x02\0\0\0\0\x01", 0x0A000001, 8, c)
    h.silent = True
    req = (b"\xff" * 6 + b"\x02\0\0\0\0\x02" + b"\x08\x06" + bytes.fromhex("0001080006040001") + b"\x02\0\0\0\0\x02"
           + bytes([10, 0, 0, 2]) + b"\0" * 6 + bytes([10, 0, 0, 1]))
    h.rx(req, 0.0)
    h.gratuitous()
    assert h.out == [] and 0x0A000002 in h.neigh
    h.silent = False
    h.rx(req, 0.0)
    h.gratuitous()
    assert len(h.out) == 2


def test_multicast_next_hops_map_to_their_ethernet_group_without_arp() -> None:
    """The PCP/NAT-PMP announcements go to 224.0.0.1: 01:00:5e:00:00:01, no ARP request, nothing
    learnt (RFC 1112 section 6.4: the group's low 23 bits)."""
    h = host()
    for group, mac in (("224.0.0.1", "01:00:5e:00:00:01"), ("239.255.130.7", "01:00:5e:7f:82:07")):
        hdr = h.header(ip(group), packet(group), 0.0)
        assert hdr is not None
        e = Ether(hdr + packet(group))
        assert (e.dst, e.src, e.type) == (mac, ME, 0x0800)
    assert h.out == [] and h.neigh == {} and h.probing == {}
