"""IPsec hosts announce their SPI pairs (issue 22, the HOWTO's "Routage correct du trafic crypté
entrant"): inbound ESP goes to the right host at once, with no serialisation and no guessing.

The HOWTO's situation: several masqueraded hosts with IPsec tunnels to one gateway re-key at the
same moment. Learning SPIs from traffic can pair one host's new inbound SPI with another host's
pending outbound SPI; announcements cannot. Driven through the engine with a fake clock; the
SPI_ANNOUNCE requests come from the tests' own encoder (tests/engine/pcpclient.py).
"""

from __future__ import annotations

from scapy.all import ESP, IP, UDP, raw

from masqd.config import loads
from masqd.engine import Engine
from tests.engine import pcpclient as pc
from tests.engine.conftest import BASE, H2, H3, LAN_IP, SRV, WAN_IP, one
from tests.engine.test_pcp import ask

H4 = "10.0.0.4"
NONCE = b"spi-announce"
SUCCESS, NOT_AUTHORIZED, MALFORMED_REQUEST, UNSUPP_OPCODE, NO_RESOURCES = 0, 2, 3, 4, 8
UNSUPP_PROTOCOL, ADDRESS_MISMATCH = 9, 12

PARALLEL = "[ipsec]\nparallel_sessions = true\n"


def engine(pcp: str = "", extra: str = PARALLEL) -> Engine:
    return Engine(loads(BASE + "[pcp]\nenabled = true\n" + pcp + extra))


def esp(src: str, dst: str, spi: int, seq: int = 1) -> bytes:
    return raw(IP(src=src, dst=dst) / ESP(spi=spi, seq=seq) / b"ciphertext")


def announce(eng: Engine, host: str, spi_out: int, spi_in: int, now: float, lifetime: int = 3600,
             remote: str = SRV) -> tuple[pc.PcpAnswer, list[tuple[str, bytes]]]:
    """An SPI_ANNOUNCE from ``host``: (its answer, the other packets the engine sent with it)."""
    out = eng.process("lan", raw(IP(src=host, dst=LAN_IP) / UDP(sport=4500 + 1,
                      dport=5351) / pc.spi_request(host, NONCE, spi_out, spi_in, remote, lifetime)), now)
    answers = [p for i, p in out if IP(p).src == LAN_IP]
    assert len(answers) == 1, out
    a = pc.parse_pcp(bytes(IP(answers[0]).payload.payload))
    return a, [(i, p) for i, p in out if IP(p).src != LAN_IP]


def inbound(eng: Engine, spi: int, now: float, seq: int = 1) -> list[str]:
    """Inbound ESP from the gateway with ``spi``: the LAN hosts it was delivered to."""
    out = eng.process("wan", esp(SRV, WAN_IP, spi, seq), now)
    return [IP(p).dst for i, p in out if i == "lan"]


def outbound(eng: Engine, host: str, spi: int, now: float, seq: int = 1) -> bool:
    out = eng.process("lan", esp(host, SRV, spi, seq), now)
    if not out:
        return False
    p = one(out, "wan")
    assert p.src == WAN_IP and p[ESP].spi == spi
    return True


def test_an_announced_pair_routes_both_ways_at_once() -> None:
    eng = engine()
    a, extra = announce(eng, H2, 0x1000, 0x2000, 1.0)
    assert (a.opcode, a.result, a.lifetime, len(a.raw)) == (96, SUCCESS, 1800, 64)
    assert a.raw[24:64] == pc.spi_request(H2, NONCE, 0x1000, 0x2000, SRV)[24:64]  # the data echoed
    assert extra == []
    assert inbound(eng, 0x2000, 1.1) == [H2]  # before the host sent anything
    assert outbound(eng, H2, 0x1000, 1.2)
    row = next(r for r in eng.table(2.0) if r["proto"] == "esp")
    assert (row["lan"], row["state"], row["spi_out"], row["spi_in"]) == (H2, "ESTABLISHED", "0x00001000",
                                                                         "0x00002000")
    assert eng.c["spi_announced"] == 1 and eng.c["esp_announced"] == 1
    assert "esp_pending" not in eng.c and "esp_learned" not in eng.c


def test_an_announcement_completes_a_pending_entry_and_the_remote_opens_to_others() -> None:
    eng = engine()
    assert outbound(eng, H2, 0x1000, 1.0)  # PENDING, other hosts' new SAs wait behind it
    assert not outbound(eng, H3, 0x3000, 1.1) and eng.c["esp_blocked"] == 1
    announce(eng, H2, 0x1000, 0x2000, 1.2)
    assert outbound(eng, H3, 0x3000, 1.3)  # no longer blocked
    assert inbound(eng, 0x2000, 1.4) == [H2]


