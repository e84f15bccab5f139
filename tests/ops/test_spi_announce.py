"""deploy/masqd-spi-announce, the client side of SPI announcements, run for real under dash.

It runs in a network namespace of its own (loopback only) against a stand-in
server that reads each request by the layout of docs/pcp.md and answers with
the result code the test chose; ``ip`` is a stand-in too (canned
``ip -s xfrm state`` listings: this machine's kernel has no ESP). Checked: the
request's bytes, the pairing (newest outbound with newest inbound, announced
last), UDP-encapsulated SAs skipped, what was announced not announced twice,
withdrawal, each of the four ways of sending (python3, perl, bash's /dev/udp, nc),
a refusal (exit 1) and no answer (exit 2), and the updown hook mode: up
announces and starts the follower, down stops it and withdraws. The end to end
with masqd is in tests/integration/test_pcp_lab.py and tests/interop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "masqd-spi-announce"
ME, PEER = "10.0.0.2", "198.51.100.1"

XFRM = {  # (src, dst) -> its SAs as `ip -s xfrm state` lists them
    (ME, PEER): f"""\
src {ME} dst {PEER}
\tproto esp spi 0xc0000002(3221225474) reqid 1(0x00000001) mode tunnel
\treplay-window 0 seq 0x00000000 flag  (0x00000000)
\tlifetime current:
\t  0(bytes), 0(packets)
\t  add 2024-05-06 07:10:00 use -
src {ME} dst {PEER}
\tproto esp spi 0xc0000001(3221225473) reqid 1(0x00000001) mode tunnel
\tlifetime current:
\t  add 2024-05-06 07:00:00 use -
src {ME} dst {PEER}
\tproto esp spi 0xc00000ee(3221225710) reqid 9(0x00000009) mode tunnel
\tencap type espinudp sport 4500 dport 4500 addr 0.0.0.0
\tlifetime current:
\t  add 2024-05-06 07:20:00 use -
""",
    (PEER, ME): f"""\
