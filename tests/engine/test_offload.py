"""Packets with TUN/TAP offload metadata (virtio-net header): partial checksums and super-packets.

The rules (issue 10): a NEEDS_CSUM packet's L4 field holds the non-inverted
pseudo-header sum, so NAT updates it by the address delta only; a super-packet
is rewritten once and keeps its header; its segments, not its length, must fit
the MTU; the full path finishes the checksum and re-arms it for super-packets.
Every output is checked by completing the checksum the way the kernel would and
comparing with scapy's own computation.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import IP, TCP, UDP, raw

from masqd.config import Config, loads
from masqd.engine import Engine
from masqd.wire import vnet
from tests.engine.conftest import BASE, H2, H3, SRV, WAN_IP, checksums_ok, make_cfg, tcp, udp


def partial(pkt: bytes) -> bytes:
    """The packet as a sending stack with checksum offload hands it over: field = pseudo sum."""
    q = bytearray(pkt)
    ihl = (q[0] & 15) << 2
    off = ihl + (16 if q[9] == 6 else 6)
    s = vnet.partial_seed(q, ihl)
    q[off], q[off + 1] = s >> 8, s & 0xFF
    return bytes(q)


def hdr(pkt: bytes, gso: int = 0, gso_size: int = 0) -> bytes:
    ihl = (pkt[0] & 15) << 2
    return vnet.pack(vnet.F_NEEDS_CSUM, gso, ihl + 20, gso_size, ihl, 16 if pkt[9] == 6 else 6)


def completed(pkt: bytes, h: bytes) -> bytes:
    if not h:  # an ordinary packet: its checksum is already whole
        return pkt
    flags, _gso, _hl, _gs, start, off = vnet.unpack(h)
    q = bytearray(pkt)
    if flags & vnet.F_NEEDS_CSUM:
        vnet.complete_checksum(q, start, off, q[9] == 17)
    return bytes(q)


def established_tcp(eng: Engine, sport: int = 40000) -> int:
    """Handshake H2:sport -> SRV:80 through ``eng``; returns the WAN port."""
    o = eng.process("lan", tcp(H2, SRV, sport, 80, "S", seq=1), 0.0)
    wport = IP(o[0][1])[TCP].sport
    eng.process("wan", tcp(SRV, WAN_IP, 80, wport, "SA", seq=500, ack=2), 0.0)
    eng.process("lan", tcp(H2, SRV, sport, 80, "A", seq=2, ack=501), 0.0)
    return wport


def test_partial_tcp_both_directions_on_the_fast_path() -> None:
    eng = Engine(make_cfg())
    wport = established_tcp(eng)
    data = tcp(H2, SRV, 40000, 80, "PA", payload=b"hello world" * 20, seq=2, ack=501)
    out = eng.process_vnet("lan", partial(data), 1.0, hdr(data))
    assert len(out) == 1 and out[0][0] == "wan" and out[0][2] == hdr(data)
    p = IP(completed(out[0][1], out[0][2]))
    assert (p.src, p[TCP].sport, p.ttl) == (WAN_IP, wport, 63)
    assert checksums_ok(completed(out[0][1], out[0][2]))
    # the field itself is still a pseudo-header sum (for the new source address), not a checksum
    assert (out[0][1][36] << 8 | out[0][1][37]) == vnet.partial_seed(out[0][1], 20)
    back = tcp(SRV, WAN_IP, 80, wport, "PA", payload=b"reply" * 30, seq=501, ack=222)
    out = eng.process_vnet("wan", partial(back), 1.0, hdr(back))
    assert len(out) == 1 and out[0][0] == "lan"
    p = IP(completed(out[0][1], out[0][2]))
    assert (p.dst, p[TCP].dport) == (H2, 40000)
    assert checksums_ok(completed(out[0][1], out[0][2]))
    assert eng.counters.get("drop_internal_error", 0) == 0


def test_partial_udp_both_directions() -> None:
    eng = Engine(make_cfg())
    first = udp(H2, SRV, 5000, 53, b"q" * 40)
    o = eng.process_vnet("lan", partial(first), 0.0, hdr(first))  # new flow: full path
    assert o[0][2] == b""  # finished by masqd: an ordinary packet with a real checksum
    assert checksums_ok(o[0][1]) and IP(o[0][1])[UDP].chksum != 0
    wport = IP(o[0][1])[UDP].sport
    eng.process("wan", udp(SRV, WAN_IP, 53, wport, b"r"), 0.1)
    for _ in range(3):
        nxt = udp(H2, SRV, 5000, 53, b"z" * 64)
        o = eng.process_vnet("lan", partial(nxt), 0.2, hdr(nxt))
        assert o[0][2] == hdr(nxt) and checksums_ok(completed(o[0][1], o[0][2]))
        rep = udp(SRV, WAN_IP, 53, wport, b"y" * 64)
        o = eng.process_vnet("wan", partial(rep), 0.3, hdr(rep))
        assert IP(completed(o[0][1], o[0][2]))[UDP].dport == 5000
        assert checksums_ok(completed(o[0][1], o[0][2]))


def test_tcp_super_packet_is_rewritten_once_and_keeps_its_header() -> None:
    eng = Engine(make_cfg())
    wport = established_tcp(eng)
    payload = bytes(range(256)) * 250  # 64000 bytes: 45 segments of 1448
    big = tcp(H2, SRV, 40000, 80, "A", payload=payload, seq=2, ack=501)
    assert len(big) > 1500
    h = hdr(big, vnet.GSO_TCPV4, 1448)
    before = eng.counters["tx_wan_tcp_packets"]
    out = eng.process_vnet("lan", partial(big), 1.0, h)
    assert len(out) == 1 and out[0][2] == h and len(out[0][1]) == len(big)
    fin = completed(out[0][1], out[0][2])
    assert checksums_ok(fin) and IP(fin).src == WAN_IP and IP(fin)[TCP].sport == wport
    assert bytes(IP(fin)[TCP].payload) == payload
    assert eng.counters["rx_super_packets"] == 1
    # counted as the 45 packets it becomes on the wire (64000 / 1448, rounded up)
    assert eng.counters["rx_super_segments"] == 45
    assert eng.counters["tx_wan_tcp_packets"] - before == 45
    back = tcp(SRV, WAN_IP, 80, wport, "A", payload=payload, seq=501, ack=64002)
    out = eng.process_vnet("wan", partial(back), 1.0, hdr(back, vnet.GSO_TCPV4, 1448))
    assert len(out) == 1 and checksums_ok(completed(out[0][1], out[0][2]))


def test_super_packet_whose_segments_exceed_the_egress_mtu_gets_frag_needed() -> None:
    eng = Engine(make_cfg_text_wan_mtu(1400))
    established_tcp(eng)
    big = raw(IP(src=H2, dst=SRV, flags="DF") / TCP(sport=40000, dport=80, flags="A", seq=2, ack=501)
              / (b"a" * 20000))
    out = eng.process_vnet("lan", partial(big), 1.0, hdr(big, vnet.GSO_TCPV4, 1448))
    assert len(out) == 1 and out[0][0] == "lan" and out[0][2] == b""
    err = IP(out[0][1])
    assert (err.proto, err.payload.type, err.payload.code, err.payload.nexthopmtu) == (1, 3, 4, 1400)
    # the same flow with segments that fit goes through as a super-packet
    ok = tcp(H2, SRV, 40000, 80, "A", payload=b"a" * 20000, seq=2, ack=501)
    out = eng.process_vnet("lan", partial(ok), 1.1, hdr(ok, vnet.GSO_TCPV4, 1348))
    assert len(out) == 1 and out[0][0] == "wan" and len(out[0][1]) == len(ok)
    # without DF a super-packet cannot be cut into fragments here: dropped and counted
    nodf = tcp(H2, SRV, 40000, 80, "A", payload=b"a" * 20000, seq=2, ack=501)
    assert eng.process_vnet("lan", partial(nodf), 1.2, hdr(nodf, vnet.GSO_TCPV4, 1448)) == []
    assert eng.counters["drop_too_big_super_packet"] == 1


def make_cfg_text_wan_mtu(mtu: int) -> Config:
    return loads(BASE.replace('gateway = "203.0.113.1"', f'gateway = "203.0.113.1"\nmtu = {mtu}'))


def test_partial_syn_takes_the_full_path_and_leaves_finished_and_clamped() -> None:
    eng = Engine(make_cfg_text_wan_mtu(1400))
    syn = tcp(H2, SRV, 41000, 80, "S", seq=1, options=[("MSS", 1460)])
    out = eng.process_vnet("lan", partial(syn), 0.0, hdr(syn))
    assert len(out) == 1 and out[0][2] == b""
    p = IP(out[0][1])
    assert dict(p[TCP].options)["MSS"] == 1360
    assert checksums_ok(out[0][1])


def test_super_packet_on_the_full_path_is_made_partial_again() -> None:
    # a new UDP flow that starts with a UDP GSO super-packet (USO) takes the full path
    eng = Engine(make_cfg())
    payload = b"u" * 8000
    big = udp(H2, SRV, 6000, 9000, payload)
    h = vnet.pack(vnet.F_NEEDS_CSUM, vnet.GSO_UDP_L4, 28, 1000, 20, 6)
    out = eng.process_vnet("lan", partial(big), 0.0, h)
    assert len(out) == 1 and out[0][0] == "wan" and len(out[0][1]) == len(big)
    flags, gso, _hl, gsz, start, off = vnet.unpack(out[0][2])
    assert (flags, gso, gsz, start, off) == (vnet.F_NEEDS_CSUM, vnet.GSO_UDP_L4, 1000, 20, 6)
    q = out[0][1]
    assert (q[26] << 8 | q[27]) == vnet.partial_seed(q, 20)
    fin = completed(q, out[0][2])
    assert checksums_ok(fin) and IP(fin).src == WAN_IP and bytes(IP(fin)[UDP].payload) == payload


def test_helper_sessions_see_finished_packets() -> None:
    """PPTP control segments with partial checksums: the helper rewrites the Call ID of a packet
    whose checksum masqd finished first, so the result is right end to end (two clients with
    the same Call ID: the second one's is changed inside the segment)."""
    from scapy.layers.pptp import PPTPStartControlConnectionRequest

    from tests.engine.test_pptp import Ctl, ocrq

    eng = Engine(make_cfg())
    seen = []
    for lan, sport in ((H2, 40000), (H3, 40001)):
        c = Ctl(eng, lan, SRV, sport=sport)
        c.open(0.0)
        for msg in (raw(PPTPStartControlConnectionRequest()), ocrq(7)):
            seg = c._lan_seg(msg, c.cseq, "PA")
            c.cseq += len(msg)
            out = eng.process_vnet("lan", partial(seg), 0.1, hdr(seg))
            assert len(out) == 1 and out[0][0] == "wan" and out[0][2] == b""
            assert checksums_ok(out[0][1])
        seen.append(int.from_bytes(bytes(IP(out[0][1])[TCP].payload)[12:14], "big"))
    calls = {r["lan"]: r["masq_call_id"] for r in eng.table(0.2) if r["proto"] == "gre"}
    assert calls == {f"{H2}:7": seen[0], f"{H3}:7": seen[1]} and seen[0] != seen[1]


def test_bad_offload_headers_are_refused_and_counted() -> None:
    eng = Engine(make_cfg())
    data = udp(H2, SRV, 5000, 53, b"q")
    bad_start = vnet.pack(vnet.F_NEEDS_CSUM, 0, 0, 0, 14, 6)
    assert eng.process_vnet("lan", partial(data), 0.0, bad_start) == []
    bad_off = vnet.pack(vnet.F_NEEDS_CSUM, 0, 0, 0, 20, 16)
    assert eng.process_vnet("lan", partial(data), 0.0, bad_off) == []
    gso_wrong_proto = vnet.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 0, 1448, 20, 6)
    assert eng.process_vnet("lan", partial(data), 0.0, gso_wrong_proto) == []
    assert eng.process_vnet("lan", b"\x45\x00", 0.0, hdr(data)) == []
    assert eng.counters["drop_bad_offload_header"] == 3
    assert eng.counters["drop_truncated_ip"] == 1


