"""``masqd events``: the NAT table's changes, streamed to control-socket listeners like ``conntrack -E``.

One :class:`EventHub` per daemon. While at least one listener is connected it
subscribes to the engine's change stream (``engine.nat.subscribe``); with none,
it is not subscribed and an entry's change costs the engine one empty-list test.

The subscriber runs inside the packet path, so it only records: it renders the
changed entry once as a ``masqd table`` row (the entry changes again later; the
row is what it was at the change), and appends ``(kind, reason, time, row)`` to
the bounded queue of each listener whose filter it passes. Each listener has a
writer task in the event loop that formats its queue (text or JSON lines) and
writes it to the socket. A listener whose queue is full (its reader cannot
keep up) is dropped: it gets a last line saying so, its connection is closed,
and ``events_listeners_dropped`` counts it; the packet path never waits.

Text lines follow conntrack's event format, with masqd's endpoints::

    [NEW] tcp 6 240 SYN_SENT src=10.0.0.2 dst=198.51.100.1 sport=40000 dport=80 [UNREPLIED] src=198.51.100.1 dst=203.0.113.200 sport=80 dport=40000
    [UPDATE] tcp 6 7440 ESTABLISHED src=10.0.0.2 dst=198.51.100.1 sport=40000 dport=80 src=198.51.100.1 dst=203.0.113.200 sport=80 dport=40000
    [DESTROY] tcp 6 src=10.0.0.2 dst=198.51.100.1 sport=40000 dport=80 packets=5 bytes=310 src=198.51.100.1 dst=203.0.113.200 sport=80 dport=40000 packets=4 bytes=292 reason=flush

The first tuple is the original direction (LAN host -> remote, or remote ->
WAN address for a port forward's connection), the second the reply as it
reaches masqd (remote -> WAN address, or LAN server -> remote). NEW and UPDATE
give the timeout in seconds and, for TCP and the helpers' entries, the state;
``[UNREPLIED]`` marks an entry nothing has answered yet. On DESTROY,
``packets=``/``bytes=`` follow each tuple when ``masquerade.accounting`` is on. ICMP tuples carry the
query identifier (``id=``), ESP the SPI (``spi=``, 0 until the pair is learned),
PPTP calls the GRE keys (``srckey=``/``dstkey=``, the Call IDs); ISAKMP entries
are UDP with ``icookie=``/``rcookie=``. ``helper=`` names the helper that owns
the entry; ``reason=`` says why it changed when it is not a plain state change:
timeout, flush, reset, table-full, address-change, replaced, paired.

JSON lines are the table row of the entry with ``event`` (new, update,
destroy), ``reason`` and ``time`` (Unix time of the change).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from masqd.ops.control import RequestError
from masqd.ops.tablefilter import PROTO_NUMBERS, entry_matches, original, parse_filter

QUEUE_MAX = 4096  # events waiting to be written to one listener before it is dropped
MAX_LISTENERS = 16
CLOSE_WAIT = 5.0  # seconds a dropped listener may take to read its last lines before the socket is cut

KINDS = ("new", "update", "destroy")
_TAGS = {"new": "[NEW]", "update": "[UPDATE]", "destroy": "[DESTROY]"}
_UNREPLIED = {"NEW", "SYN_SENT", "UNREPLIED", "PENDING", "INIT", "SETUP"}
# states conntrack does not print (UDP and ICMP have none: [UNREPLIED] says it)
_STATELESS = ("udp", "icmp")

Item = tuple[str, str, float, dict[str, Any]]


def _ep(text: Any) -> tuple[str, str]:
    s = str(text or "")
    addr, sep, port = s.rpartition(":")
    return (addr, port) if sep else (s, "")


def _key(v: Any) -> str:
    return "0x0" if v is None else f"0x{int(v):x}"


def _tuples(row: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The original and the reply tuple of a row, as ``key=value`` words."""
    proto = str(row.get("proto", ""))
    inbound = bool(row.get("inbound"))
    lan, lport = _ep(row.get("lan"))
    wan, wport = _ep(row.get("wan"))
    rem, rport = _ep(row.get("remote"))
    if proto == "esp":
        o = [f"src={lan}", f"dst={rem}", f"spi={row.get('spi_out', '0x0')}"]
        r = [f"src={rem}", f"dst={wan}", f"spi={row.get('spi_in', '0x0')}"]
        return o, r
    if proto == "gre":
        if "lan_call_id" not in row:  # plain GRE: addresses only
            return [f"src={lan}", f"dst={rem}"], [f"src={rem}", f"dst={wan}"]
        lk, mk, sk = _key(row.get("lan_call_id")), _key(row.get("masq_call_id")), _key(row.get("server_call_id"))
        if inbound:
            return ([f"src={rem}", f"dst={wan}", f"srckey={sk}", f"dstkey={mk}"],
                    [f"src={lan}", f"dst={rem}", f"srckey={lk}", f"dstkey={sk}"])
        return ([f"src={lan}", f"dst={rem}", f"srckey={lk}", f"dstkey={sk}"],
                [f"src={rem}", f"dst={wan}", f"srckey={sk}", f"dstkey={mk}"])
    if proto == "icmp":
        return [f"src={lan}", f"dst={rem}", f"id={lport}"], [f"src={rem}", f"dst={wan}", f"id={wport}"]
    if proto == "pcp":  # a mapping a LAN host asked for: its protocol is in "remote"
        return ([f"proto={rem}", f"src={lan}", f"sport={lport}"],
                [f"dst={wan}", f"dport={wport}", f"client={row.get('client', '')}"])
    src, dst, sport, dport = original(row)
    o = [f"src={src}", f"dst={dst}", f"sport={sport}", f"dport={dport}"]
    if inbound:
        r = [f"src={lan}", f"dst={rem}", f"sport={lport}", f"dport={rport}"]
    else:
        r = [f"src={rem}", f"dst={wan}", f"sport={rport}", f"dport={wport}"]
    return o, r