src {PEER} dst {ME}
\tproto esp spi 0x00000a01(2561) reqid 1(0x00000001) mode tunnel
\tlifetime current:
\t  add 2024-05-06 07:00:00 use -
src {PEER} dst {ME}
\tproto esp spi 0x00000a02(2562) reqid 1(0x00000001) mode tunnel
\tlifetime current:
\t  add 2024-05-06 07:10:01 use -
""",
}

SERVER = r'''
import json, socket, struct, sys
results = [int(x) for x in sys.argv[2].split(",")]
log = open(sys.argv[1], "a")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 5351))
print("ready", flush=True)
i = 0
while True:
    data, peer = s.recvfrom(2048)
    v, op, _r, life = struct.unpack_from("!BBHI", data, 0)
    rec = {"len": len(data), "version": v, "opcode": op, "lifetime": life, "client": data[8:24].hex(),
           "nonce": data[24:36].hex(), "proto": data[36], "rsv": data[37:40].hex(),
           "spi_out": data[40:44].hex(), "spi_in": data[44:48].hex(), "peer": data[48:64].hex()}
    log.write(json.dumps(rec) + "\n"); log.flush()
    res = results[min(i, len(results) - 1)]
    i += 1
    if res < 0:
        continue  # no answer
    out = bytearray(data)
    out[1] |= 0x80
    out[2] = 0
    out[3] = res
    out[12:24] = bytes(12)
    s.sendto(bytes(out), peer)
'''


@dataclass
class Env:
    ns: str
    dir: Path
    log: Path

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        e = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "IP": str(self.dir / "ip"),
             "MASQD_SPI_STATE": str(self.dir / "state"), **(env or {})}
        return subprocess.run(["ip", "netns", "exec", self.ns, "dash", str(SCRIPT), *args], env=e,
                              capture_output=True, text=True, timeout=timeout)

    def requests(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def env(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.fail("needs root (a network namespace of its own)")
    ns = f"t{os.getpid()}s-spi"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    procs: list[subprocess.Popen[str]] = []
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        fake_ip = tmp_path / "ip"
        canned = tmp_path / "xfrm"
        canned.mkdir()
        for (src, dst), text in XFRM.items():
            (canned / f"{src}-{dst}").write_text(text)
        fake_ip.write_text(textwrap.dedent(f"""\
            #!/bin/sh
            # a stand-in for iproute2: canned SA listings; "xfrm monitor" waits (a follower's input)
            case "$*" in
              *"xfrm state"*) cat "{canned}"/* ;;
              *"xfrm monitor"*) echo $$ > "{tmp_path}/monitor.pid"; exec sleep 60 ;;
              *) exit 1 ;;
            esac
            """))
        fake_ip.chmod(0o755)
        e = Env(ns, tmp_path, tmp_path / "requests.jsonl")

        def serve(results: str) -> None:
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, str(e.log), results],
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"

        e.serve = serve  # type: ignore[attr-defined]
        yield e
    finally:
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:  # a follower left behind by a failed test
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def mapped(a: str) -> str:
    return "00000000000000000000ffff" + "".join(f"{int(x):02x}" for x in a.split("."))


@pytest.mark.parametrize("sender", ["python3", "perl", "bash", "nc"])
def test_announces_each_pair_oldest_first_with_the_documented_layout(env: Env, sender: str) -> None:
    env.serve("0")  # type: ignore[attr-defined]
    cp = env.run("-s", "127.0.0.1", "-l", ME, PEER, env={"MASQD_SPI_SENDER": sender})
    assert cp.returncode == 0, cp.stderr
    reqs = env.requests()
    assert [(r["spi_out"], r["spi_in"]) for r in reqs] == [("c0000001", "00000a01"), ("c0000002", "00000a02")]
    for r in reqs:
        assert (r["len"], r["version"], r["opcode"], r["lifetime"], r["proto"], r["rsv"]) == (64, 2, 96, 3600, 50,
                                                                                            "000000")
        assert r["client"] == mapped(ME) and r["peer"] == mapped(PEER)
    assert reqs[0]["nonce"] != reqs[1]["nonce"]
    # what was announced is not announced again
    assert env.run("-s", "127.0.0.1", "-l", ME, PEER, env={"MASQD_SPI_SENDER": sender}).returncode == 0
    assert len(env.requests()) == 2


def test_withdraw_refusal_and_no_answer(env: Env) -> None:
    env.serve("0,0,0,0,2,2,-1")  # type: ignore[attr-defined]
    assert env.run("-s", "127.0.0.1", "-l", ME, PEER).returncode == 0
    cp = env.run("-s", "127.0.0.1", "-l", ME, "-w", PEER)
    assert cp.returncode == 0, cp.stderr
    assert [r["lifetime"] for r in env.requests()] == [3600, 3600, 0, 0]
    cp = env.run("-s", "127.0.0.1", "-l", ME, PEER)
    assert cp.returncode == 1 and "NOT_AUTHORIZED" in cp.stderr
    t0 = time.monotonic()
    cp = env.run("-s", "127.0.0.1", "-l", ME, PEER)
    assert cp.returncode == 2 and "no answer" in cp.stderr
    assert time.monotonic() - t0 < 15  # 3 tries (0.5, 1, 2 s) per pair


def test_bad_arguments(env: Env) -> None:
    assert env.run().returncode == 64
    cp = env.run("-s", "127.0.0.1", "-l", ME, "not-an-address")
    assert cp.returncode == 64 and "IPv4" in cp.stderr


def test_as_an_updown_hook_up_announces_and_follows_down_stops_and_withdraws(env: Env) -> None:
    env.serve("0")  # type: ignore[attr-defined]
    hook = {"PLUTO_VERB": "up-client", "PLUTO_ME": ME, "PLUTO_PEER": PEER, "MASQD_PCP_SERVER": "127.0.0.1"}
    cp = env.run(env=hook)
    assert cp.returncode == 0, cp.stderr
    assert len(env.requests()) == 2
    pidfile = env.dir / "state" / f"{ME}-{PEER}.pid"
    deadline = time.monotonic() + 10
    while not (env.dir / "monitor.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    follower = int(pidfile.read_text())
    monitor = int((env.dir / "monitor.pid").read_text())
    assert Path(f"/proc/{follower}").exists() and Path(f"/proc/{monitor}").exists()
    cp = env.run(env={**hook, "PLUTO_VERB": "down-client"})
    assert cp.returncode == 0, cp.stderr
    deadline = time.monotonic() + 5
    while Path(f"/proc/{monitor}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{monitor}").exists() and not pidfile.exists()
    assert [r["lifetime"] for r in env.requests()][2:] == [0, 0]
    # verbs it has nothing to do with, and NAT-T tunnels, are left alone (and never fail the hook)
    assert env.run(env={**hook, "PLUTO_VERB": "prepare-client"}).returncode == 0
    assert env.run(env={**hook, "PLUTO_UDP_ENC": "4500"}).returncode == 0
    assert env.run(env={**hook, "MASQD_PCP_SERVER": "127.0.0.9"}).returncode == 0  # nobody answers
    assert len(env.requests()) == 4