def test_an_inbound_spi_paired_to_another_host_is_not_stolen() -> None:
    eng = engine()
    announce(eng, H2, 0x1000, 0x2000, 1.0)
    a, _ = announce(eng, H3, 0x3000, 0x2000, 2.0)
    assert a.result == NOT_AUTHORIZED
    assert eng.c["spi_announce_refused_taken"] == 1 and eng.c["esp_announce_conflicts"] == 1
    assert inbound(eng, 0x2000, 2.1) == [H2]
    # a pair learned from traffic is protected the same way
    eng = engine()
    outbound(eng, H2, 0x1000, 1.0)
    assert inbound(eng, 0x2000, 1.1) == [H2]  # learned (HOWTO rule 4)
    assert announce(eng, H3, 0x3000, 0x2000, 2.0)[0].result == NOT_AUTHORIZED
    assert inbound(eng, 0x2000, 2.1) == [H2]


def test_announcements_for_another_host_are_refused() -> None:
    eng = engine()
    req = pc.spi_request(H3, NONCE, 0x1000, 0x2000, SRV)  # claims to be H3, sent by H2
    assert pc.parse_pcp(ask(eng, req, 1.0, src=H2)[0]).result == ADDRESS_MISMATCH
    req = pc.spi_request(H2, NONCE, 0x1000, 0x2000, SRV, options=pc.third_party(H3))
    assert pc.parse_pcp(ask(eng, req, 1.0, src=H2)[0]).result == NOT_AUTHORIZED
    assert eng.c["spi_announce_refused_other_host"] == 1
    assert not [r for r in eng.table(2.0) if r["proto"] == "esp"]


def test_bad_announcements() -> None:
    eng = engine()
    cases = [
        (pc.spi_request(H2, NONCE, 0x10, 0x2000, SRV), MALFORMED_REQUEST),  # reserved SPI
        (pc.spi_request(H2, NONCE, 0x1000, 0, SRV), MALFORMED_REQUEST),
        (pc.spi_request(H2, NONCE, 0x1000, 0x2000, SRV, proto=51), UNSUPP_PROTOCOL),
        (pc.spi_request(H2, NONCE, 0x1000, 0x2000, H3), MALFORMED_REQUEST),  # not a WAN-side gateway
        (pc.spi_request(H2, NONCE, 0x1000, 0x2000, WAN_IP), MALFORMED_REQUEST),
        (pc.spi_request(H2, NONCE, 0x1000, 0x2000, SRV)[:60], MALFORMED_REQUEST),  # cut short
    ]
    for req, want in cases:
        assert pc.parse_pcp(ask(eng, req, 1.0)[0]).result == want, req.hex()
    eng = engine(extra="[ipsec]\nenabled = false\n")
    assert pc.parse_pcp(ask(eng, pc.spi_request(H2, NONCE, 0x1000, 0x2000, SRV), 1.0)[0]).result == UNSUPP_OPCODE


def test_withdrawal_removes_the_pair() -> None:
    eng = engine()
    announce(eng, H2, 0x1000, 0x2000, 1.0)
    a, _ = announce(eng, H2, 0x1000, 0x2000, 2.0, lifetime=0)
    assert (a.result, a.lifetime) == (SUCCESS, 0)
    assert not [r for r in eng.table(3.0) if r["proto"] == "esp"]
    assert eng.c["spi_withdrawn"] == 1


def test_inbound_esp_with_a_new_spi_waits_for_the_announcement_then_goes_to_its_owner() -> None:
    eng = engine()
    announce(eng, H2, 0x1000, 0x2000, 1.0)
    announce(eng, H3, 0x3000, 0x4000, 1.0)
    # H3 re-keys; the gateway's first packets on the new SA come before H3's announcement
    assert inbound(eng, 0x4001, 10.0, seq=1) == []
    assert inbound(eng, 0x4001, 10.1, seq=2) == []
    assert eng.c["esp_held"] == 2 and "esp_guessed" not in eng.c
    a, released = announce(eng, H3, 0x3001, 0x4001, 10.2)
    assert a.result == SUCCESS
    assert [(i, IP(p).dst, IP(p)[ESP].seq) for i, p in released] == [("lan", H3, 1), ("lan", H3, 2)]
    assert eng.c["esp_held_released"] == 2
    assert inbound(eng, 0x4001, 10.3, seq=3) == [H3]
    assert inbound(eng, 0x4000, 10.4) == [H3]  # the old SA drains to the same host
    assert outbound(eng, H3, 0x3001, 10.5)