def test_plain_header_means_the_ordinary_path() -> None:
    eng = Engine(make_cfg())
    data = udp(H2, SRV, 5000, 53, b"q")
    a = eng.process_vnet("lan", data, 0.0, vnet.ZERO)
    b = Engine(make_cfg()).process("lan", data, 0.0)
    assert [(o, p) for o, p, _h in a] == b and a[0][2] == b""
    assert raw(IP(a[0][1])) == a[0][1]


def test_pptp_control_inside_a_super_packet_is_rewritten_and_rearmed() -> None:
    """A PPTP control super-packet (many messages, more than one MSS) from a second client with
    the same Call ID: the helper sees the whole stream chunk with a real checksum, rewrites the
    Call ID in the middle of it, and the packet leaves as a super-packet again."""
    from scapy.layers.pptp import PPTPEchoRequest, PPTPStartControlConnectionRequest

    from tests.engine.test_pptp import Ctl, ocrq

    eng = Engine(make_cfg())
    first = Ctl(eng, H2, SRV, sport=40000)
    first.open(0.0)
    first.send(raw(PPTPStartControlConnectionRequest()))
    first.send(ocrq(7))
    c = Ctl(eng, H3, SRV, sport=40001)
    c.open(0.0)
    echoes = b"".join(raw(PPTPEchoRequest(identifier=i)) for i in range(250))
    cut = 60 * len(raw(PPTPEchoRequest()))  # at a message boundary
    stream = raw(PPTPStartControlConnectionRequest()) + echoes[:cut] + ocrq(7) + echoes[cut:]
    seg = c._lan_seg(stream, c.cseq, "PA")
    assert len(stream) > 2 * 1448
    h = hdr(seg, vnet.GSO_TCPV4, 1448)
    out = eng.process_vnet("lan", partial(seg), 0.5, h)
    assert len(out) == 1 and out[0][0] == "wan" and len(out[0][1]) == len(seg)
    flags, gso, _hl, gsz, start, off = vnet.unpack(out[0][2])
    assert (flags, gso, gsz, start, off) == (vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 1448, 20, 16)
    fin = completed(out[0][1], out[0][2])
    assert checksums_ok(fin)
    body = bytes(IP(fin)[TCP].payload)
    pos = len(raw(PPTPStartControlConnectionRequest())) + cut
    assert body[:pos] == stream[:pos] and body[pos + 14:] == stream[pos + 14:]
    masq = int.from_bytes(body[pos + 12:pos + 14], "big")
    assert masq != 7
    calls = {r["lan"]: r["masq_call_id"] for r in eng.table(0.6) if r["proto"] == "gre"}
    assert calls[f"{H3}:7"] == masq


