"""pcap writer: files that scapy and tshark decode, with the right link type."""

from __future__ import annotations

import subprocess
from pathlib import Path

from scapy.all import ICMP, IP, UDP, Ether, Raw, rdpcap  # type: ignore[import-untyped]

from masqd.ops.metrics import OpsCounters
from masqd.ops.pcap import LINKTYPE_ETHERNET, LINKTYPE_RAW, Capture, PcapWriter


def test_raw_ip_capture_decoded_by_scapy_and_tshark(tmp_path: Path) -> None:
    p = tmp_path / "lan.pcap"
    w = PcapWriter(str(p), LINKTYPE_RAW, clock=lambda: 1_700_000_000.25)
    pkts = [bytes(IP(src="10.0.0.2", dst="198.51.100.1") / ICMP(id=7, seq=i)) for i in range(3)]
    pkts.append(bytes(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=500, dport=500) / Raw(b"x" * 40)))
    for pk in pkts:
        w.write(pk)
    w.close()
    assert (p.stat().st_mode & 0o777) == 0o600
    got = rdpcap(str(p))
    assert [bytes(x) for x in got] == pkts
    assert float(got[0].time) == 1_700_000_000.25
    r = subprocess.run(["tshark", "-r", str(p), "-T", "fields", "-e", "ip.src", "-e", "ip.dst", "-e", "ip.proto"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert rows == [["10.0.0.2", "198.51.100.1", "1"]] * 3 + [["10.0.0.2", "198.51.100.1", "17"]]


def test_ethernet_capture_for_tap(tmp_path: Path) -> None:
    p = tmp_path / "wan.pcap"
    cap = Capture(OpsCounters())
    w = cap.start("wan", str(p), "tap")
    assert w.linktype == LINKTYPE_ETHERNET and cap.active
    frame = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") /
                  IP(src="203.0.113.200", dst="198.51.100.1") / ICMP())
    cap.record("wan", frame)
    cap.record("lan", frame)  # no lan writer: ignored
    assert cap.stop() == {"wan": 1}
    assert not cap.active
    assert cap.counters.capture_packets == {"wan": 1}
    r = subprocess.run(["tshark", "-r", str(p), "-T", "fields", "-e", "eth.src", "-e", "ip.dst"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["02:00:00:00:00:01", "198.51.100.1"]


def test_snaplen_truncates_but_keeps_original_length(tmp_path: Path) -> None:
    p = tmp_path / "s.pcap"
    w = PcapWriter(str(p), LINKTYPE_RAW, snaplen=40)
    pk = bytes(IP(src="10.0.0.2", dst="198.51.100.1") / UDP() / Raw(b"y" * 100))
    w.write(pk)
    w.close()
    got = rdpcap(str(p))
    assert len(bytes(got[0])) == 40 and got[0].wirelen == len(pk)
