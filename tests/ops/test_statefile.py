"""The state file: written atomically, read back whole, refused with one reason otherwise; and
``masqd run``'s restore (masqd.daemon.restore_state): timers shortened by the downtime, WAN
address changes handled by the dynamic-address mode, an empty table (a fresh engine) and one log
line for a refused file."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import struct
import zlib
from pathlib import Path

import pytest
from scapy.all import IP, UDP

from masqd.config import Config
from masqd.daemon import restore_state
from masqd.engine import Engine
from masqd.engine import state as st
from masqd.ops import statefile
from tests.engine.conftest import H2, SRV, make_cfg, tcp, udp


def cfg_for(path: Path, extra: str = "") -> Config:
    return make_cfg(f'[state]\nfile = "{path}"\n' + extra)


def engine_with_flows(cfg: Config, now: float) -> tuple[Engine, int]:
    eng = Engine(cfg)
    o = eng.process("lan", udp(H2, SRV, 5000, 53), now)
    eng.process("lan", tcp(H2, SRV, 40000, 443, "S"), now)
    return eng, IP(o[0][1])[UDP].sport


def save(eng: Engine, path: Path, now: float, saved_at: float) -> None:
    statefile.write(path, statefile.encode(st.document(eng, now), saved_at=saved_at))


def test_round_trip_and_atomic_write(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "state"
    doc = {"format": 1, "records": [{"k": "x"}]}
    statefile.write(p, statefile.encode(doc, saved_at=12.5))
    assert statefile.read(p, 1 << 20) == {**doc, "saved_at": 12.5}
    assert (p.stat().st_mode & 0o777) == 0o600
    statefile.write(p, statefile.encode({"format": 1, "records": []}, saved_at=13.0))
    assert statefile.read(p, 1 << 20)["records"] == []
    assert sorted(os.listdir(p.parent)) == ["state"]  # no temporary file left behind
    assert statefile.read(tmp_path / "missing", 1 << 20) is None


def _frame(payload: bytes, version: int = 1, length: int | None = None, digest: bytes | None = None) -> bytes:
    return struct.pack("!8sHHQ32s", statefile.MAGIC, version, 0, len(payload) if length is None else length,
                       digest or hashlib.sha256(payload).digest()) + payload


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "foreign"),
    (b"hello world, this is not a state file at all, no no no no", "foreign"),
    (b"MASQDST\n\x00\x01", "truncated"),
    (_frame(zlib.compress(b'{"saved_at": 1}'), version=2), "version"),
    (_frame(zlib.compress(b'{"saved_at": 1}'))[:-3], "truncated"),
    (_frame(zlib.compress(b'{"saved_at": 1}')) + b"xx", "corrupt"),
    (_frame(zlib.compress(b'{"saved_at": 1}'), digest=b"\0" * 32), "corrupt"),
    (_frame(b"not zlib at all"), "corrupt"),
    (_frame(zlib.compress(b"{not json")), "corrupt"),
    (_frame(zlib.compress(b'{"records": []}')), "corrupt"),
    (_frame(zlib.compress(b" " * 5000 + b'{"saved_at": 1}')), "oversized"),
])
def test_refused_files_name_their_reason(data: bytes, reason: str) -> None:
    with pytest.raises(statefile.StateFileError) as exc:
        statefile.decode(data, 4096)
    assert exc.value.reason == reason


def test_a_file_larger_than_the_limit_is_refused_before_reading(tmp_path: Path) -> None:
    p = tmp_path / "state"
    p.write_bytes(b"\0" * 10_000)
    with pytest.raises(statefile.StateFileError) as exc:
        statefile.read(p, 1000)
    assert exc.value.reason == "oversized"
    assert statefile.size_limit(1_048_576) < 2 << 30  # bounded by the table's limits


def test_restore_keeps_ports_and_shortens_timers(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path / "state")
    eng, uport = engine_with_flows(cfg, 100.0)
    eng.count("made_up_counter", 7)
    save(eng, tmp_path / "state", 100.0, saved_at=1_000_000.0)
    new = restore_state(cfg, now=5.0, wall=1_000_030.0)  # down 30 s, another monotonic clock
    rows = {r["proto"]: r for r in new.table(5.0)}
    assert rows["udp"]["wan"].endswith(f":{uport}") and rows["udp"]["expires_in"] == 270.0
    assert rows["tcp"]["state"] == "SYN_SENT"
    assert new.counters["state_restored_entries"] == 2 and new.counters["made_up_counter"] == 7
    again = new.process("lan", udp(H2, SRV, 5000, 53), 6.0)
    assert IP(again[0][1])[UDP].sport == uport


@pytest.mark.parametrize("garbage", [b"MASQDST\n garbage", b"\x00" * 64, b"truncated"])
def test_a_refused_file_leaves_an_empty_table_one_log_line_and_a_counter(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, garbage: bytes) -> None:
    p = tmp_path / "state"
    p.write_bytes(garbage)
    with caplog.at_level(logging.INFO, logger="masqd.state"):
        eng = restore_state(cfg_for(p), now=0.0, wall=0.0)
    assert len(eng.nat) == 0 and eng.counters["state_file_refused"] == 1
    assert sum(v for k, v in eng.counters.items() if k.startswith("state_file_refused_")) == 1
    lines = [r for r in caplog.records if r.name == "masqd.state"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and "refused" in lines[0].getMessage()
    assert "empty table" in lines[0].getMessage() and (tmp_path / "state.refused").exists()


def test_a_document_with_one_bad_record_is_refused_whole(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path / "state")
    eng, _ = engine_with_flows(cfg, 0.0)
    doc = st.document(eng, 0.0)
    doc["records"].append({**doc["records"][0], "lp": -1})
    statefile.write(tmp_path / "state", statefile.encode(doc, saved_at=0.0))
    new = restore_state(cfg, now=0.0, wall=0.0)
    assert len(new.nat) == 0 and not new.nat.maps and new.counters["state_file_refused_bad_record"] == 1


def test_foreign_format_in_the_document_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "state"
    statefile.write(p, statefile.encode({"format": 99, "records": []}, saved_at=0.0))
    new = restore_state(cfg_for(p), now=0.0, wall=0.0)
    assert new.counters["state_file_refused_bad_record"] == 1


def test_state_off_reads_nothing(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path / "state")
    eng, _ = engine_with_flows(cfg, 0.0)
    save(eng, tmp_path / "state", 0.0, saved_at=0.0)
    off = cfg_for(tmp_path / "state", "enabled = false\n")
    assert len(restore_state(off, now=0.0, wall=0.0).nat) == 0
    assert len(restore_state(cfg, now=0.0, wall=0.0).nat) == 2


@pytest.mark.parametrize(("mode", "kept"), [("rewrite-all", 2), ("rewrite", 1), ("flush", 0)])
def test_a_new_wan_address_at_start_is_handled_as_the_dynamic_address_mode_says(
        tmp_path: Path, mode: str, kept: int) -> None:
    p = tmp_path / "state"
    old = cfg_for(p)
    eng, _ = engine_with_flows(old, 0.0)
    eng.process("wan", udp(SRV, "203.0.113.200", 53, IP(eng.process("lan", udp(H2, SRV, 5000, 53), 0.0)[0][1])
                           [UDP].sport), 0.0)  # the UDP session is replied
    save(eng, p, 0.0, saved_at=0.0)
    new_cfg = Config.model_validate({**old.model_dump(), "source": "x",
                                     "wan": {**old.wan.model_dump(), "address": "203.0.113.77/24",
                                             "dynaddr_mode": mode}})
    new = restore_state(new_cfg, now=0.0, wall=0.0)
    assert len(new.nat) == kept
    assert all(r["wan"].startswith("203.0.113.77:") for r in new.table(0.0))


def test_control_sourced_wan_address_is_restored(tmp_path: Path) -> None:
    p = tmp_path / "state"
    cfg = cfg_for(p, "")
    eng, _ = engine_with_flows(cfg, 0.0)
    eng.set_wan_address(ipaddress.IPv4Interface("203.0.113.50/24"), 0.0)
    save(eng, p, 0.0, saved_at=0.0)
    ctl = Config.model_validate({**cfg.model_dump(), "wan": {**cfg.wan.model_dump(), "address_source": "control"}})
    new = restore_state(ctl, now=0.0, wall=0.0)
    assert str(new.wan_if) == "203.0.113.50/24" and len(new.nat) == 2
    assert json.dumps(new.table(0.0))
