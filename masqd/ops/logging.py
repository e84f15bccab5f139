"""Logging: structlog set-up, a per-event rate limiter, and the engine-event drain.

- Output is JSON lines when stderr is not a terminal (a container, a pipe) and
  a readable console rendering on a terminal; ``logging.format`` forces either.
  Records of the standard ``logging`` module (the data plane, libraries) are
  rendered the same way, so a container's log is JSON throughout.
- Levels follow SPEC 7: masquerade entries created/expired at debug, VPN events
  at info, refusals at warning. The engine chooses the level of each event it
  records; ops only renders them.
- Traffic drives most events, so each event name gets a token bucket
  (``logging.rate_per_event`` per second, burst the same). Events over the
  rate are counted, not printed; the next event of that name that passes
  carries ``suppressed=N``, and :meth:`EngineEventLogger.flush_suppressed`
  reports names that went quiet with a count still pending.
"""

from __future__ import annotations

import logging as std_logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import structlog

from masqd.ops.metrics import OpsCounters

LEVELS = {"debug": std_logging.DEBUG, "info": std_logging.INFO, "warning": std_logging.WARNING,
          "warn": std_logging.WARNING, "error": std_logging.ERROR, "critical": std_logging.CRITICAL}


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> str:
    """Configure structlog globally; returns the renderer chosen ("json" or "console")."""
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if _is_tty(out) else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(out))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, std_logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(out, renderer, LEVELS.get(level, std_logging.INFO))
    return fmt


class _MasqdHandler(std_logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the root handler this module installed, so a re-configure replaces it."""


def _route_stdlib(out: TextIO, renderer: Any, level: int) -> None:
    """Render stdlib ``logging`` records (data plane, libraries) with the same renderer."""
    handler = _MasqdHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = std_logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _MasqdHandler):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


def get_logger(name: str = "masqd") -> Any:
    return structlog.get_logger(name)


@dataclass
class _Bucket:
    tokens: float
    last: float
    suppressed: int = 0


class RateLimiter:
    """Token bucket per key: ``rate`` events/s with a burst of ``burst``."""

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 4096) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self.clock = clock
        self.max_keys = max_keys
        self._b: dict[str, _Bucket] = {}

    def allow(self, key: str) -> tuple[bool, int]:
        """(allowed, suppressed_before): when allowed, how many were swallowed since the last pass."""
        now = self.clock()
        b = self._b.get(key)
        if b is None:
            if len(self._b) >= self.max_keys:
                self._evict(now)
            b = self._b[key] = _Bucket(self.burst, now)
        else:
            b.tokens = min(self.burst, b.tokens + (now - b.last) * self.rate)
            b.last = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            n, b.suppressed = b.suppressed, 0
            return True, n
        b.suppressed += 1
        return False, 0

    def pending(self) -> dict[str, int]:
        """Keys whose bucket is full again but that still have a suppressed count, cleared."""
        now = self.clock()
        out: dict[str, int] = {}
        for k, b in self._b.items():
            tokens = min(self.burst, b.tokens + (now - b.last) * self.rate)
            if b.suppressed and tokens >= 1.0:
                out[k] = b.suppressed
                b.suppressed = 0
        return out

    def _evict(self, now: float) -> None:
        # Drop buckets that are full and have nothing pending: they carry no state.
        for k in [k for k, b in self._b.items()
                  if not b.suppressed and b.tokens + (now - b.last) * self.rate >= self.burst]:
            del self._b[k]
        if len(self._b) >= self.max_keys:
            self._b.clear()


class EngineEventLogger:
    """Turns ``engine.drain_events()`` records into rate-limited structlog lines."""

    def __init__(self, rate_per_event: float, counters: OpsCounters | None = None,
                 logger: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limiter = RateLimiter(rate_per_event, clock=clock)
        self.counters = counters if counters is not None else OpsCounters()
        self.log = logger if logger is not None else get_logger("masqd.engine")

    def set_rate(self, rate_per_event: float) -> None:
        self.limiter.rate = rate_per_event
        self.limiter.burst = max(rate_per_event, 1.0)

    def emit(self, level: str, event: str, fields: dict[str, Any]) -> bool:
        """Log one event unless its rate is exceeded; returns whether it was printed."""
        ok, suppressed = self.limiter.allow(event)
        if not ok:
            self.counters.bump(self.counters.log_suppressed, event)
            return False
        self.counters.bump(self.counters.log_emitted, event)
        kw = dict(fields)
        if suppressed:
            kw["suppressed"] = suppressed
        meth = getattr(self.log, level if level in LEVELS else "info", self.log.info)
        meth(event, **kw)
        return True

    def log_events(self, events: Iterable[tuple[str, str, dict[str, Any]]]) -> int:
        n = 0
        for rec in events:
            try:
                level, event, fields = rec
            except (TypeError, ValueError):
                level, event, fields = "warning", "malformed_engine_event", {"record": repr(rec)[:200]}
            if not isinstance(fields, dict):
                fields = {"value": fields}
            n += self.emit(str(level), str(event), fields)
        return n

    def drain(self, engine: Any) -> int:
        """Drain the engine's pending events and log them; returns lines printed."""
        drain = getattr(engine, "drain_events", None)
        if not callable(drain):
            return 0
        return self.log_events(drain())

    def flush_suppressed(self) -> None:
        for event, n in self.limiter.pending().items():
            self.log.info("log_suppressed", suppressed_event=event, suppressed=n)
