"""Process life cycle of ``masqd run`` (top of the house: it wires the data plane and ops): open
devices, run one uvloop loop, shut down cleanly.

Order: devices are opened and placed first (synchronous pyroute2, no loop
yet), then the uvloop loop starts the data plane and, when available, the
ops services (metrics, control socket, SIGHUP reload, logging, pcap).
SIGTERM/SIGINT stop the loop; devices are closed on every path out.
SIGUSR1 writes a JSON snapshot (masquerade table, counters, neighbours) to
the ``state_file`` (also written once at exit), so scripts can read the
table without a control client.

The real state (``[state]``, :mod:`masqd.ops.statefile`): before the devices
open, ``run`` restores the state file into a fresh engine (timers shortened by
the time masqd was down; a refused file leaves one log line, a counter and an
empty table: a fresh engine, nothing half-loaded); the file is written again
at stop, on the control socket's ``save`` and every ``[state] interval``
seconds (the document is made in the loop, compressed and written in a worker
thread).

An active/backup pair (``[ha]``, :mod:`masqd.ops.ha`): masqd starts as the
standby (routes nothing, answers no ARP), syncs with its peer, and takes the
role keepalived gives it over the control socket (``role``).

Under systemd, readiness is told once the devices are up and the ops
services listen (``ops.ready()``: READY=1), and the stop as soon as it
begins (``ops.stopping()``: STOPPING=1); a start that fails leaves its
reason in STATUS= (see masqd.ops.sdnotify).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from masqd.dataplane.device import DeviceError
from masqd.dataplane.router import Dataplane
from masqd.engine import state as enginestate
from masqd.ops import statefile
from masqd.ops.runtime import start_ops

if TYPE_CHECKING:
    from masqd.config import Config
    from masqd.engine import Engine

log = logging.getLogger("masqd.dataplane")
slog = logging.getLogger("masqd.state")


def restore_state(cfg: Config, now: float | None = None, wall: float | None = None) -> Engine:
    """An engine for ``cfg`` holding what the state file kept, or an empty one (the file is
    missing, off, or refused: then one log line says why, counted in ``state_file_refused``
    and ``state_file_refused_<reason>``, and the file is moved aside to ``FILE.refused``)."""
    from masqd.engine import Engine

    engine = Engine(cfg)
    sc = cfg.state
    if not sc.enabled:
        return engine
    now = time.monotonic() if now is None else now
    wall = time.time() if wall is None else wall
    try:
        doc = statefile.read(sc.file, statefile.size_limit(cfg.masquerade.max_entries))
        if doc is None:
            slog.info("no state file at %s: starting with an empty table", sc.file)
            return engine
        down = max(0.0, wall - float(doc["saved_at"]))
        res = enginestate.load_document(engine, doc, now, down, cfg.wan.address_source == "control")
    except statefile.StateFileError as exc:
        reason, why = exc.reason, str(exc)
    except enginestate.BadRecord as exc:
        reason, why = "bad_record", f"a record this masqd cannot apply: {exc}"
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, start empty rather than half-loaded
        reason, why = "internal_error", f"{type(exc).__name__}: {exc}"
    else:
        restored = res.pop("restored", 0)
        engine.count("state_restored_entries", restored)
        for k, n in res.items():
            engine.count(f"state_refused_entries_{k}", n)
        engine.count("state_refused_entries", sum(res.values()))
        slog.info("state restored from %s: %d entries (down %.1f s)%s", sc.file, restored, down,
                  "; not restored: " + ", ".join(f"{k} {n}" for k, n in sorted(res.items())) if res else "")
        return engine
    engine = Engine(cfg)
    engine.count("state_file_refused")
    engine.count(f"state_file_refused_{reason}")
    aside = f"{sc.file}.refused"
    try:
        os.replace(sc.file, aside)
    except OSError:
        aside = ""
    slog.warning("state file %s refused (%s): %s; starting with an empty table%s", sc.file, reason, why,
                 f" (kept as {aside})" if aside else "")
    return engine


class StateSaver:
    """Writes the state file of a running data plane (stop, ``masqd save``, the interval)."""

    def __init__(self, dp: Dataplane, cfg: Config) -> None:
        self.dp = dp
        self.cfg = cfg  # the current configuration (ops' after a reload)
        self.busy = False

    def document(self) -> bytes:
        self.dp.sync_native(hold=False)  # (it reads the engine)
        return statefile.encode(enginestate.document(self.dp.engine, self.dp.clock()))

    def write(self, data: bytes, t0: float) -> dict[str, Any]:
        path = self.cfg.state.file
        statefile.write(path, data)
        self.dp.engine.count("state_saves")
        return {"path": path, "bytes": len(data), "seconds": round(time.monotonic() - t0, 3)}

    def save(self) -> dict[str, Any]:
        """Now, in the caller's thread; raises OSError when the file cannot be written."""
        t0 = time.monotonic()
        return self.write(self.document(), t0)

    async def save_async(self) -> dict[str, Any] | None:
        """Made in the loop, written in a worker thread; None when a save is under way."""
        if self.busy:
            return None
        self.busy = True
        try:
            t0 = time.monotonic()
            data = self.document()
            return await asyncio.get_running_loop().run_in_executor(None, self.write, data, t0)
        finally:
            self.busy = False

    async def periodic(self, current_cfg: Any) -> None:
        while True:
            sc = current_cfg().state
            await asyncio.sleep(sc.interval or 5.0)
            sc = current_cfg().state
            if not (sc.enabled and sc.interval):
                continue
            self.cfg = current_cfg()
            try:
                await self.save_async()
            except OSError as exc:
                self.dp.engine.count("state_save_errors")
                slog.warning("cannot write the state file %s: %s", sc.file, exc)


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


