"""wire: checksums against scapy, and RFC 1624 incremental updates equal full recomputation."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import IP, UDP, raw

from masqd.wire import Malformed, addr_delta, apply_delta, check_ipv4, checksum, word_delta
from masqd.wire.checksum import apply_delta_udp
from masqd.wire.ipv4 import build_ipv4, rewrite_tos, set_ip_checksum


@given(st.binary(min_size=0, max_size=300))
def test_checksum_matches_scapy(data: bytes) -> None:
    from scapy.utils import checksum as scapy_checksum

    assert checksum(data) == scapy_checksum(data)


@settings(max_examples=300)
@given(st.binary(min_size=20, max_size=60).map(lambda b: b[: len(b) & ~1]),
       st.integers(0, (len_ := 9)), st.integers(0, 0xFFFF))
def test_incremental_word_update_equals_full(data: bytes, idx: int, new: int) -> None:
    buf = bytearray(data)
    c = checksum(buf)
    old = struct.unpack_from("!H", buf, idx * 2)[0]
    struct.pack_into("!H", buf, idx * 2, new)
    inc = apply_delta(c, word_delta(old, new))
    full = checksum(buf)
    # ones-complement has two zeros; both describe the same sum
    assert inc == full or {inc, full} == {0, 0xFFFF}


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(min_size=8, max_size=40))
def test_incremental_address_update_equals_full(a: int, b: int, rest: bytes) -> None:
    rest = rest[: len(rest) & ~1]
    buf = bytearray(a.to_bytes(4, "big") + rest)
    c = checksum(buf)
    buf[0:4] = b.to_bytes(4, "big")
    inc = apply_delta(c, addr_delta(a, b))
    full = checksum(buf)
    assert inc == full or {inc, full} == {0, 0xFFFF}


def test_udp_zero_checksum_stays_zero() -> None:
    assert apply_delta_udp(0, 1234) == 0


def test_wrong_checksum_stays_detectably_wrong() -> None:
    buf = bytearray(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    good = checksum(buf)
    bad = good ^ 0x0101
    buf2 = bytearray(buf)
    buf2[0:2] = b"\xaa\xbb"
    new_good = checksum(buf2)
    assert apply_delta(bad, word_delta(0x0102, 0xAABB)) != new_good


def test_check_ipv4_rejects_bad_headers() -> None:
    good = bytearray(raw(IP(src="10.0.0.2", dst="198.51.100.1") / UDP()))
    assert check_ipv4(bytearray(good)) == 20
    cases = {
        "truncated_ip": good[:10],
        "not_ipv4": bytearray(b"\x60") + good[1:],
        "bad_ihl": bytearray(b"\x44") + good[1:],
        "bad_total_length": good[:2] + b"\x00\x05" + good[4:],
        "bad_ip_checksum": good[:11] + bytes([good[11] ^ 0x10]) + good[12:],
    }
    for reason, pkt in cases.items():
        try:
            check_ipv4(bytearray(pkt))
        except Malformed as exc:
            assert exc.reason == reason
        else:
            raise AssertionError(reason)
    longer = good[:2] + b"\x05\xdc" + good[4:]
    try:
        check_ipv4(bytearray(longer))
    except Malformed as exc:
        assert exc.reason == "truncated_ip"
    padded = bytearray(good + b"\0\0\0\0")
    check_ipv4(padded)
    assert len(padded) == len(good)
    # the checksum covers the options too (RFC 1812 5.2.2)
    opts = bytearray(raw(IP(src="10.0.0.2", dst="198.51.100.1", options=[b"\x01\x01\x01\x00"]) / UDP()))
    assert check_ipv4(bytearray(opts)) == 24
    opts[21] ^= 0x01
    try:
        check_ipv4(opts)
    except Malformed as exc:
        assert exc.reason == "bad_ip_checksum"
    else:
        raise AssertionError("bad checksum over the options accepted")


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=20, max_size=60).map(bytearray))
def test_header_checksum_ok_agrees_with_the_rfc1071_sum(hdr: bytearray) -> None:
    from masqd.wire.ipv4 import header_checksum_ok

    n = len(hdr) & ~3
    hdr = hdr[:n]
    hdr[0] = 0x40 | (n >> 2)
    assert header_checksum_ok(hdr) == (checksum(hdr) == 0)
    hdr[10:12] = b"\0\0"
    c = checksum(hdr)
    hdr[10:12] = c.to_bytes(2, "big")
    assert header_checksum_ok(hdr)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(1, 255))
def test_rewrite_tos_updates_the_header_checksum_as_a_full_computation_would(
    tos: int, tos_and: int, tos_xor: int, ident: int, ttl: int
) -> None:
    pkt = build_ipv4(0x0A000002, 0xC6336401, 17, b"payload!", ttl=ttl, ident=ident, tos=tos)
    changed = rewrite_tos(pkt, tos_and, tos_xor)
    assert pkt[1] == (tos & tos_and) ^ tos_xor and changed == (pkt[1] != tos)
    full = bytearray(pkt)
    set_ip_checksum(full, 20)
    assert full[10:12] == pkt[10:12]
