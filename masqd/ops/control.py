"""Control socket: a unix-socket, line-delimited JSON protocol, server and client.

Protocol (one JSON object per line, both ways, UTF-8)::

    -> {"cmd": "table"}
    <- {"ok": true, "result": [ {...entry...}, ... ]}
    -> {"cmd": "nonsense"}
    <- {"ok": false, "error": "unknown command 'nonsense' (known: ...)"}

Commands: ``ping``, ``table`` (``filter``, ``count``), ``stats``, ``rules``,
``flush`` (``filter``), ``wan-address`` (``action``="set", ``address``),
``reload``, ``capture`` (``action``="start"|"stop"|"status", ``iface``,
``path``), ``save`` (write the state file now), ``role``. The server only routes: the handlers are supplied by the ops
runtime. A handler signals a bad argument with :class:`RequestError`; every
refusal (bad JSON, unknown command, bad argument, oversized line) gets an error
reply and is counted by reason in ``masqd_control_errors_total``. The socket is
created mode 0600.

Abuse costs bounded memory and never stalls the packet loop: a request line is
read into a buffer of at most ``MAX_LINE`` bytes (longer: refused, connection
closed, ``too_long``); at most ``MAX_CLIENTS`` connections are served at once
(more: a one-line refusal, ``too_many_clients``); a client has ``IDLE_TIMEOUT``
seconds to send a whole line; a reply waits for the client to read it for at
most ``WRITE_TIMEOUT`` seconds, and a client that does not read by then is
dropped (``slow_client``), so one reply at most is buffered per client, and only
that long. Refusals are logged at most once per second per reason.

A *streaming* command (``events``) answers its request with the same
``{"ok": true, ...}`` line (or an error) and then keeps writing lines of its
own until the client closes the connection::

    -> {"cmd": "events", "filter": "proto=tcp", "format": "text"}
    <- {"ok": true, "result": {"stream": "events"}}
    <- [NEW] tcp 6 240 SYN_SENT src=10.0.0.2 ...

The client side is synchronous: :func:`request` (one reply) and :func:`stream`
(the lines of a streaming command); the CLI subcommands use them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from masqd.ops.metrics import OpsCounters

MAX_LINE = 64 * 1024
IDLE_TIMEOUT = 60.0
MAX_CLIENTS = 16
WRITE_TIMEOUT = 10.0

Handler = Callable[[dict[str, Any]], Any]
# a streaming command: (request) -> a coroutine function writing to the connection until it ends;
# it raises RequestError (before anything is written) to refuse the request
StreamRun = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
StreamHandler = Callable[[dict[str, Any]], StreamRun]


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
                 logger: Any = None, streams: Mapping[str, StreamHandler] | None = None) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self.streams = dict(streams or {})
        self.counters = counters
        self.log = logger
        self._server: asyncio.AbstractServer | None = None
        self.clients = 0  # connections being served
        self.max_clients = MAX_CLIENTS
        self.write_timeout = WRITE_TIMEOUT
        self.idle_timeout = IDLE_TIMEOUT
        self._logged: dict[str, float] = {}
        self.peak_buffered = 0  # the most reply bytes ever waiting for one client (a bound to check)

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
        now = time.monotonic()
        if self.log is not None and now - self._logged.get(reason, -1e18) >= 1.0:
            self._logged[reason] = now
            self.log.warning("control_request_refused", reason=reason, error=message,
                             refused_so_far=self.counters.control_errors[reason])
        return {"ok": False, "error": message}

    async def _send(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> bool:
        """Write one reply; False (connection aborted, counted) when the client does not read it
        within ``write_timeout``."""
        writer.write(_dump(reply))
        buffered = writer.transport.get_write_buffer_size()
        if buffered > self.peak_buffered:
            self.peak_buffered = buffered
        try:
            await asyncio.wait_for(writer.drain(), self.write_timeout)
        except TimeoutError:
            self._refuse("slow_client", f"the client did not read its reply within {self.write_timeout:g}s")
            writer.transport.abort()
            return False
        return True

    async def handle_line(self, line: bytes) -> dict[str, Any]:
        """One request line -> one reply object (never raises)."""
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._refuse("bad_json", f"request is not valid JSON: {exc}")
        except RecursionError:  # "[[[[..." nested deeper than the parser's stack
            return self._refuse("bad_json", "request is not valid JSON: nested too deeply")
        if not isinstance(req, dict):
            return self._refuse("bad_request", "request must be a JSON object")
        cmd = req.get("cmd")
        if not isinstance(cmd, str):
            return self._refuse("bad_request", "request needs a string field 'cmd'")
        handler = self.handlers.get(cmd)
        if handler is None:
            known = ", ".join(sorted({*self.handlers, *self.streams}))
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
        if self.clients >= self.max_clients:
            reply = self._refuse("too_many_clients", f"more than {self.max_clients} clients at once; try again")
            try:
                writer.write(_dump(reply))  # (a few bytes into an empty socket buffer: never waits)
            finally:
                writer.close()
            return
        self.clients += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.clients -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readuntil(b"\n"), self.idle_timeout)
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial.strip():
                        break
                    line = exc.partial  # last line without newline
                except asyncio.LimitOverrunError:
                    reply = self._refuse("too_long", f"request line longer than {MAX_LINE} bytes")
                    await self._send(writer, reply)
                    break
                except TimeoutError:
                    self.counters.bump(self.counters.control_errors, "idle_timeout")
                    break
                if not line.strip():
                    continue
                run = self._streaming(line)
                if run is not None:
                    # a stream is capped by its own hub (events: its listener limit), not by
                    # MAX_CLIENTS: listeners must never lock the operator's commands out
                    self.clients -= 1
                    try:
                        await self._stream(run, reader, writer)
                    finally:
                        self.clients += 1
                    break
                reply = await self.handle_line(line)
                if not await self._send(writer, reply):
                    return
                if reader.at_eof():
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _streaming(self, line: bytes) -> tuple[str, dict[str, Any]] | None:
        """(command, request) when ``line`` asks for a streaming command, else None."""
        if not self.streams:
            return None
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None  # (handle_line refuses it with its reason)
        if isinstance(req, dict) and isinstance(req.get("cmd"), str) and req["cmd"] in self.streams:
            return req["cmd"], req
        return None

    async def _stream(self, what: tuple[str, dict[str, Any]], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        cmd, req = what
        self.counters.bump(self.counters.control_requests, cmd)
        try:
            run = self.streams[cmd](req)
        except RequestError as exc:
            reply = self._refuse(exc.reason, str(exc))
        except Exception as exc:  # a handler bug is a refused request, not a dead daemon
            reply = self._refuse("internal_error", f"{cmd}: internal error: {type(exc).__name__}: {exc}")
        else:
            # no drain here: the stream's own writer drains, and its end (a client gone early
            # included) is what releases whatever the handler took for it
            writer.write(_dump({"ok": True, "result": {"stream": cmd}}))
            await run(reader, writer)
            return
        writer.write(_dump(reply))
        await writer.drain()


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


def _send_request(path: str, req: dict[str, Any], timeout: float) -> socket.socket:
    """A connection to the daemon with ``req`` sent on it (ControlError when it is unreachable)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as exc:
        s.close()
        raise ControlError(f"cannot reach masqd at {path}: {exc.strerror or exc}") from None
    try:
        s.sendall(_dump(req))
    except (BrokenPipeError, ConnectionResetError) as exc:
        # the daemon may have refused the connection (too many clients) with a line and closed
        # it before the request went out: that line is the answer, not the broken pipe
        said = _refusal(s)
        s.close()
        raise ControlError(said or f"cannot reach masqd at {path}: {exc.strerror or exc}") from None
    except OSError as exc:
        s.close()
        raise ControlError(f"cannot reach masqd at {path}: {exc.strerror or exc}") from None
    return s


