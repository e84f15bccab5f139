"""LAN hosts ask masqd for mappings (issue 22): Debian's natpmpc (libnatpmp) against the real masqd
process in the namespace lab, TAP and TUN mode.

natpmpc in lan2/lan3 gets the external address and a TCP and a UDP mapping;
connections from srv1 (the WAN side) to the mapped ports reach the LAN hosts'
servers, byte for byte; ``masqd table`` and ``masqd rules list`` show the
mappings; a deletion closes the port. The announcements masqd multicasts at
start (224.0.0.1:5350) reach a listener on the LAN in TAP mode; in TUN mode
they are seen leaving masqd's TUN device (the lab's LAN edge is a routing
kernel: it does not forward link-local multicast). The SPI
announcement client (deploy/masqd-spi-announce) run on a LAN host makes masqd
send raw ESP from srv1 with the announced SPI to that host, with no ESP from
the host first.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from masqd.lab import FW_LAN, FW_WAN, LAN2, LAN3, SRV1, Lab, MasqdProcess, stop_process

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "masqd-spi-announce"

LISTENER = r'''
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5350))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton("224.0.0.1") + socket.inet_aton("0.0.0.0"))
print("ready", flush=True)
s.settimeout(0.2)
end = time.monotonic() + float(sys.argv[2])
with open(sys.argv[1], "w") as out:
    while time.monotonic() < end:
        try:
            data, peer = s.recvfrom(2048)
        except TimeoutError:
            continue
        out.write(json.dumps({"from": f"{peer[0]}:{peer[1]}", "data": data.hex(), "t": time.monotonic()}) + "\n")
        out.flush()
'''


@dataclass
class PcpLab:
    lab: Lab
    masqd: MasqdProcess
    mode: str
    sock: str
    announcements: Path

    def cli(self, *args: str) -> str:
        cp = subprocess.run([sys.executable, "-m", "masqd.cli", *args, "--socket", self.sock], capture_output=True,
                            text=True, timeout=30, cwd=REPO)
        assert cp.returncode == 0, cp.stderr
        return cp.stdout

    def natpmpc(self, role: str, *args: str) -> str:
        cp = self.lab.exec(role, ["natpmpc", "-g", FW_LAN, *args], check=False, timeout=30)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        return cp.stdout


@pytest.fixture(scope="module", params=["tap", "tun"])
def pcplab(request: pytest.FixtureRequest, stale_labs_removed: None, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[PcpLab]:
    mode = request.param
    lab = Lab(f"t{os.getpid()}{'p' if mode == 'tap' else 'q'}", mode=mode)
    lab.down()
    listener = None
    try:
        lab.up()
        ann = tmp_path_factory.mktemp("pcp") / "announcements.jsonl"
        if mode == "tap":  # a LAN host listening for masqd's announcements before masqd starts
            listener = lab.popen("lan3", [sys.executable, "-c", LISTENER, str(ann), "60"], stdout=subprocess.PIPE,
                                 text=True)
            assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        else:  # what leaves masqd's LAN TUN device
            listener = lab.popen("lanedge", ["tcpdump", "-n", "-l", "-i", "tun-lan", "-w", str(ann),
                                             "-U", "udp", "port", "5350"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            assert listener.stderr is not None and "listening" in listener.stderr.readline()
        cfg = lab.masqd_config(extra="\n[pcp]\nenabled = true\n\n[ipsec]\nparallel_sessions = true\n")
        proc = lab.start_masqd(cfg)
        try:
            yield PcpLab(lab, proc, mode, f"/run/masqd/{lab.prefix}.sock", ann)
        finally:
            proc.stop()
    finally:
        if listener is not None:
            stop_process(listener)
        lab.down()


def test_natpmpc_gets_the_external_address(pcplab: PcpLab) -> None:
    out = pcplab.natpmpc("lan2")
    assert f"Public IP address : {FW_WAN}" in out, out


def test_natpmpc_tcp_mapping_carries_a_connection_from_the_wan_side(pcplab: PcpLab) -> None:
    lab = pcplab.lab
    out = pcplab.natpmpc("lan2", "-a", "40080", "8080", "tcp", "3600")
    m = re.search(r"Mapped public port (\d+) protocol TCP to local port 8080 li[f]?e?time (\d+)", out)
    assert m and m.group(1) == "40080" and m.group(2) == "3600", out
    server = lab.tool_server("lan2", ["tcp-server", "8080"])
    try:
        rc, rep = lab.tool("srv1", ["tcp-client", FW_WAN, "40080", str(512 * 1024)], timeout=30)
    finally:
        stop_process(server)
    assert rc == 0 and rep["ok"], rep
    assert rep["seen_as"].split(":")[0] == SRV1  # the LAN host saw the remote's own address
    table = pcplab.cli("table")
    assert re.search(rf"PCP\s.*{LAN2}:8080\s+{FW_WAN}:40080\s+tcp\s+NAT-PMP", table), table
    rules = pcplab.cli("rules", "list")
    assert f"portfw tcp {FW_WAN}:40080 -> {LAN2}:8080 (NAT-PMP from {LAN2}" in rules, rules


def test_natpmpc_udp_mapping_and_its_deletion(pcplab: PcpLab) -> None:
    lab = pcplab.lab
    out = pcplab.natpmpc("lan3", "-a", "40053", "5353", "udp", "3600")
    assert re.search(r"Mapped public port 40053 protocol UDP to local port 5353", out), out
    server = lab.tool_server("lan3", ["udp-echo", "5353"])
    try:
        rc, rep = lab.tool("srv1", ["udp-client", FW_WAN, "40053", "20"], timeout=20)
    finally:
        stop_process(server)
    assert rc == 0 and rep["ok"], rep
    assert rep["seen_as"] == [f"{SRV1}:{rep['seen_as'][0].split(':')[1]}"]  # the echo saw srv1 itself
    pcplab.natpmpc("lan3", "-a", "40053", "5353", "udp", "0")  # lifetime 0: delete
    rows = json.loads(pcplab.cli("table", "--json"))
    assert not [r for r in rows if r["proto"] == "pcp" and r["lan"] == f"{LAN3}:5353"], rows
    stats = json.loads(pcplab.cli("stats", "--json"))["counters"]
    assert stats["pcp_mappings_created"] >= 2 and stats["pcp_mappings_deleted"] >= 1
    assert stats["pcp_connections"] >= 2


def _announcements(pcplab: PcpLab) -> list[dict[str, Any]]:
    path = pcplab.announcements
    if not path.exists():
        return []
    if pcplab.mode == "tap":
        return [json.loads(line) for line in path.read_text().splitlines()]
    from scapy.all import IP, UDP, rdpcap

    try:
        pkts = rdpcap(str(path))
    except Exception:  # noqa: BLE001 - tcpdump is still writing the first record
        return []
    return [{"from": f"{p[IP].src}:{p[UDP].sport}", "data": bytes(p[UDP].payload).hex(), "to": p[IP].dst,
             "ttl": p[IP].ttl} for p in pkts if UDP in p]


def test_announcements_reach_the_lan_at_start(pcplab: PcpLab) -> None:
    deadline = time.monotonic() + 10
    got: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(got) < 4:
        got = _announcements(pcplab)
        time.sleep(0.2)
    if pcplab.mode == "tun":
        assert all(g["to"] == "224.0.0.1" and g["ttl"] == 1 for g in got), got
    assert len(got) >= 4, got  # two rounds (250 ms apart), a NAT-PMP and a PCP one each
    kinds = set()
    for g in got:
        assert g["from"] == f"{FW_LAN}:5351"
        data = bytes.fromhex(g["data"])
        if data[0] == 0:
            assert data[1] == 128 and data[2:4] == b"\0\0" and data[8:12] == bytes(map(int, FW_WAN.split(".")))
            kinds.add("nat-pmp")
        else:
            assert data[0] == 2 and data[1] == 0x80 and data[3] == 0 and len(data) == 24
            kinds.add("pcp")
    assert kinds == {"nat-pmp", "pcp"}


FAKE_IP = """\
#!/bin/sh
# the SAs a real IPsec stack would list (this lab's kernel has no ESP)
case "$*" in
  *"xfrm state"*) printf 'src {me} dst {peer}\\n\\tproto esp spi 0x{out:08x} reqid 1 mode tunnel\\n'
                 printf 'src {peer} dst {me}\\n\\tproto esp spi 0x{inb:08x} reqid 1 mode tunnel\\n' ;;
  *) exec ip "$@" ;;