def format_event(kind: str, reason: str, row: Mapping[str, Any]) -> str:
    """One change as a conntrack-style line (see the module docstring)."""
    proto = str(row.get("proto", "?"))
    wire = "udp" if proto == "isakmp" else proto
    words = [_TAGS.get(kind, f"[{kind.upper()}]"), wire, str(PROTO_NUMBERS.get(wire, 0))]
    state = str(row.get("state") or "")
    if kind != "destroy":
        left = row.get("expires_in")
        words.append(str(int(left)) if isinstance(left, (int, float)) else "0")
        if state and wire not in _STATELESS:
            words.append(state)
    o, r = _tuples(row)
    acct = kind == "destroy" and "packets_out" in row  # conntrack shows the counters on DESTROY
    inbound = bool(row.get("inbound"))
    words += o
    if acct:
        d = "in" if inbound else "out"
        words += [f"packets={row.get('packets_' + d, 0)}", f"bytes={row.get('bytes_' + d, 0)}"]
    if state in _UNREPLIED:
        words.append("[UNREPLIED]")
    words += r
    if acct:
        d = "out" if inbound else "in"
        words += [f"packets={row.get('packets_' + d, 0)}", f"bytes={row.get('bytes_' + d, 0)}"]
    if proto == "isakmp":
        words += [f"icookie={row.get('icookie', '')}", f"rcookie={row.get('rcookie', '')}"]
    if row.get("helper"):
        words.append(f"helper={row['helper']}")
    if reason and reason != "state":
        words.append(f"reason={reason}")
    return " ".join(words)


def event_json(kind: str, reason: str, when: float, row: Mapping[str, Any]) -> str:
    """One change as a JSON line: the row with ``event``, ``reason`` and ``time``."""
    return json.dumps({"event": kind, "reason": reason, "time": round(when, 6), **row},
                      default=str, separators=(",", ":"))


class Listener:
    """One ``masqd events`` connection: its filter, format and bounded queue."""

    __slots__ = ("flt", "kinds", "json", "queue", "maxlen", "wake", "dropped", "closed", "task", "sent")

    def __init__(self, flt: dict[str, str], kinds: frozenset[str], as_json: bool, maxlen: int) -> None:
        self.flt = flt
        self.kinds = kinds
        self.json = as_json
        self.queue: deque[Item] = deque()
        self.maxlen = maxlen
        self.wake = asyncio.Event()
        self.dropped = False
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.sent = 0

    def line(self, item: Item) -> str:
        kind, reason, when, row = item
        return event_json(kind, reason, when, row) if self.json else format_event(kind, reason, row)


