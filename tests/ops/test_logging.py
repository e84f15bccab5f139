"""structlog set-up, the per-event rate limiter, and draining engine events."""

from __future__ import annotations

import io
import json

from masqd.ops.logging import EngineEventLogger, RateLimiter, configure, get_logger
from masqd.ops.metrics import OpsCounters

from .fake_engine import FakeEngine


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_json_when_not_a_terminal_and_levels_filtered() -> None:
    buf = io.StringIO()
    assert configure("info", "auto", buf) == "json"
    log = get_logger("t")
    log.debug("entry_created", proto="tcp")
    log.info("esp_learned", remote="198.51.100.1")
    log.warning("ah_refused", why="AH covers the IP addresses")
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["event"] for x in lines] == ["esp_learned", "ah_refused"]
    assert lines[1]["level"] == "warning" and "timestamp" in lines[1]


def test_console_renderer_on_request() -> None:
    buf = io.StringIO()
    assert configure("debug", "console", buf) == "console"
    get_logger("t").debug("entry_expired", proto="udp")
    out = buf.getvalue()
    assert "entry_expired" in out and "proto" in out
    assert not out.lstrip().startswith("{")


def test_rate_limiter_counts_suppressed() -> None:
    clk = Clock()
    rl = RateLimiter(rate=2.0, burst=2.0, clock=clk)
    assert rl.allow("x") == (True, 0)
    assert rl.allow("x") == (True, 0)
    assert rl.allow("x") == (False, 0)
    assert rl.allow("x") == (False, 0)
    assert rl.allow("y") == (True, 0)  # other events have their own bucket
    clk.t += 0.5  # one token back
    assert rl.allow("x") == (True, 2)
    assert rl.allow("x") == (False, 0)
    clk.t += 10
    assert rl.pending() == {"x": 1}
    assert rl.pending() == {}


def test_rate_limiter_bounded_keys() -> None:
    rl = RateLimiter(rate=1.0, clock=Clock(), max_keys=100)
    for i in range(1000):
        rl.allow(f"k{i}")
    assert len(rl._b) <= 100


def test_drain_logs_engine_events_with_rate_limit() -> None:
    buf = io.StringIO()
    configure("debug", "json", buf)
    clk = Clock()
    counters = OpsCounters()
    ev = EngineEventLogger(3.0, counters, clock=clk)
    eng = FakeEngine()
    eng.events = [("warning", "esp_blocked", {"lan": "10.0.0.3", "remote": "198.51.100.1"})] * 10
    eng.events.append(("info", "esp_learned", {"spi": "0x1234"}))
    eng.events.append("garbage")  # type: ignore[arg-type]
    assert ev.drain(eng) == 5  # 3 blocked + learned + malformed_engine_event
    assert eng.events == []
    assert counters.log_suppressed == {"esp_blocked": 7}
    assert counters.log_emitted["esp_blocked"] == 3
    clk.t += 1.0
    eng.events = [("warning", "esp_blocked", {"lan": "10.0.0.2"})]
    ev.drain(eng)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    blocked = [x for x in lines if x["event"] == "esp_blocked"]
    assert blocked[-1]["suppressed"] == 7 and blocked[-1]["level"] == "warning"
    assert any(x["event"] == "malformed_engine_event" for x in lines)
    assert any(x["event"] == "esp_learned" and x["level"] == "info" for x in lines)


def test_flush_suppressed_reports_quiet_events() -> None:
    buf = io.StringIO()
    configure("info", "json", buf)
    clk = Clock()
    ev = EngineEventLogger(1.0, clock=clk)
    for _ in range(5):
        ev.emit("warning", "drop_burst", {})
    clk.t += 5
    ev.flush_suppressed()
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines[-1]["event"] == "log_suppressed"
    assert lines[-1]["suppressed_event"] == "drop_burst" and lines[-1]["suppressed"] == 4


def test_stdlib_logging_rendered_as_json_too() -> None:
    import logging

    buf = io.StringIO()
    configure("info", "json", buf)
    configure("info", "json", buf)  # twice: still one handler
    logging.getLogger("masqd.dataplane").info("opened lan device %s", "masqd-lan")
    logging.getLogger("masqd.dataplane").debug("hidden")
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert len(lines) == 1
    assert lines[0]["event"] == "opened lan device masqd-lan"
    assert lines[0]["logger"] == "masqd.dataplane" and lines[0]["level"] == "info"