async def _serve(dp: Dataplane, cfg: Config, config_path: str | None, state_file: str | None,
                 ready_file: str | None, ha_key: bytes | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def dump() -> None:
        if state_file:
            try:
                _write_json(state_file, dp.snapshot())
            except OSError as exc:
                log.warning("cannot write state file %s: %s", state_file, exc)
        else:
            print(json.dumps(dp.snapshot(), default=str), flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump)
    saver = StateSaver(dp, cfg)
    dp.start(loop)
    ops = None
    ha: Any = None
    periodic: asyncio.Task[None] | None = None

    def current_cfg() -> Any:
        return ops.cfg if ops is not None else cfg

    def save_now() -> dict[str, Any]:
        saver.cfg = current_cfg()
        if not saver.cfg.state.enabled:
            raise ValueError("the state file is off ([state] enabled = false)")
        return saver.save()

    def counters() -> dict[str, int]:
        out = dict(dp.counters)
        if ha is not None:
            out.update(ha.counters())
        return out

    def set_role(role: str, by: str) -> dict[str, Any]:
        if ha is None:
            raise ValueError("the pair's sync is not running yet")
        return dict(ha.set_role(role, by))

    try:
        ops = await start_ops(
            dp.engine, cfg, config_path=config_path, now=dp.clock, on_reload=dp.on_reload,
            set_wan_address=dp.set_wan_address, extra_gauges=counters,
            sync=dp.sync_native, save_state=save_now,
            set_role=set_role if ha_key is not None else None,
            role=(lambda: ha.role if ha is not None else "starting") if ha_key is not None else None,
        )
        if ha_key is not None:
            from masqd.dataplane.device import open_alive_device
            from masqd.ops.ha import HA

            ha = HA(dp.engine, cfg, ha_key, clock=dp.clock, set_active=dp.set_active, sync=dp.sync_native,
                    log=ops.log, open_alive=open_alive_device)
            await ha.start()
        periodic = asyncio.create_task(saver.periodic(current_cfg), name="masqd-state-save")
        dp.set_capture(ops.capture)
        if ready_file:
            Path(ready_file).write_text(f"{os.getpid()}\n", encoding="utf-8")
        ops.ready()
        log.info("masqd running (pid %d)", os.getpid())
        await stop.wait()
        log.info("masqd stopping")
        ops.stopping()
    finally:
        if ha is not None:
            try:
                await ha.stop()
            except Exception:  # noqa: BLE001
                log.exception("ha shutdown failed")
        if periodic is not None:
            periodic.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await periodic
        dp.stop()
        saver.cfg = current_cfg()
        if saver.cfg.state.enabled:
            try:
                res = saver.save()
                slog.info("state saved to %s (%d bytes, %.3f s)", res["path"], res["bytes"], res["seconds"])
            except OSError as exc:
                slog.warning("cannot write the state file %s: %s", saver.cfg.state.file, exc)
        if ops is not None:
            try:
                await ops.stop()
            except Exception:  # noqa: BLE001
                log.exception("ops shutdown failed")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        if state_file:
            dump()


def _refuse(reason: str) -> int:
    """A start that fails: the reason on stderr and, under systemd, in the unit's STATUS=."""
    from masqd.ops.sdnotify import Notifier

    print(f"masqd: {reason}", file=sys.stderr)
    notify = Notifier.from_env()
    notify.status(f"failed to start: {reason}")
    notify.close()
    return 1


def run(cfg: Config, *, config_path: str | None = None, state_file: str | None = None,
        ready_file: str | None = None) -> int:
    """Run the router until SIGTERM/SIGINT. Returns the process exit status."""
    import uvloop

    from masqd.engine import Engine

    try:
        Engine(cfg)  # a configuration the engine refuses is refused before any state is read
    except Exception as exc:  # noqa: BLE001 - a refusal, not a traceback
        return _refuse(f"cannot start the engine: {exc}")
    ha_key = None
    if cfg.ha.enabled:
        from masqd.ops.ha import read_key

        try:
            ha_key = read_key(cfg.ha.key_file)
        except ValueError as exc:
            return _refuse(str(exc))
    engine = restore_state(cfg)
    dp = Dataplane(cfg, engine)
    if ha_key is not None:
        dp.set_active(False)  # a pair's member starts as the standby, silent
    try:
        dp.open()
    except DeviceError as exc:
        return _refuse(str(exc))
    loop = uvloop.new_event_loop()
    t0 = time.monotonic()
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(_serve(dp, cfg, config_path, state_file, ready_file, ha_key))
    finally:
        dp.close()
        loop.close()
        asyncio.set_event_loop(None)
        if ready_file:
            try:
                os.unlink(ready_file)
            except OSError:
                pass
    log.info("masqd stopped after %.1f s", time.monotonic() - t0)
    return 0