def test_isakmp_with_partial_checksums_goes_through_the_helper() -> None:
    """ISAKMP (UDP 500<->500) read with partial checksums: the helper routes by cookies and the
    packets leave finished, both ways."""
    from tests.engine.test_forward_vpn_servers import isakmp

    eng = Engine(make_cfg())
    a, zero, b = b"\xaa" * 8, b"\0" * 8, b"\xbb" * 8
    out_pkt = udp(H2, SRV, 500, 500, isakmp(a, zero))
    out = eng.process_vnet("lan", partial(out_pkt), 0.0, hdr(out_pkt))
    assert len(out) == 1 and out[0][0] == "wan" and out[0][2] == b""
    assert checksums_ok(out[0][1]) and IP(out[0][1]).src == WAN_IP and IP(out[0][1])[UDP].sport == 500
    back = udp(SRV, WAN_IP, 500, 500, isakmp(a, b))
    out = eng.process_vnet("wan", partial(back), 0.1, hdr(back))
    assert len(out) == 1 and out[0][0] == "lan" and IP(out[0][1]).dst == H2
    assert checksums_ok(out[0][1]) and bytes(IP(out[0][1])[UDP].payload) == isakmp(a, b)


@settings(max_examples=150, deadline=None)
@given(proto=st.sampled_from(["tcp", "udp"]), host=st.integers(2, 250), sport=st.integers(1024, 65535),
       dport=st.integers(1, 65535), rem=st.integers(1, 254), size=st.integers(0, 1400))