def _refusal(s: socket.socket) -> str | None:
    """The error of a refusal the daemon wrote before closing ``s``, if one is waiting."""
    try:
        s.settimeout(0.5)
        data = s.recv(4096)
    except OSError:
        return None
    try:
        reply = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return None
    return _refused(reply)


def _refused(reply: Any) -> str | None:
    """The error text of a well-formed refusal, None for anything else."""
    if isinstance(reply, dict) and not reply.get("ok", True):
        return str(reply.get("error", "request refused"))
    return None


def request(path: str, req: dict[str, Any], timeout: float = 10.0) -> Any:
    """Send one request, return ``result``; raise ControlError with the server's message."""
    s = _send_request(path, req, timeout)
    try:
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
        raise ControlError(_refused(reply) or "request refused")
    return reply.get("result")


def stream(path: str, req: dict[str, Any], timeout: float = 10.0, duration: float | None = None) -> Iterator[str]:
    """Start a streaming command; yield its lines (without the newline) until the daemon closes
    the connection, or for ``duration`` seconds. Raises ControlError when it is unreachable or
    refuses the request. The connection closes when the caller stops iterating."""
    s = _send_request(path, req, timeout)
    try:
        f = s.makefile("rb")
        try:
            first = f.readline()
        except TimeoutError:
            raise ControlError(f"masqd at {path} did not answer within {timeout:g}s") from None
        try:
            reply = json.loads(first)
        except ValueError:
            raise ControlError(f"masqd sent a reply that is not JSON: {first[:200]!r}") from None
        if not isinstance(reply, dict) or "ok" not in reply:
            raise ControlError(f"malformed reply: {reply!r}")
        if not reply["ok"]:
            raise ControlError(str(reply.get("error", "request refused")))
        end = None if duration is None else time.monotonic() + duration
        while True:
            # events come when they come: no timeout but the duration's
            s.settimeout(None if end is None else max(0.001, end - time.monotonic()))
            try:
                raw = f.readline()
            except TimeoutError:
                return
            if not raw:
                return
            yield raw.decode("utf-8", "replace").rstrip("\n")
    finally:
        s.close()


