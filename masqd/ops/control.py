"""Control socket: a unix-socket, line-delimited JSON protocol, server and client.

Protocol (one JSON object per line, both ways, UTF-8)::

    -> {"cmd": "table"}
    <- {"ok": true, "result": [ {...entry...}, ... ]}
    -> {"cmd": "nonsense"}
    <- {"ok": false, "error": "unknown command 'nonsense' (known: ...)"}

Commands: ``ping``, ``table``, ``stats``, ``rules``, ``flush`` (``filter``),
``wan-address`` (``action``="set", ``address``), ``reload``, ``capture``
(``action``="start"|"stop"|"status", ``iface``, ``path``), ``save`` (write the
state file now). The server only
routes: the handlers are supplied by the ops runtime. A handler signals a bad
argument with :class:`RequestError`; every refusal (bad JSON, unknown command,
bad argument, oversized line) gets an error reply and is counted by reason in
``masqd_control_errors_total``. The socket is created mode 0600.

The client side (:func:`request`) is synchronous: the CLI subcommands use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from masqd.ops.metrics import OpsCounters

MAX_LINE = 64 * 1024
IDLE_TIMEOUT = 60.0

Handler = Callable[[dict[str, Any]], Any]


class RequestError(Exception):
    """A request the server understood but refuses; ``reason`` is the counter label."""

    def __init__(self, message: str, reason: str = "bad_argument") -> None:
        super().__init__(message)
        self.reason = reason


class ControlError(Exception):
    """Client side: the daemon is unreachable or answered with an error."""


class ControlServer:
    """Routes requests to ``handlers[cmd]`` (sync or async callables)."""

    def __init__(self, path: str, handlers: Mapping[str, Handler], counters: OpsCounters,
                 logger: Any = None) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self.counters = counters
        self.log = logger
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        p = Path(self.path)
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if p.exists() or p.is_symlink():
            st = p.lstat()
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(f"control socket path {self.path} exists and is not a socket")
            if _socket_alive(self.path):
                raise OSError(f"control socket {self.path} is in use by a running masqd")
            p.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=self.path, limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _refuse(self, reason: str, message: str) -> dict[str, Any]:
        self.counters.bump(self.counters.control_errors, reason)
        if self.log is not None:
            self.log.warning("control_request_refused", reason=reason, error=message)
        return {"ok": False, "error": message}

    async def handle_line(self, line: bytes) -> dict[str, Any]:
        """One request line -> one reply object (never raises)."""
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._refuse("bad_json", f"request is not valid JSON: {exc}")
        if not isinstance(req, dict):
            return self._refuse("bad_request", "request must be a JSON object")
        cmd = req.get("cmd")
        if not isinstance(cmd, str):
            return self._refuse("bad_request", "request needs a string field 'cmd'")
        handler = self.handlers.get(cmd)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return self._refuse("unknown_command", f"unknown command {cmd!r} (known: {known})")
        self.counters.bump(self.counters.control_requests, cmd)
        try:
            result = handler(req)
            if asyncio.iscoroutine(result):
                result = await result
        except RequestError as exc:
            return self._refuse(exc.reason, str(exc))
        except Exception as exc:  # a handler bug is a refused request, not a dead daemon
            return self._refuse("internal_error", f"{cmd}: internal error: {type(exc).__name__}: {exc}")
        return {"ok": True, "result": result}

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readuntil(b"\n"), IDLE_TIMEOUT)
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial.strip():
                        break
                    line = exc.partial  # last line without newline
                except asyncio.LimitOverrunError:
                    reply = self._refuse("too_long", f"request line longer than {MAX_LINE} bytes")
                    writer.write(_dump(reply))
                    await writer.drain()
                    break
                except TimeoutError:
                    break
                if not line.strip():
                    continue
                reply = await self.handle_line(line)
                writer.write(_dump(reply))
                await writer.drain()
                if reader.at_eof():
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, default=str, separators=(",", ":")) + "\n").encode()


def _socket_alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


# --------------------------------------------------------------------------- client


def request(path: str, req: dict[str, Any], timeout: float = 10.0) -> Any:
    """Send one request, return ``result``; raise ControlError with the server's message."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except OSError as exc:
            raise ControlError(f"cannot reach masqd at {path}: {exc.strerror or exc}") from None
        s.sendall(_dump(req))
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise ControlError(f"masqd at {path} did not answer within {timeout:g}s") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError(f"masqd sent a reply that is not JSON: {bytes(buf[:200])!r}") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlError(f"malformed reply: {reply!r}")
    if not reply["ok"]:
        raise ControlError(str(reply.get("error", "request refused")))
    return reply.get("result")


# --------------------------------------------------------------------------- rendering


def _fmt_expire(v: Any) -> str:
    try:
        s = float(v)
    except (TypeError, ValueError):
        return "-"
    m, sec = divmod(max(s, 0.0), 60.0)
    return f"{int(m):02d}:{sec:05.2f}"


def format_table(entries: list[dict[str, Any]]) -> str:
    """Render like ``ipchains -M -L -n``: one line per masquerade entry."""
    lines = [f"IP masquerading entries: {len(entries)}"]
    head = f"{'prot':<6}{'expire':>9}  {'lan (source)':<22}{'wan (masq)':<22}{'remote':<22}state"
    lines.append(head)
    for e in entries:
        proto = str(e.get("proto", "?")).upper()
        lines.append(
            f"{proto:<6}{_fmt_expire(e.get('expires_in')):>9}  {str(e.get('lan', '-')):<22}"
            f"{str(e.get('wan', '-')):<22}{str(e.get('remote', '-')):<22}{e.get('state', '') or ''}"
        )
    return "\n".join(lines)


def format_stats(stats: dict[str, Any]) -> str:
    """``name value`` lines, sorted, for ``masqd stats``."""
    out: list[str] = []
    counters = stats.get("counters", {})
    width = max((len(k) for k in counters), default=10)
    for k in sorted(counters):
        out.append(f"{k:<{width}}  {counters[k]}")
    for k, v in sorted(stats.items()):
        if k != "counters":
            out.append(f"{k}: {json.dumps(v, default=str)}")
    return "\n".join(out)


def format_rules(rows: Any) -> str:
    """Render rule rows like ``ipchains -L -v -n``: chain, number (0 = policy), hits, rule."""
    if not isinstance(rows, list):
        return json.dumps(rows, indent=2, default=str)
    out = [f"{'chain':<10}{'num':>4}{'pkts':>10}{'bytes':>12}  rule"]
    for r in rows:
        if not isinstance(r, dict):
            out.append(str(r))
            continue
        pk = "-" if r.get("pkts") is None else str(r["pkts"])
        by = "-" if r.get("bytes") is None else str(r["bytes"])
        out.append(f"{str(r.get('chain', '')):<10}{r.get('num', ''):>4}{pk:>10}{by:>12}  {r.get('rule', '')}")
    return "\n".join(out)
