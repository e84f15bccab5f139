"""Reload: a valid file is swapped in, a bad one is refused with the running config kept."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
from pathlib import Path
from typing import Any

from masqd.ops.logging import configure
from masqd.ops.metrics import OpsCounters
from masqd.ops.reload import Reloader
from masqd.ops.runtime import Ops

from .conftest import make_cfg
from .fake_engine import FakeEngine

BASE = """
[lan]
address = "10.0.0.1/8"
[wan]
address = "203.0.113.200/24"
gateway = "203.0.113.1"
[control]
socket = "{sock}"
[metrics]
listen = "127.0.0.1:0"
[masquerade.timeouts]
udp = {udp}
"""


def write(p: Path, udp: str, sock: Path) -> None:
    p.write_text(BASE.format(udp=udp, sock=sock))


def test_valid_reload_applies_and_invalid_keeps_running(tmp_path: Path) -> None:
    buf = io.StringIO()
    configure("info", "json", buf)
    from masqd.ops.logging import get_logger

    conf = tmp_path / "masqd.toml"
    write(conf, "300.0", tmp_path / "s")
    eng = FakeEngine()
    ops = OpsCounters()
    from masqd import config

    first = config.load(conf)
    r = Reloader(conf, first, eng.reload, ops, get_logger("t"))
    write(conf, "120.0", tmp_path / "s")
    res = r.reload()
    assert res.ok and ops.reloads_ok == 1
    assert eng.reloaded[-1].masquerade.effective_timeouts.udp == 120.0
    good = r.current
    # invalid: negative timer and a TOML error in two attempts
    write(conf, "-5", tmp_path / "s")
    res = r.reload()
    assert not res.ok and any("udp" in e for e in res.errors)
    conf.write_text("[lan\naddress=")
    res = r.reload()
    assert not res.ok and any("TOML" in e for e in res.errors)
    assert r.current is good and len(eng.reloaded) == 1
    assert ops.reloads_failed == 2 and ops.last_reload_ok is False
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    errs = [x for x in lines if x["event"] == "config_reload_error"]
    assert errs and all(x["level"] == "error" and x["source"] == str(conf) for x in errs)


def test_device_changes_need_restart(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    new = make_cfg(tmp_path, lan={"address": "10.0.0.1/8", "name": "other0"})
    eng = FakeEngine()
    r = Reloader(None, cfg, eng.reload, OpsCounters(), _Null(), loader=lambda p: new)
    res = r.reload("x")
    assert not res.ok and "lan.name" in res.errors[0] and "restart" in res.errors[0]
    assert eng.reloaded == []


def test_engine_exception_is_a_refusal(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)

    def boom(c: Any) -> None:
        raise ValueError("no")

    r = Reloader(None, cfg, boom, OpsCounters(), _Null(), loader=lambda p: cfg)
    res = r.reload("x")
    assert not res.ok and "engine refused" in res.errors[0]


def test_sighup_reloads_in_the_loop(tmp_path: Path) -> None:
    configure("info", "json", io.StringIO())
    conf = tmp_path / "masqd.toml"
    write(conf, "300.0", tmp_path / "ctl.sock")
    from masqd import config

    cfg = config.load(conf)
    eng = FakeEngine()

    async def main() -> Ops:
        ops = Ops(eng, cfg, config_path=conf)
        await ops.start()
        write(conf, "200.0", tmp_path / "ctl.sock")
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if eng.reloaded:
                break
        await ops.stop()
        return ops

    ops = asyncio.run(main())
    assert eng.reloaded and eng.reloaded[0].masquerade.effective_timeouts.udp == 200.0
    assert ops.counters.reloads_ok == 1 and ops.cfg is eng.reloaded[0]


class _Null:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None
