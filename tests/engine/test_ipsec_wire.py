"""ESP / ISAKMP header views against scapy, and arbitrary IPsec-looking bytes through the engine."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import IP, UDP, raw
from scapy.contrib.ikev2 import IKEv2
from scapy.layers.ipsec import ESP
from scapy.layers.isakmp import ISAKMP

from masqd.engine import Engine
from masqd.wire import Malformed
from masqd.wire.esp import build_esp, esp_header, spi_reason
from masqd.wire.isakmp import build_isakmp, isakmp_header
from tests.engine.conftest import H2, H3, SRV, WAN_IP, make_cfg


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=40))
def test_esp_header_matches_scapy(spi: int, seq: int, body: bytes) -> None:
    b = raw(ESP(spi=spi, seq=seq, data=body))
    assert esp_header(b, 0) == (spi, seq)
    assert build_esp(spi, seq, body) == b


def test_esp_truncated_and_spi_reasons() -> None:
    with pytest.raises(Malformed) as ei:
        esp_header(b"\0" * 7, 0)
    assert ei.value.reason == "esp_truncated"
    assert spi_reason(0) == "esp_spi_zero"
    assert spi_reason(255) == "esp_reserved_spi"
    assert spi_reason(256) is None


@given(st.binary(min_size=8, max_size=8), st.binary(min_size=8, max_size=8), st.integers(0, 255),
       st.integers(0, 255), st.integers(0, 2**32 - 1), st.binary(max_size=30), st.sampled_from([0x10, 0x20]))
def test_isakmp_header_matches_scapy(i: bytes, r: bytes, exch: int, flags: int, mid: int, body: bytes,
                                     version: int) -> None:
    if version == 0x10:
        b = raw(ISAKMP(init_cookie=i, resp_cookie=r, exch_type=exch, flags=flags, id=mid, next_payload=0) / body)
    else:
        b = raw(IKEv2(init_SPI=i, resp_SPI=r, exch_type=exch, flags=flags, id=mid, next_payload=0) / body)
    h = isakmp_header(b, 0)
    assert (h.icookie, h.rcookie, h.exchange, h.flags, h.msgid, h.length) == (i, r, exch, flags, mid, len(b))
    assert h.major == version >> 4
    assert build_isakmp(i, r, version=version, exchange=exch, flags=flags, msgid=mid, body=body) == b


def _eng() -> Engine:
    return Engine(make_cfg("[ipsec]\nparallel_sessions = true\nmax_spis_per_remote = 4\n"))


_packets = st.lists(
    st.tuples(
        st.sampled_from(["lan", "wan"]),
        st.sampled_from([50, 51, 17]),
        st.sampled_from([H2, H3]),
        st.binary(max_size=60),
        st.integers(0, 300),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_packets)
def test_arbitrary_ipsec_payloads_never_crash_and_state_stays_bounded(pkts: list) -> None:
    eng = _eng()
    now = 0.0
    for iface, proto, host, body, dt in pkts:
        now += dt
        src, dst = (host, SRV) if iface == "lan" else (SRV, WAN_IP)
        if proto == 17:
            p = raw(IP(src=src, dst=dst) / UDP(sport=500, dport=500) / body)
        else:
            p = raw(IP(src=src, dst=dst, proto=proto) / body)
        eng.process(iface, p, now)
        eng.expire(now)
    c = eng.counters
    assert c.get("drop_internal_error", 0) == 0
    h = eng.helpers[0]
    assert h.size() <= 4 + 4  # ESP and ISAKMP entries with the single remote
    assert h.size() == len(h.entries(now))
