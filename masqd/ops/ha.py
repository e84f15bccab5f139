"""Active/backup pair: the role keepalived gives, and the state sync between the two masqd.

One job: keep the standby's table a copy of the active's, and switch roles when told.

Roles. keepalived (VRRP) decides; its FIFO script (:mod:`masqd.ops.keepalived`)
or the operator says it with ``masqd role active|backup|fault`` over the
control socket. Only the active routes, answers ARP and announces the
addresses (:meth:`Dataplane.set_active`). masqd starts as a standby. Taking
over gives every entry a full lifetime (:func:`masqd.engine.state.rearm`: the
standby cannot know when an entry last saw traffic) and sends gratuitous ARP.

Readiness. ``ha.alive_device`` is a TUN device masqd opens once it is ready to
take over: once a full copy of the active peer's table arrived, or after
``sync_wait`` seconds without hearing an active peer. keepalived tracks it
(``track_interface``): the device vanishes the moment masqd dies (even by
SIGKILL), so keepalived hands the role over at once; and a masqd coming back
is not made active before it holds the table.

Sync (in the manner of pfsync): the active subscribes to the engine's change
stream; each change only records the entry in a bounded, coalescing queue (at
most ``queue_max``; beyond, the queue is dropped, counted, and a full resync
follows). Every ``batch_interval`` the queue is turned into records
(:mod:`masqd.engine.state`) and sent as UDP datagrams to the peer. A full
resync (bulk) goes when the peer asks (its HELLO says it needs one: at start,
after a gap); changes wait while a bulk is under way, so the bulk never
undoes a later change; the standby applies the bulk, then removes every entry
the bulk did not name. The active makes the bulk as it sends it, at most
``BULK_RECS_PER_TICK`` sessions a batch interval (from the list of those there
when it began; one removed before its turn is left out), so a large table
does not hold the loop for all of it; the data plane's reader threads go on
forwarding meanwhile.

Messages: header (magic, version, type, flags, sender boot id, sequence
number, configuration fingerprint, send time, body length), a JSON body,
HMAC-SHA256 over both with the key of ``key_file``. Dropped and counted by
reason (``ha_dropped_<reason>``), never applied: from another address than
``peer`` (wrong_peer), bad HMAC (bad_hmac), malformed or a record that does
not check (malformed), an old sequence number or boot id (replay), another
configuration fingerprint (config_mismatch), table changes arriving while this
node is active (not_backup: the active's own state is never changed by its
peer). A gap in the sequence numbers asks for a full resync (gap). The boot id
is the sender's start time in nanoseconds: a message of an older incarnation
is a replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from masqd.engine import state as enginestate
from masqd.engine.table import DESTROY, Change

MAGIC = b"MQHA"
VERSION = 1
T_HELLO, T_UPDATE, T_BULK, T_BULK_END = 1, 2, 3, 4
TYPES = {T_HELLO: "hello", T_UPDATE: "update", T_BULK: "bulk", T_BULK_END: "bulk_end"}
F_NEED_BULK = 1
ROLE_CODES = {"backup": 0, "active": 1, "fault": 2}
ROLES = tuple(ROLE_CODES)
HDR = struct.Struct("!4sBBHQQ8sdI")
MAC_LEN = 32
MAX_DATAGRAM = 1400
MAX_BODY = MAX_DATAGRAM - HDR.size - MAC_LEN
HELLO_INTERVAL = 0.5
_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode  # one encoder, reused
BULK_PER_TICK = 256  # datagrams of a bulk sent per batch interval
BULK_RECS_PER_TICK = 4096  # sessions of a bulk made into records per batch interval, at most


class Dropped(Exception):
    """A sync message that is not applied; ``reason`` is the counter label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def fingerprint(cfg: Any) -> bytes:
    """What both ends of a pair must agree on for records to mean the same: the addresses,
    the masquerade settings, the forwards and the helpers' settings."""
    parts = {k: getattr(cfg, k).model_dump(mode="json") for k in ("masquerade", "forwarding", "ipsec", "pptp")}
    parts["lan"] = str(cfg.lan.address)
    parts["wan"] = str(cfg.wan.address) if cfg.wan.address_source == "config" else cfg.wan.address_source
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()[:8]


