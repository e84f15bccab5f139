"""The tests' PCP / NAT-PMP encoder, and masqd's answers, read back by Wireshark's dissector.

tests/engine/pcpclient.py is written from the RFCs' layouts; here tshark (its
``portcontrol`` and ``nat-pmp`` dissectors, an implementation that owes nothing
to masqd or to the tests) decodes what it builds and what masqd answers, field
by field. No packet leaves the process: scapy writes a pcap file, tshark
reads it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from scapy.all import IP, UDP, raw, wrpcap

from masqd.engine import Engine
from tests.engine import pcpclient as pc
from tests.engine.conftest import H2, LAN_IP, WAN_IP, make_cfg

NONCE = bytes(range(1, 13))


def dissect(tmp_path: Path, payloads: list[tuple[bytes, bool]], fields: list[str]) -> list[list[str]]:
    """tshark's view of each payload (``True``: sent to the server, else from it), one row of
    ``fields`` per packet."""
    pkts = [IP(src=H2, dst=LAN_IP) / UDP(sport=40000, dport=5351) / p if to_server else
            IP(src=LAN_IP, dst=H2) / UDP(sport=5351, dport=40000) / p for p, to_server in payloads]
    path = tmp_path / "pcp.pcap"
    wrpcap(str(path), pkts)
    cmd = ["tshark", "-r", str(path), "-T", "fields", "-E", "separator=|", "-E", "occurrence=a",
           "-E", "aggregator=,"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    return [line.split("|") for line in out.splitlines()]


def test_map_and_peer_requests_with_options_as_wireshark_reads_them(tmp_path: Path) -> None:
    reqs = [
        (pc.map_request(H2, NONCE, pc.TCP, 8080, 40000, "203.0.113.200", 7200,
                        pc.third_party("10.0.0.3") + pc.prefer_failure()
                        + pc.filter_option(120, 443, "198.51.100.0")), True),
        (pc.peer_request(H2, NONCE, pc.UDP, 5000, "198.51.100.7", 6000, suggested=5001, lifetime=300), True),
    ]
    rows = dissect(tmp_path, reqs, [
        "portcontrol.version", "portcontrol.opcode", "portcontrol.r", "portcontrol.lifetime_req",
        "portcontrol.client_ip", "portcontrol.map.nonce", "portcontrol.map.protocol",
        "portcontrol.map.internal_port", "portcontrol.map.req_sug_external_port",
        "portcontrol.map.req_sug_external_ip", "portcontrol.option.code",
        "portcontrol.option.third_party.internal_ip", "portcontrol.option.filter.prefix_length",
        "portcontrol.option.filter.remote_peer_port", "portcontrol.option.filter.remote_peer_ip",
        "portcontrol.peer.protocol", "portcontrol.peer.internal_port", "portcontrol.peer.req_sug_external_port",
        "portcontrol.peer.remote_peer_port", "portcontrol.peer.remote_peer_ip",
    ])
    m, p = rows
    assert m[:11] == ["2", "1", "0", "7200", f"::ffff:{H2}", NONCE.hex(), "6", "8080", "40000",
                      "::ffff:203.0.113.200", "1,2,3"], m
    assert m[11:15] == ["::ffff:10.0.0.3", "120", "443", "::ffff:198.51.100.0"], m
    assert p[1] == "2" and p[3] == "300", p
    assert p[15:] == ["17", "5000", "5001", "6000", "::ffff:198.51.100.7"], p


def test_natpmp_requests_as_wireshark_reads_them(tmp_path: Path) -> None:
    rows = dissect(tmp_path, [(pc.natpmp_address_request(), True),
                              (pc.natpmp_map_request("udp", 5000, 6000, 3600), True)],
                   ["nat-pmp.version", "nat-pmp.opcode", "nat-pmp.internal_port", "nat-pmp.external_port",
                    "nat-pmp.pml"])
    assert rows == [["0", "0", "", "", ""], ["0", "1", "5000", "6000", "3600"]], rows


def _answer(eng: Engine, payload: bytes, now: float) -> bytes:
    out = eng.process("lan", raw(IP(src=H2, dst=LAN_IP) / UDP(sport=40000, dport=5351) / payload), now)
    assert len(out) == 1, out
    return bytes(IP(out[0][1])[UDP].payload)


def test_masqd_answers_as_wireshark_reads_them(tmp_path: Path) -> None:
    eng = Engine(make_cfg("[pcp]\nenabled = true\n"))
    answers = [
        _answer(eng, pc.map_request(H2, NONCE, pc.TCP, 8080, 40000, lifetime=7200), 10.0),
        _answer(eng, pc.peer_request(H2, NONCE, pc.UDP, 5000, "198.51.100.7", 6000), 11.0),
        _answer(eng, pc.announce_request(H2), 12.0),
    ]
    rows = dissect(tmp_path, [(a, False) for a in answers], [
        "portcontrol.version", "portcontrol.r", "portcontrol.opcode", "portcontrol.result_code",
        "portcontrol.lifetime_rsp", "portcontrol.epoch_time", "portcontrol.map.nonce",
        "portcontrol.map.protocol", "portcontrol.map.internal_port", "portcontrol.map.rsp_assigned_external_port",
        "portcontrol.map.rsp_assigned_ext_ip", "portcontrol.peer.rsp_assigned_external_port",
        "portcontrol.peer.remote_peer_port", "portcontrol.peer.remote_peer_ip",
    ])
    m, p, a = rows
    assert m[:11] == ["2", "1", "1", "0", "7200", "0", NONCE.hex(), "6", "8080", "40000", f"::ffff:{WAN_IP}"], m
    assert p[2:6] == ["2", "0", "600", "1"] and p[11:] == ["5000", "6000", "::ffff:198.51.100.7"], p
    assert a[:6] == ["2", "1", "0", "0", "0", "2"], a
    nat = [_answer(eng, pc.natpmp_address_request(), 13.0),
           _answer(eng, pc.natpmp_map_request("udp", 5001, 6001, 3600), 14.0)]
    rows = dissect(tmp_path, [(x, False) for x in nat],
                   ["nat-pmp.version", "nat-pmp.opcode", "nat-pmp.result_code", "nat-pmp.sssoe",
                    "nat-pmp.external_ip", "nat-pmp.internal_port", "nat-pmp.external_port", "nat-pmp.pml"])
    assert rows[0][:5] == ["0", "128", "0", "3", WAN_IP], rows
    assert rows[1][:4] == ["0", "129", "0", "4"] and rows[1][5:] == ["5001", "6001", "3600"], rows
