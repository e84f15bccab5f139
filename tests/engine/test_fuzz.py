"""Untrusted input: 100,000 random and mutated packets through process() raise nothing; and
bench/fuzz.py's short mode (conversations, mutants, admin steps, the flow cache against Python)
finds nothing."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.all import ICMP, IP, TCP, UDP, raw

from masqd.engine import Engine
from tests.engine.conftest import make_cfg

SEEDS = [
    raw(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=4000, dport=53) / b"hello"),
    raw(IP(src="10.0.0.2", dst="198.51.100.1") / TCP(sport=4000, dport=80, flags="S", options=[("MSS", 1460)])),
    raw(IP(src="10.0.0.2", dst="198.51.100.1") / ICMP(type=8) / b"ping"),
    raw(IP(src="198.51.100.1", dst="203.0.113.200") / ICMP(type=3, code=3) /
        raw(IP(src="203.0.113.200", dst="198.51.100.1") / UDP(sport=4000, dport=53))[:28]),
    raw(IP(src="10.0.0.2", dst="198.51.100.1", flags="MF", options=[b"\x94\x04\x00\x00"]) / UDP() / (b"z" * 64)),
    raw(IP(src="10.0.0.2", dst="198.51.100.1", proto=47) / b"\x30\x01\x88\x0b\x00\x04\x00\x05abcd"),
    raw(IP(src="198.51.100.1", dst="203.0.113.200", proto=50) / b"\x00\x00\x10\x00\x00\x00\x00\x01xxxxxxxx"),
    raw(IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=500, dport=500) / (b"\x11" * 8 + b"\0" * 8 + b"\x01\x10\x02\0" + b"\0" * 8)),
    raw(IP(src="10.0.0.2", dst="198.51.100.1") / TCP(sport=4000, dport=1723, flags="PA") /
        (b"\x00\x9c\x00\x01\x1a\x2b\x3c\x4d\x00\x07\x00\x00" + b"\0" * 144)),
]


def _mutate(rng: random.Random, p: bytes) -> bytes:
    b = bytearray(p)
    op = rng.randrange(6)
    if op == 0 and b:
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 1:
        b = b[: rng.randrange(len(b) + 1)]
    elif op == 2:
        b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    elif op == 3 and len(b) > 4:
        b[2:4] = rng.randrange(65536).to_bytes(2, "big")
    elif op == 4:
        b[0] = 0x40 | rng.randrange(16)
    else:
        b = bytearray(rng.randbytes(rng.randrange(0, 80)))
    return bytes(b)


@pytest.mark.conformance("untrusted input")
def test_100k_random_and_mutated_packets_raise_nothing() -> None:
    rng = random.Random(20261127)
    eng = Engine(make_cfg('[masquerade]\ninbound_filtering = "endpoint-independent"\n'))
    now = 0.0
    for i in range(100_000):
        p = _mutate(rng, rng.choice(SEEDS))
        iface = "lan" if rng.random() < 0.5 else "wan"
        out = eng.process(iface, p, now)
        assert isinstance(out, list)
        if i % 1000 == 0:
            now += 7.0
            eng.expire(now)
    c = eng.counters
    assert c.get("drop_internal_error", 0) == 0, [e for e in eng.drain_events() if e[1] == "internal_error"][:3]
    assert sum(v for k, v in c.items() if k.startswith("drop_")) > 10_000
    eng.expire(now + 10**6)
    assert eng.counters["sessions"] == 0
    assert eng.counters["frag_queue"] == 0


def test_the_fuzz_tool_in_its_short_mode_finds_nothing(tmp_path: Path) -> None:
    """``bench/fuzz.py --quick``: 50,000 packets over two workers and 8,000 through the native and
    Python data planes side by side (the tool itself is the check; this runs it as the README says)."""
    out = tmp_path / "fuzz.json"
    root = Path(__file__).resolve().parents[2]
    cp = subprocess.run([sys.executable, str(root / "bench" / "fuzz.py"), "--quick", "--workers", "2",
                         "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=root)
    assert cp.returncode == 0, cp.stdout[-4000:] + cp.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["packets"] >= 50_000 and res["exceptions"] == 0 and res["findings"] == 0
    for run in res["runs"]:
        assert run["mutants"] > 8_000 and run["valid"] > 8_000
        assert run["table_empty"] and run["before_expiry"]["sessions"] > 100, run["after_expiry"]
        assert run["rss_after"] - run["rss_before"] < 40 * 2**20, run["rss_curve"]
    assert len(res["diff"]) == 4 and res["diff_mismatches"] == 0
    for d in res["diff"]:
        assert d["ok"] and d["packets"] >= 2000 and d["native_packets"] > 100, d