esac
"""

ESP_SENDER = r'''
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
s.sendto(struct.pack("!II", int(sys.argv[2], 16), 1) + b"ciphertext" * 4, (sys.argv[1], 0))
'''


def test_an_announced_spi_brings_inbound_esp_to_its_host_at_once(pcplab: PcpLab, tmp_path: Path) -> None:
    lab = pcplab.lab
    fake = tmp_path / "ip"
    fake.write_text(FAKE_IP.format(me=LAN2, peer=SRV1, out=0xC0DE0001, inb=0xBEEF0001))
    fake.chmod(0o755)
    env = {**os.environ, "IP": str(fake), "MASQD_SPI_STATE": str(tmp_path / "state")}
    cp = subprocess.run(["ip", "netns", "exec", lab.ns("lan2"), "sh", str(SCRIPT), SRV1], env=env,
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    rows = json.loads(pcplab.cli("table", "--json"))
    esp = [r for r in rows if r["proto"] == "esp"]
    assert [(r["lan"], r["remote"], r["state"], r["spi_out"], r["spi_in"]) for r in esp] == [
        (LAN2, SRV1, "ESTABLISHED", "0xc0de0001", "0xbeef0001")], rows
    dump = lab.popen("lan2", ["tcpdump", "-n", "-l", "-c", "1", "-i", "eth0", "esp"], stdout=subprocess.PIPE,
                     stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(1.0)
        lab.exec("srv1", [sys.executable, "-c", ESP_SENDER, FW_WAN, "beef0001"])
        out, _ = dump.communicate(timeout=10)
    finally:
        stop_process(dump)
    assert f"{SRV1} > {LAN2}: ESP(spi=0xbeef0001" in out, out
    # a host cannot claim that SPI: refused, counted, nothing changes
    fake.write_text(FAKE_IP.format(me=LAN3, peer=SRV1, out=0xC0DE0003, inb=0xBEEF0001))
    cp = subprocess.run(["ip", "netns", "exec", lab.ns("lan3"), "sh", str(SCRIPT), SRV1], env=env,
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 1 and "NOT_AUTHORIZED" in cp.stderr, cp.stderr
    stats = json.loads(pcplab.cli("stats", "--json"))["counters"]
    assert stats["spi_announced"] == 1 and stats["spi_announce_refused_taken"] == 1