# --------------------------------------------------------------------------- rendering


def _fmt_expire(v: Any) -> str:
    try:
        s = float(v)
    except (TypeError, ValueError):
        return "-"
    m, sec = divmod(max(s, 0.0), 60.0)
    return f"{int(m):02d}:{sec:05.2f}"


def format_table(entries: list[dict[str, Any]]) -> str:
    """Render like ``ipchains -M -L -n``: one line per masquerade entry; with accounting, the
    packets and bytes of each direction (out: LAN -> WAN, in: WAN -> LAN) after the state."""
    lines = [f"IP masquerading entries: {len(entries)}"]
    acct = any("packets_out" in e for e in entries)
    head = f"{'prot':<6}{'expire':>9}  {'lan (source)':<22}{'wan (masq)':<22}{'remote':<22}{'state':<12}"
    if acct:
        head += f"{'pkts out/in':>15}{'bytes out/in':>21}"
    lines.append(head.rstrip())
    for e in entries:
        proto = str(e.get("proto", "?")).upper()
        line = (f"{proto:<6}{_fmt_expire(e.get('expires_in')):>9}  {str(e.get('lan', '-')):<22}"
                f"{str(e.get('wan', '-')):<22}{str(e.get('remote', '-')):<22}{str(e.get('state', '') or ''):<12}")
        if "packets_out" in e:
            line += (f"{str(e['packets_out']) + '/' + str(e.get('packets_in', 0)):>15}"
                     f"{str(e.get('bytes_out', 0)) + '/' + str(e.get('bytes_in', 0)):>21}")
        lines.append(line.rstrip())
    return "\n".join(lines)


def format_stats(stats: dict[str, Any]) -> str:
    """``name value`` lines, sorted, for ``masqd stats``."""
    out: list[str] = []
    counters = stats.get("counters", {})
    width = max((len(k) for k in counters), default=10)
    for k in sorted(counters):
        out.append(f"{k:<{width}}  {counters[k]}")
    for k, v in sorted(stats.items()):
        if k not in ("counters", "host_limits"):
            out.append(f"{k}: {json.dumps(v, default=str)}")
    hl = stats.get("host_limits")
    if isinstance(hl, dict):
        out.append(f"host limits: {json.dumps(hl.get('limits', {}), default=str)}")
        out.append(f"hosts tracked: {hl.get('hosts', 0)}; ports in quarantine: {hl.get('ports_in_quarantine', 0)}; "
                   f"hosts over their mapping rate: {hl.get('hosts_over_rate', 0)}")
        top = hl.get("top_offenders") or []
        out.append("top offenders (refused by a per-host limit):" if top else "top offenders: none")
        for r in top:
            if isinstance(r, dict):
                reasons = " ".join(f"{k}={n}" for k, n in sorted((r.get("reasons") or {}).items()))
                out.append(f"  {r.get('rank', ''):>2}  {r.get('host', ''):<15}  score {r.get('score', 0):<8}  "
                           f"drops {r.get('drops', 0):<8}  {reasons}  (last {r.get('last_seen_ago', 0)} s ago)")
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