def pack(key: bytes, typ: int, flags: int, boot: int, seq: int, fp: bytes, sent: float, body: bytes) -> bytes:
    head = HDR.pack(MAGIC, VERSION, typ, flags, boot, seq, fp, sent, len(body))
    return head + body + hmac.new(key, head + body, hashlib.sha256).digest()


def unpack(key: bytes, data: bytes) -> tuple[int, int, int, int, bytes, float, bytes]:
    """(type, flags, boot, seq, fingerprint, send time, body) of an authentic message, else Dropped."""
    if len(data) < HDR.size + MAC_LEN:
        raise Dropped("malformed")
    mac = data[-MAC_LEN:]
    if not hmac.compare_digest(mac, hmac.new(key, data[:-MAC_LEN], hashlib.sha256).digest()):
        raise Dropped("bad_hmac")
    magic, version, typ, flags, boot, seq, fp, sent, n = HDR.unpack_from(data)
    if magic != MAGIC or version != VERSION or typ not in TYPES or n != len(data) - HDR.size - MAC_LEN:
        raise Dropped("malformed")
    return typ, flags, boot, seq, fp, sent, data[HDR.size:-MAC_LEN]


def read_key(path: str) -> bytes:
    """The HMAC key: the file's bytes (surrounding blanks removed); at least 16 of them."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"ha.key_file {path}: {exc.strerror or exc}") from None
    if len(key) < 16:
        raise ValueError(f"ha.key_file {path}: a key of at least 16 bytes is needed")
    return key


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class HA:
    """See the module docstring. ``set_active(bool)`` switches the data plane; ``sync(hold=...)``
    folds the flow cache's counts into the engine (``hold=False``: for a read, the reader threads
    go on at once); ``open_alive()`` opens the readiness device (returns something with ``close()``)."""

    def __init__(self, engine: Any, cfg: Any, key: bytes, *, clock: Callable[[], float],
                 set_active: Callable[[bool], None], sync: Callable[..., None], log: Any,
                 open_alive: Callable[[str], Any] | None = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.key = key
        self.clock = clock
        self._set_active = set_active
        self._sync = sync
        self.log = log
        self._open_alive = open_alive
        h = cfg.ha
        self.peer = _addr(h.peer)
        self.listen = _addr(h.listen)
        self.qmax = h.queue_max
        self.fp = fingerprint(cfg)
        self.role = "backup"
        self.boot = time.time_ns()
        self.seq = 0
        self.c: dict[str, int] = {}
        self.queue: dict[Any, str] = {}  # entry -> its latest change ("u" or "d:<reason>"), in order
        self.bulk_wanted = False  # the peer asked for a full resync
        self.bulk_out: list[bytes] = []  # bodies of the bulk being sent
        # the sessions of the bulk under way not yet made into records (None: all made; the
        # bulk is made in parts, so that a large table does not hold the loop for all of it)
        self.bulk_src: list[Any] | None = None
        self.bulk_pos = 0
        self.bulk_n = 0  # records made so far
        self.bulk_id = 0
        self.bulk_sent_at = -1e9
        # what we know of the peer
        self.peer_boot = 0
        self.peer_seq = 0
        self.peer_role = ""
        self.peer_heard = -1e9
        self.lag = 0.0
        # the copy we hold
        self.synced = False
        self.bulk_in: dict[str, Any] | None = None  # {"id", "keys", "n"}
        self.bulk_seen = 0  # the id of the latest bulk of the peer's we saw a part of
        self.started = time.monotonic()
        self.alive: Any = None
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._warned: dict[str, float] = {}
        engine.nat.subscribe(self._on_change)

    # ------------------------------------------------------------------ counting

    def count(self, name: str, n: int = 1) -> None:
        self.c[name] = self.c.get(name, 0) + n

    def drop(self, reason: str, peer: str = "") -> None:
        self.count(f"ha_dropped_{reason}")
        now = time.monotonic()
        if now - self._warned.get(reason, -1e9) > 10.0:  # one log line per reason per 10 s
            self._warned[reason] = now
            self.log.warning("ha_sync_dropped", reason=reason, peer=peer)

    def counters(self) -> dict[str, int]:
        out = dict(self.c)
        for r in ROLES:
            out[f"ha_role_{r}"] = int(self.role == r)
        out["ha_queue"] = len(self.queue)
        out["ha_lag_ms"] = int(self.lag * 1000)
        out["ha_synced"] = int(self.synced)
        return out

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        proto = _Protocol(self)
        transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=self.listen)
        self.transport = transport
        self._tasks.append(asyncio.create_task(self._tick_loop(), name="masqd-ha-sync"))
        self.log.info("ha_started", role=self.role, listen=f"{self.listen[0]}:{self.listen[1]}",
                      peer=f"{self.peer[0]}:{self.peer[1]}", alive_device=self.cfg.ha.alive_device or None)
        self._hello()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.transport is not None:
            self.transport.close()
        if self.alive is not None:
            with contextlib.suppress(Exception):
                self.alive.close()
            self.alive = None
        self.engine.nat.unsubscribe(self._on_change)

    async def _tick_loop(self) -> None:
        iv = self.cfg.ha.batch_interval
        last_hello = 0.0
        while True:
            await asyncio.sleep(iv)
            try:
                self.tick()
                now = time.monotonic()
                if now - last_hello >= HELLO_INTERVAL:
                    last_hello = now
                    self._hello()
                if self.alive is None and self._open_alive is not None and self.ready():
                    await self._make_alive()
            except Exception as exc:  # the sync must never take the router down
                self.count("ha_errors")
                self.log.error("ha_sync_failed", error=f"{type(exc).__name__}: {exc}")

    def ready(self) -> bool:
        """May keepalived make us active: we hold the active peer's table, or there is none."""
        if self.synced or self.role == "active":
            return True
        heard_active = self.peer_role == "active" and time.monotonic() - self.peer_heard < 3 * HELLO_INTERVAL
        return not heard_active and time.monotonic() - self.started >= self.cfg.ha.sync_wait

    async def _make_alive(self) -> None:
        name = self.cfg.ha.alive_device
        if not name or self._open_alive is None:
            return
        try:
            self.alive = await asyncio.get_running_loop().run_in_executor(None, self._open_alive, name)
        except Exception as exc:  # noqa: BLE001 - counted and retried at the next tick
            self.count("ha_alive_errors")
            self.log.error("ha_alive_device_failed", device=name, error=str(exc))
            return
        self.log.info("ha_ready", device=name, synced=self.synced)

    # ------------------------------------------------------------------ roles

    def set_role(self, role: str, by: str = "control") -> dict[str, Any]:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        old = self.role
        if role != old:
            if old == "active":
                self.tick()  # what is queued still goes to the peer
            self.role = role
            if role == "active":
                self._sync()
                enginestate.rearm(self.engine, self.clock())
                self.queue.clear()
                self.bulk_out = []
                self.bulk_src = None
                self.bulk_in = None
                self._set_active(True)
            elif old == "active":
                self._set_active(False)
                self.synced = False  # the new active's table is the one to follow: ask for it
            self.count("ha_role_changes")
            self.log.info("ha_role_changed", old=old, new=role, by=by, entries=len(self.engine.nat))
            self._hello()
        return {"role": self.role, "old": old, "synced": self.synced}

    # ------------------------------------------------------------------ sending

    def _on_change(self, ch: Change) -> None:
        if self.role != "active":
            return
        q = self.queue
        if ch.entry not in q and len(q) >= self.qmax:
            q.clear()
            self.count("ha_overflows")
            self.bulk_wanted = True
            return
        q[ch.entry] = f"d:{ch.reason}" if ch.kind == DESTROY else "u"

    def _send(self, typ: int, body: bytes, flags: int = 0) -> None:
        if self.transport is None:
            return
        self.seq += 1
        data = pack(self.key, typ, flags, self.boot, self.seq, self.fp, time.time(), body)
        self.transport.sendto(data, self.peer)
        self.count("ha_sent_messages")
        self.count("ha_sent_bytes", len(data))

    def _hello(self) -> None:
        need = self.role != "active" and not self.synced
        body = json.dumps({"role": self.role, "synced": self.synced, "bulk": self.bulk_seen}).encode()
        self._send(T_HELLO, body, F_NEED_BULK if need else 0)

    @staticmethod
    def _chunks(items: list[str]) -> list[bytes]:
        out: list[bytes] = []
        cur: list[str] = []
        size = 2
        for it in items:
            if cur and size + len(it) + 1 > MAX_BODY - 64:
                out.append(("[" + ",".join(cur) + "]").encode())
                cur, size = [], 2
            cur.append(it)
            size += len(it) + 1
        if cur:
            out.append(("[" + ",".join(cur) + "]").encode())
        return out

    @property
    def bulk_busy(self) -> bool:
        """A bulk is under way: still being made or sent."""
        return bool(self.bulk_out) or self.bulk_src is not None

    def _bulk_add(self, recs: list[dict[str, Any]]) -> None:
        self.bulk_out.extend(b'{"id":%d,"recs":%s}' % (self.bulk_id, c)
                             for c in self._chunks([_encode(r) for r in recs]))
        self.bulk_n += len(recs)

    def _bulk_more(self, now: float) -> None:
        """The next BULK_RECS_PER_TICK sessions of the bulk as records (those removed since it began
        are left out: their removal is queued and follows the bulk, as every change since does);
        after the last, the helpers' records and the end."""
        src = self.bulk_src
        assert src is not None
        part = src[self.bulk_pos:self.bulk_pos + BULK_RECS_PER_TICK]
        self.bulk_pos += len(part)
        recs = [enginestate.session_record(s, now) for s in part if not s.dead]
        if self.bulk_pos >= len(src):
            recs.extend(enginestate.export_helpers(self.engine, now))
            self.bulk_src = None
        self._bulk_add(recs)
        if self.bulk_src is None:
            self.bulk_out.append(b'{"id":%d,"end":%d}' % (self.bulk_id, self.bulk_n))

    def tick(self) -> None:
        """Send what is due: a bulk under way (a share of it, made as it goes), else the queued
        changes."""
        if self.role != "active":
            return
        now = self.clock()
        if self.bulk_wanted and not self.bulk_busy:
            self.bulk_wanted = False
            # (only a read of the engine: the data plane's reader threads go on forwarding while
            # the records are made)
            self._sync(hold=False)
            self.bulk_id += 1
            self.bulk_n = 0
            self.bulk_src, self.bulk_pos = list(self.engine.nat), 0
            leases = enginestate.export_leases(self.engine, now)
            self._bulk_add(leases)
            self.bulk_sent_at = time.monotonic()
            self.count("ha_resyncs_sent")
            # (the leases and sessions there now; the helpers' records come with the last part)
            self.log.info("ha_bulk_sending", bulk=self.bulk_id, entries=len(leases) + len(self.bulk_src))
        if self.bulk_src is not None and len(self.bulk_out) < BULK_PER_TICK:
            self._bulk_more(now)
        if self.bulk_busy:
            n = min(BULK_PER_TICK, len(self.bulk_out))
            for body in self.bulk_out[:n]:
                self._send(T_BULK_END if body.startswith(b'{"id":%d,"end"' % self.bulk_id) else T_BULK, body)
            del self.bulk_out[:n]
            return  # changes wait for the end of the bulk (it must not undo them)
        if not self.queue:
            return
        items, self.queue = self.queue, {}
        ops: list[str] = []
        for entry, op in items.items():
            rec = enginestate.record_of(self.engine, entry, now)
            if rec is None:
                continue
            if op == "u":
                ops.append(_encode(["u", rec]))
            else:
                ops.append(_encode(["d", rec, op[2:]]))
        for body in self._chunks(ops):
            self._send(T_UPDATE, body)

    # ------------------------------------------------------------------ receiving

    def received(self, data: bytes, addr: tuple[str, int]) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        self.count("ha_received_messages")
        self.count("ha_received_bytes", len(data))
        if addr[0] != self.peer[0]:
            self.drop("wrong_peer", peer)
            return
        try:
            typ, flags, boot, seq, fp, sent, body = unpack(self.key, data)
            if fp != self.fp:
                raise Dropped("config_mismatch")
            if boot < self.peer_boot or (boot == self.peer_boot and seq <= self.peer_seq):
                raise Dropped("replay")
            if boot > self.peer_boot:  # the peer (re)started: what we hold may be stale
                if self.peer_boot:
                    self.log.info("ha_peer_restarted", peer=peer)
                self.peer_boot, self.peer_seq = boot, seq - 1
                self.bulk_seen = 0
                self.bulk_sent_at = -1e9  # what we sent its last incarnation does not count
                if self.role != "active":
                    self.synced = False
                self.bulk_in = None
            if seq != self.peer_seq + 1:
                self.count("ha_gaps")
                self.bulk_in = None
                if self.role != "active":
                    self.synced = False
                    self._hello()  # asks for a full resync
            self.peer_seq = seq
            self.lag = max(0.0, time.time() - sent)
            self._handle(typ, flags, body)
        except Dropped as exc:
            self.drop(exc.reason, peer)

    def _parse(self, body: bytes) -> Any:
        try:
            return json.loads(body)
        except ValueError:
            raise Dropped("malformed") from None

    def _handle(self, typ: int, flags: int, body: bytes) -> None:
        if typ == T_HELLO:
            msg = self._parse(body)
            if not isinstance(msg, dict) or msg.get("role") not in ROLES:
                raise Dropped("malformed")
            role = str(msg["role"])
            if role != self.peer_role:
                self.log.info("ha_peer_role", role=role)
            self.peer_role = role
            self.peer_heard = time.monotonic()
            # a new bulk unless ours is still on its way (the peer has not seen it yet; after
            # a second it is taken as lost)
            seen = msg.get("bulk", 0)
            if flags & F_NEED_BULK and self.role == "active" and not self.bulk_busy \
                    and (seen == self.bulk_id or time.monotonic() - self.bulk_sent_at > 1.0):
                self.bulk_wanted = True
            return
        if self.role == "active":
            raise Dropped("not_backup")
        msg = self._parse(body)
        now = self.clock()
        if typ == T_UPDATE:
            if not isinstance(msg, list):
                raise Dropped("malformed")
            checked = []
            for op in msg:
                if not (isinstance(op, list) and op and op[0] in ("u", "d") and len(op) == (2 if op[0] == "u" else 3)
                        and (op[0] == "u" or isinstance(op[2], str))):
                    raise Dropped("malformed")
                try:
                    checked.append((op[0], enginestate.check(op[1]), op[2] if op[0] == "d" else ""))
                except enginestate.BadRecord:
                    raise Dropped("malformed") from None
            for kind, rec, reason in checked:
                if kind == "u":
                    self._apply(rec, now)
                else:
                    enginestate.forget(self.engine, rec, reason[:32])
            self.count("ha_applied_updates", len(checked))
            return
        if not isinstance(msg, dict) or type(msg.get("id")) is not int:
            raise Dropped("malformed")
        self.bulk_seen = msg["id"]
        b = self.bulk_in
        if b is None or b["id"] != msg["id"]:
            b = self.bulk_in = {"id": msg["id"], "keys": set(), "n": 0}
        if typ == T_BULK:
            recs = msg.get("recs")
            if not isinstance(recs, list):
                raise Dropped("malformed")
            try:
                bulk = [enginestate.check(r) for r in recs]
            except enginestate.BadRecord:
                raise Dropped("malformed") from None
            for r in bulk:
                self._apply(r, now)
                b["keys"].add(enginestate.key(r))
            b["n"] += len(bulk)
            return
        end = msg.get("end")
        if type(end) is not int:
            raise Dropped("malformed")
        self.bulk_in = None
        if b["n"] != end:  # a part was lost: ask again
            self.count("ha_bulk_incomplete")
            self._hello()
            return
        removed = enginestate.sweep(self.engine, b["keys"], now, "flush")
        self.synced = True
        self.count("ha_resyncs")
        self.log.info("ha_synced", entries=end, removed=removed)
        self._hello()

    def _apply(self, rec: dict[str, Any], now: float) -> None:
        why = enginestate.apply(self.engine, rec, now)
        if why is not None:
            self.count(f"ha_refused_{why}")


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, ha: HA) -> None:
        self.ha = ha

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.ha.received(data, addr)
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the sync
            self.ha.count("ha_errors")
            self.ha.log.error("ha_receive_failed", error=f"{type(exc).__name__}: {exc}")

    def error_received(self, exc: Exception) -> None:
        self.ha.count("ha_send_errors")