def test_held_packets_are_bounded_in_number_and_time() -> None:
    eng = engine("spi_hold = 1.0\nspi_hold_packets = 2\n")
    announce(eng, H2, 0x1000, 0x2000, 1.0)
    for seq in range(3):
        assert inbound(eng, 0x2001, 5.0, seq) == []
    assert eng.c["esp_held"] == 2 and eng.c["esp_held_overflow"] == 1
    eng.expire(6.5)
    assert eng.c["esp_held_expired"] == 2
    _, released = announce(eng, H2, 0x1001, 0x2001, 6.6)
    assert released == []


def test_guessed_copies_are_counted_as_misdelivered_once_the_owner_announces() -> None:
    """A host that does not announce keeps the HOWTO's behaviour (it may get guessed copies); when
    the owner of the SPI announces it, masqd counts the copies that went elsewhere."""
    eng = engine()
    isakmp = raw(IP(src=H3, dst=SRV) / UDP(sport=500, dport=500)
                 / (b"\x33" * 8 + b"\0" * 8 + b"\x01\x10\x02\x00" + b"\0" * 4 + (28).to_bytes(4, "big")))
    eng.process("lan", isakmp, 1.0)  # H3 (no announcements) re-keyed with the gateway lately
    reply = raw(IP(src=SRV, dst=WAN_IP) / UDP(sport=500, dport=500)
                / (b"\x33" * 8 + b"\x44" * 8 + b"\x01\x10\x02\x00" + b"\0" * 4 + (28).to_bytes(4, "big")))
    assert one(eng.process("wan", reply, 1.05), "lan").dst == H3
    outbound(eng, H3, 0x3000, 1.1)
    assert inbound(eng, 0x4000, 1.2) == [H3]  # learned
    announce(eng, H2, 0x1000, 0x2000, 2.0)
    assert inbound(eng, 0x2001, 3.0) == [H3]  # H2's new SPI: held for H2, guessed copy for H3
    _, released = announce(eng, H2, 0x1001, 0x2001, 3.1)
    assert [IP(p).dst for _i, p in released] == [H2]
    assert eng.c["esp_misdelivered"] == 1


# --------------------------------------------------------------------------- the HOWTO's situation

HOSTS = (H2, H3, H4)


def _rekey_storm(announcements: bool) -> tuple[int, int]:
    """Three hosts with tunnels to one gateway re-key at the same moment while traffic flows both
    ways. Returns (inbound packets delivered to a host that does not own the SPI, inbound packets
    delivered to their owner)."""
    eng = engine()
    owner: dict[int, str] = {}
    out_spi = {h: 0x1000 * (i + 1) for i, h in enumerate(HOSTS)}
    in_spi = {h: 0x10000 * (i + 1) for i, h in enumerate(HOSTS)}
    wrong = right = 0
    now = 1.0

    def deliver(spi: int, seq: int) -> None:
        nonlocal wrong, right
        got = inbound(eng, spi, now, seq)
        wrong += sum(1 for d in got if d != owner[spi])
        right += sum(1 for d in got if d == owner[spi])

    def up(h: str) -> None:
        nonlocal right
        owner[in_spi[h]] = h
        if announcements:
            _, released = announce(eng, h, out_spi[h], in_spi[h], now)
            right += len(released)

    # the tunnels come up one after the other (the HOWTO's serialisation learns them)
    for h in HOSTS:
        up(h)
        for seq in range(3):
            outbound(eng, h, out_spi[h], now, seq)
            deliver(in_spi[h], seq)
            now += 0.1
    assert wrong == 0
    # the re-key: every host's kernel switches to its new outbound SA at once; the gateway
    # already sends on the hosts' new inbound SAs (replies to the last pings of the old SAs)
    for h in HOSTS:
        out_spi[h] += 1
        in_spi[h] += 1
        owner[in_spi[h]] = h
    for seq in range(10, 16):
        for h in reversed(HOSTS):
            deliver(in_spi[h], seq)
            outbound(eng, h, out_spi[h], now, seq)
        if seq == 12:
            for h in HOSTS:  # the updown hooks run
                up(h)
        now += 0.2
    for seq in range(20, 23):  # afterwards everything flows
        for h in HOSTS:
            outbound(eng, h, out_spi[h], now, seq)
            deliver(in_spi[h], seq)
        now += 0.5
    return wrong, right


def test_three_hosts_rekeying_at_once_no_packet_reaches_the_wrong_host_with_announcements() -> None:
    wrong, right = _rekey_storm(announcements=True)
    assert wrong == 0
    assert right == 3 * 3 + 3 * 6 + 3 * 3  # every inbound packet reached its owner


def test_three_hosts_rekeying_at_once_without_announcements_the_howto_weakness_shows() -> None:
    wrong, _right = _rekey_storm(announcements=False)
    assert wrong > 0