def test_partial_checksums_come_out_right_for_any_flow(proto: str, host: int, sport: int, dport: int,
                                                       rem: int, size: int) -> None:
    """Any addresses, ports and payload length (odd ones too): a partial checksum rewritten by
    masqd and then completed equals the checksum computed from scratch, both ways."""
    eng = Engine(make_cfg())
    lan, remote = f"10.0.0.{host}", f"198.51.100.{rem}"
    payload = bytes((i * 7 + size) & 0xFF for i in range(size))

    def build(src: str, dst: str, sp: int, dp: int, flags: str = "A") -> bytes:
        if proto == "tcp":
            return tcp(src, dst, sp, dp, flags, payload=payload, seq=5, ack=9)
        return udp(src, dst, sp, dp, payload)

    first = eng.process("lan", build(lan, remote, sport, dport, "S"), 0.0)
    wport = IP(first[0][1]).payload.sport
    eng.process("wan", build(remote, WAN_IP, dport, wport, "SA"), 0.1)
    eng.process("lan", build(lan, remote, sport, dport), 0.2)
    for iface, pkt in (("lan", build(lan, remote, sport, dport)), ("wan", build(remote, WAN_IP, dport, wport))):
        out = eng.process_vnet(iface, partial(pkt), 0.3, hdr(pkt))
        assert len(out) == 1, (iface, eng.counters)
        fin = completed(out[0][1], out[0][2])
        assert checksums_ok(fin), IP(fin).show(dump=True)
