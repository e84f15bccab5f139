"""Control socket: protocol, every command against a fake engine, refusals counted."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from masqd.ops import control
from masqd.ops.control import ControlError, format_table, request
from masqd.ops.runtime import Ops, entry_matches, parse_filter

from .conftest import make_cfg
from .fake_engine import FakeEngine


def run_with_ops(tmp_path: Path, body: Callable[[Ops, str], Any], engine: FakeEngine | None = None,
                 **kw: Any) -> Any:
    """Start Ops in a loop, run the blocking client ``body`` in a thread, stop Ops."""
    cfg = make_cfg(tmp_path)
    eng = engine or FakeEngine()

    async def main() -> Any:
        ops = Ops(eng, cfg, install_signal_handlers=False, **kw)
        await ops.start()
        try:
            return await asyncio.to_thread(body, ops, cfg.control.socket)
        finally:
            await ops.stop()

    return asyncio.run(main())


def raw(path: str, payload: bytes) -> list[dict[str, Any]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    buf = b""
    while chunk := s.recv(65536):
        buf += chunk
    s.close()
    return [json.loads(x) for x in buf.splitlines()]


def test_socket_mode_and_table(tmp_path: Path) -> None:
    def body(ops: Ops, path: str) -> None:
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
        t = request(path, {"cmd": "table"})
        assert len(t) == 3 and t[0]["lan"] == "10.0.0.2:1025"
        t = request(path, {"cmd": "table", "filter": "proto=udp"})
        assert [e["proto"] for e in t] == ["udp"]
        txt = format_table(request(path, {"cmd": "table"}))
        assert "IP masquerading entries: 3" in txt and "TCP" in txt and "198.51.100.1:23" in txt

    run_with_ops(tmp_path, body)
    assert not (tmp_path / "ctl.sock").exists()  # removed at stop


def test_bad_requests_get_clear_errors_and_are_counted(tmp_path: Path) -> None:
    def body(ops: Ops, path: str) -> dict[str, int]:
        replies = raw(path, b'not json\n[1,2]\n{"x":1}\n{"cmd":"frobnicate"}\n'
                            b'{"cmd":"flush","filter":"colour=red"}\n{"cmd":"ping"}\n')
        assert [r["ok"] for r in replies] == [False, False, False, False, False, True]
        assert "not valid JSON" in replies[0]["error"]
        assert "JSON object" in replies[1]["error"]
        assert "'cmd'" in replies[2]["error"]
        assert "unknown command 'frobnicate'" in replies[3]["error"] and "table" in replies[3]["error"]
        assert "unknown field 'colour'" in replies[4]["error"]
        big = raw(path, b'{"cmd":"ping","pad":"' + b"a" * (control.MAX_LINE + 10) + b'"}\n')
        assert big[0]["ok"] is False and "longer than" in big[0]["error"]
        with pytest.raises(ControlError, match="unknown command"):
            request(path, {"cmd": "nope"})
        return dict(ops.counters.control_errors)

    errs = run_with_ops(tmp_path, body)
    assert errs == {"bad_json": 1, "bad_request": 2, "unknown_command": 2, "bad_argument": 1, "too_long": 1}


def test_flush_with_filter(tmp_path: Path) -> None:
    eng = FakeEngine()

    def body(ops: Ops, path: str) -> None:
        assert request(path, {"cmd": "flush", "filter": "lan=10.0.0.3"}) == {"removed": 1}
        assert request(path, {"cmd": "flush", "filter": "tcp"}) == {"removed": 1}
        assert [e["proto"] for e in request(path, {"cmd": "table"})] == ["esp"]
        with pytest.raises(ControlError, match="proto and lan only"):
            request(path, {"cmd": "flush", "filter": "remote=198.51.100.1"})
        with pytest.raises(ControlError, match="unknown protocol"):
            request(path, {"cmd": "flush", "filter": "proto=bogus"})
        assert request(path, {"cmd": "flush"}) == {"removed": 1}

    run_with_ops(tmp_path, body, eng)
    assert eng.entries == []


def test_wan_address_set(tmp_path: Path) -> None:
    eng = FakeEngine()

    def body(ops: Ops, path: str) -> None:
        assert request(path, {"cmd": "wan-address", "action": "set", "address": "203.0.113.201"}) == {
            "address": "203.0.113.201/24"}
        for bad in ("203.0.113.300", "10.1.2.3/24", "224.0.0.1", "", "0.0.0.0"):
            with pytest.raises(ControlError, match="wan-address"):
                request(path, {"cmd": "wan-address", "action": "set", "address": bad})
        stats = request(path, {"cmd": "stats"})
        assert stats["wan_address"] == "203.0.113.201"
        assert stats["counters"]["drop_bad_checksum"] == 2 and stats["entries"] == 3

    run_with_ops(tmp_path, body, eng, now=lambda: 42.0)
    assert eng.wan_set == [(ipaddress.IPv4Interface("203.0.113.201/24"), 42.0)]


def test_capture_start_stop_via_socket(tmp_path: Path) -> None:
    pcap = tmp_path / "lan.pcap"

    def body(ops: Ops, path: str) -> None:
        r = request(path, {"cmd": "capture", "action": "start", "iface": "lan", "path": str(pcap)})
        assert r["linktype"] == 101
        ops.capture.record("lan", b"\x45" + b"\x00" * 19)
        assert request(path, {"cmd": "capture", "action": "status"})["lan"]["packets"] == 1
        assert request(path, {"cmd": "capture", "action": "stop"}) == {"lan": 1}
        with pytest.raises(ControlError, match="iface"):
            request(path, {"cmd": "capture", "action": "start", "iface": "dmz", "path": "x"})
        with pytest.raises(ControlError, match="cannot write"):
            request(path, {"cmd": "capture", "action": "start", "iface": "wan",
                           "path": str(tmp_path / "no" / "such" / "dir.pcap")})

    run_with_ops(tmp_path, body)
    assert pcap.stat().st_size == 24 + 16 + 20


def test_second_daemon_refused_while_socket_alive(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)

    async def main() -> None:
        a = Ops(FakeEngine(), cfg, install_signal_handlers=False)
        await a.start()
        b = Ops(FakeEngine(), cfg, install_signal_handlers=False, metrics_listen="127.0.0.1:0")
        with pytest.raises(OSError, match="in use"):
            await b.start()
        await b.stop()
        await a.stop()
        # a stale socket file (daemon gone) is replaced
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(cfg.control.socket)
        s.close()
        c = Ops(FakeEngine(), cfg, install_signal_handlers=False)
        await c.start()
        await c.stop()

    asyncio.run(main())


def test_filter_parsing() -> None:
    f = parse_filter("proto=TCP remote=198.51.100.1")
    assert f == {"proto": "tcp", "remote": "198.51.100.1"}
    e = {"proto": "tcp", "remote": "198.51.100.1:23", "lan": "10.0.0.2:1025"}
    assert entry_matches(e, f)
    assert not entry_matches(e, {"lan": "10.0.0.3"})
    assert entry_matches(e, {"lan": "10.0.0.2:1025"})


def test_rules_list_from_the_real_engine(tmp_path: Path) -> None:
    from masqd import config
    from masqd.engine import Engine

    text = (f'[lan]\naddress = "10.0.0.1/8"\n[wan]\naddress = "203.0.113.200/24"\n'
            f'[control]\nsocket = "{tmp_path / "ctl.sock"}"\n[metrics]\nlisten = "127.0.0.1:0"\n'
            '[firewall]\nrules = """\nipchains -A input -p tcp -d 0.0.0.0/0 23 -j DENY -l\n"""\n')
    cfg = config.loads(text)
    eng = Engine(cfg)

    async def main() -> list[dict[str, Any]]:
        ops = Ops(eng, cfg, install_signal_handlers=False)
        await ops.start()
        try:
            return await asyncio.to_thread(request, cfg.control.socket, {"cmd": "rules"})
        finally:
            await ops.stop()

    rows = asyncio.run(main())
    chains = {(r["chain"], r["num"]) for r in rows}
    assert {("input", 0), ("forward", 0), ("output", 0), ("input", 1)} <= chains
    rule = next(r for r in rows if r["chain"] == "input" and r["num"] == 1)
    assert "DENY" in rule["rule"] and rule["pkts"] == 0
    assert next(r for r in rows if r["chain"] == "forward" and r["num"] == 0)["rule"] == "policy MASQ"


def test_capture_configured_at_boot(tmp_path: Path) -> None:
    from .conftest import make_cfg as mk

    cfg = mk(tmp_path, capture={"lan": str(tmp_path / "boot-lan.pcap")},
             lan={"address": "10.0.0.1/8", "mode": "tap"})

    async def main() -> dict[str, Any]:
        ops = Ops(FakeEngine(), cfg, install_signal_handlers=False)
        await ops.start()
        ops.capture.record("lan", b"\x02" * 14 + b"\x45" + b"\x00" * 19)
        st = ops.capture.status()
        await ops.stop()
        return st

    st = asyncio.run(main())
    assert st == {"lan": {"path": str(tmp_path / "boot-lan.pcap"), "packets": 1, "linktype": 1}}
    assert (tmp_path / "boot-lan.pcap").stat().st_size == 24 + 16 + 34


# ------------------------------------------------------------------------------------------ abuse


def _ops_with_ticker(tmp_path: Path, body: Callable[[Ops, str], Any], eng: Any = None,
                     **server: Any) -> tuple[Any, int, float]:
    """Run ``body`` (blocking, in a thread) against a started Ops whose control server has the
    attributes ``server``; a timer in the loop ticks every 10 ms meanwhile. Returns (body's result,
    ticks, seconds)."""
    cfg = make_cfg(tmp_path)

    async def main() -> tuple[Any, int, float]:
        ops = Ops(eng or FakeEngine(), cfg, install_signal_handlers=False)
        await ops.start()
        assert ops.control is not None
        for k, v in server.items():
            setattr(ops.control, k, v)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            res = await asyncio.to_thread(body, ops, cfg.control.socket)
        finally:
            t.cancel()
            await ops.stop()
        return res, ticks, loop.time() - t0

    return asyncio.run(main())


def test_malformed_requests_of_every_kind_are_answered_and_counted(tmp_path: Path) -> None:
    def body(ops: Ops, path: str) -> dict[str, int]:
        lines = [b"\xff\xfe\x00garbage", b"[" * 60000, b'{"cmd": 5}', b'{"cmd": "table", "filter": 7}',
                 b'"just a string"', b"\x00" * 100, b'{"cmd": "ping"}']
        replies = raw(path, b"\n".join(lines) + b"\n")
        assert [r["ok"] for r in replies] == [False] * 6 + [True]
        assert "nested too deeply" in replies[1]["error"]
        # 4 MiB without a newline: refused, the connection closed, the server's buffer bounded
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(path)
        try:
            for _ in range(64):
                s.sendall(b"x" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the server after its refusal
        got = s.recv(65536)
        s.close()
        assert b"longer than" in got
        assert request(path, {"cmd": "ping"})["pid"] > 0
        return dict(ops.counters.control_errors)

    errs, ticks, secs = _ops_with_ticker(tmp_path, body)
    assert errs == {"bad_json": 3, "bad_request": 2, "bad_argument": 1, "too_long": 1}


def test_many_clients_at_once_beyond_the_cap_are_refused_and_the_rest_served(tmp_path: Path) -> None:
    def body(ops: Ops, path: str) -> tuple[int, int, int]:
        idle = []
        for _ in range(40):  # clients that connect and say nothing
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(path)
            idle.append(s)
        refused = 0
        for s in idle:  # the refused ones got a line and were closed; the others are waiting
            s.setblocking(False)
        import time as _t
        _t.sleep(0.3)
        for s in idle:
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            if b"too many clients" in data or b"more than" in data:
                refused += 1
        served_while_full = 0
        try:
            request(path, {"cmd": "ping"}, timeout=2)
        except ControlError as exc:
            assert "more than" in str(exc)
        else:
            served_while_full = 1
        for s in idle:
            s.close()
        _t.sleep(0.3)
        ok = 1 if request(path, {"cmd": "ping"})["pid"] else 0
        return refused, served_while_full, ok

    (refused, served_while_full, ok), ticks, secs = _ops_with_ticker(tmp_path, body, max_clients=8)
    assert refused == 40 - 8 and served_while_full == 0 and ok == 1
    assert ticks >= secs * 100 * 0.5  # the loop kept turning


def test_a_refusal_written_before_the_request_went_out_is_what_the_client_reports(tmp_path: Path) -> None:
    """The daemon at its client cap writes its refusal and closes at once; a client still sending
    gets a broken pipe, and must report the refusal (CI once saw "Broken pipe" instead). The
    request is larger than the socket's buffer, so its sending is always cut short."""
    import threading

    path = str(tmp_path / "refusing.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def refuse() -> None:
        c, _ = srv.accept()
        c.sendall(b'{"ok": false, "error": "more than 8 clients at once; try again"}\n')
        c.close()

    t = threading.Thread(target=refuse)
    t.start()
    try:
        with pytest.raises(ControlError, match="more than 8 clients at once"):
            request(path, {"cmd": "ping", "pad": "x" * 4_000_000}, timeout=5)
    finally:
        t.join(5)
        srv.close()


def test_a_client_that_never_reads_is_dropped_and_cannot_grow_memory(tmp_path: Path) -> None:
    eng = FakeEngine()
    eng.entries = [dict(eng.entries[0], lan=f"10.0.{i >> 8}.{i & 255}:1025") for i in range(20000)]  # ~3 MB

    def body(ops: Ops, path: str) -> tuple[int, int]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(path)
        s.settimeout(0.2)
        sent = 0
        try:
            for _ in range(200):  # pipelined requests for big replies, never a read
                s.sendall(b'{"cmd": "table"}\n')
                sent += 1
        except (TimeoutError, OSError):
            pass
        import time as _t
        peak = 0
        t_end = _t.monotonic() + 2.0
        while _t.monotonic() < t_end:  # meanwhile others are served
            assert request(path, {"cmd": "ping"}, timeout=2)["pid"] > 0
            peak = max(peak, ops.counters.control_errors.get("slow_client", 0))
            _t.sleep(0.05)
        s.close()
        assert ops.control is not None
        return sent, ops.counters.control_errors.get("slow_client", 0), ops.control.peak_buffered

    (sent, slow, peak), ticks, secs = _ops_with_ticker(tmp_path, body, eng, write_timeout=0.5)
    reply = len(control._dump({"ok": True, "result": eng.table()}))
    assert sent > 10 and slow == 1  # dropped after its write timeout, once
    assert peak <= 2 * reply  # not sent * reply: one reply waits at a time, and only that long
    assert ticks >= secs * 100 * 0.5  # the loop never waited on it


def test_stats_show_the_host_limits_and_top_offenders(tmp_path: Path) -> None:
    from scapy.all import IP, UDP

    from masqd.engine import Engine

    cfg = make_cfg(tmp_path, limits={"host_max_ports": 1})
    eng = Engine(cfg)
    for port in (1000, 1001, 1002):
        eng.process("lan", bytes(IP(src="10.0.0.7", dst="198.51.100.1") / UDP(sport=port, dport=53)), 1.0)

    def body(ops: Ops, path: str) -> Any:
        return request(path, {"cmd": "stats"})

    st = run_with_ops(tmp_path, body, engine=eng, now=lambda: 2.0)  # type: ignore[arg-type]
    hl = st["host_limits"]
    assert hl["limits"]["host_max_ports"] == 1 and hl["hosts"] == 1
    assert hl["top_offenders"][0]["host"] == "10.0.0.7" and hl["top_offenders"][0]["drops"] == 2
    assert st["counters"]["drop_host_ports_limit"] == 2