class EventHub:
    """See the module docstring. ``counters`` is the dict ops exports (``events_*`` names)."""

    def __init__(self, engine: Any, counters: dict[str, int], now: Callable[[], float],
                 wall: Callable[[], float] = time.time, queue_max: int = QUEUE_MAX,
                 max_listeners: int = MAX_LISTENERS, log: Any = None) -> None:
        self.engine = engine
        self.c = counters
        self.now = now
        self.wall = wall
        self.queue_max = queue_max
        self.max_listeners = max_listeners
        self.log = log
        self.listeners: list[Listener] = []
        self._subscribed = False
        for k in ("events_listeners", "events_sent", "events_listeners_dropped", "events_lost",
                  "events_errors"):
            self.c.setdefault(k, 0)

    def _bump(self, name: str, n: int = 1) -> None:
        self.c[name] = self.c.get(name, 0) + n

    # ------------------------------------------------------------------ listeners
    def open(self, req: Mapping[str, Any]) -> Listener:
        """A listener for an ``events`` request (``filter``, ``events``, ``format``); raises
        RequestError for a bad request or when ``max_listeners`` are connected."""
        nat = getattr(self.engine, "nat", None)
        if nat is None or not callable(getattr(nat, "subscribe", None)) \
                or not callable(getattr(self.engine, "entry_row", None)):
            raise RequestError("events: this engine has no change stream", "unsupported")
        flt_text = req.get("filter") or ""
        if not isinstance(flt_text, str):
            raise RequestError("events: 'filter' must be a string")
        flt = parse_filter(flt_text)
        kinds = req.get("events") or []
        if isinstance(kinds, str):
            kinds = kinds.split(",")
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise RequestError("events: 'events' must be a list of new, update, destroy")
        bad = [k for k in kinds if k.lower() not in KINDS]
        if bad:
            raise RequestError(f"events: unknown event kind(s) {', '.join(bad)} (use {', '.join(KINDS)})")
        fmt = req.get("format", "text")
        if fmt not in ("text", "json"):
            raise RequestError("events: 'format' must be text or json")
        if len(self.listeners) >= self.max_listeners:
            raise RequestError(f"events: {self.max_listeners} listeners already connected", "too_many_listeners")
        lst = Listener(flt, frozenset(k.lower() for k in kinds), fmt == "json", self.queue_max)
        self.listeners.append(lst)
        self.c["events_listeners"] = len(self.listeners)
        if not self._subscribed:
            nat.subscribe(self._on_change)
            self._subscribed = True
        return lst

    def close(self, lst: Listener) -> None:
        lst.closed = True
        lst.wake.set()
        if lst in self.listeners:
            self.listeners.remove(lst)
        self.c["events_listeners"] = len(self.listeners)
        if not self.listeners and self._subscribed:
            self.engine.nat.unsubscribe(self._on_change)
            self._subscribed = False

    def close_all(self) -> None:
        for lst in list(self.listeners):
            self.close(lst)

    # ------------------------------------------------------------------ the subscriber (packet path)
    def _on_change(self, ch: Any) -> None:
        try:
            row = self.engine.entry_row(ch.entry, self.now())
            if row is None:
                return
            item: Item = (ch.kind, ch.reason, self.wall(), row)
            for lst in self.listeners:
                if lst.dropped or (lst.kinds and ch.kind not in lst.kinds) \
                        or (lst.flt and not entry_matches(row, lst.flt)):
                    continue
                if len(lst.queue) >= lst.maxlen:
                    self._drop(lst)
                    continue
                lst.queue.append(item)
                lst.wake.set()
        except Exception:  # whatever goes wrong here must not cost the packet that made the change
            self._bump("events_errors")

    def _drop(self, lst: Listener) -> None:
        """The listener fell ``maxlen`` events behind: stop feeding it; its writer says so and closes."""
        lst.dropped = True
        self._bump("events_listeners_dropped")
        self._bump("events_lost", len(lst.queue))
        lst.queue.clear()
        lst.wake.set()
        if lst.task is not None:
            lst.task.cancel()  # it may be waiting for the socket to drain

    # ------------------------------------------------------------------ the writer (event loop)
    async def run(self, lst: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Write ``lst``'s events until the client closes, the hub closes it, or it is dropped."""
        wtask = asyncio.create_task(self._write(lst, writer), name="masqd-events-writer")
        lst.task = wtask
        rtask = asyncio.create_task(self._until_eof(reader), name="masqd-events-eof")
        try:
            await asyncio.wait({wtask, rtask}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.close(lst)
            for t in (wtask, rtask):
                t.cancel()
            for t in (wtask, rtask):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        if lst.dropped:
            if self.log is not None:
                self.log.warning("events_listener_dropped", queued=lst.maxlen, sent=lst.sent)
            note = (f"listener dropped: it fell {lst.maxlen} events behind "
                    "(counted in events_listeners_dropped)")
            with contextlib.suppress(Exception):
                writer.write(((json.dumps({"dropped": note}) if lst.json else f"# masqd: {note}") + "\n").encode())
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), CLOSE_WAIT)
            writer.transport.abort()

    async def _write(self, lst: Listener, writer: asyncio.StreamWriter) -> None:
        q = lst.queue
        while not lst.closed and not lst.dropped:
            await lst.wake.wait()
            lst.wake.clear()
            if lst.dropped:
                return
            if not q:
                continue
            lines = [lst.line(q.popleft()) for _ in range(len(q))]
            lines.append("")
            writer.write("\n".join(lines).encode())
            lst.sent += len(lines) - 1
            self._bump("events_sent", len(lines) - 1)
            await writer.drain()

    @staticmethod
    async def _until_eof(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(4096):
                pass
