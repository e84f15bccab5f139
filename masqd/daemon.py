"""Process life cycle of ``masqd run`` (top of the house: it wires the data plane and ops): open
devices, run one uvloop loop, shut down cleanly.

Order: devices are opened and placed first (synchronous pyroute2, no loop
yet), then the uvloop loop starts the data plane and, when available, the
ops services (metrics, control socket, SIGHUP reload, logging, pcap).
SIGTERM/SIGINT stop the loop; devices are closed on every path out.
SIGUSR1 writes a JSON snapshot (masquerade table, counters, neighbours) to
the ``state_file`` (also written once at exit), so scripts can read the
table without a control client.

Under systemd, readiness is told once the devices are up and the ops
services listen (``ops.ready()``: READY=1), and the stop as soon as it
begins (``ops.stopping()``: STOPPING=1); a start that fails leaves its
reason in STATUS= (see masqd.ops.sdnotify).
"""

from __future__ import annotations

import asyncio
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
from masqd.ops.runtime import start_ops

if TYPE_CHECKING:
    from masqd.config import Config

log = logging.getLogger("masqd.dataplane")


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


async def _serve(dp: Dataplane, cfg: Config, config_path: str | None, state_file: str | None,
                 ready_file: str | None) -> None:
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
    dp.start(loop)
    ops = None
    try:
        ops = await start_ops(
            dp.engine, cfg, config_path=config_path, now=dp.clock, on_reload=dp.on_reload,
            set_wan_address=dp.set_wan_address, extra_gauges=lambda: dict(dp.counters),
            sync=dp.sync_native,
        )
        dp.set_capture(ops.capture)
        if ready_file:
            Path(ready_file).write_text(f"{os.getpid()}\n", encoding="utf-8")
        ops.ready()
        log.info("masqd running (pid %d)", os.getpid())
        await stop.wait()
        log.info("masqd stopping")
        ops.stopping()
    finally:
        dp.stop()
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
        engine = Engine(cfg)
    except Exception as exc:  # noqa: BLE001 - a refusal, not a traceback
        return _refuse(f"cannot start the engine: {exc}")
    dp = Dataplane(cfg, engine)
    try:
        dp.open()
    except DeviceError as exc:
        return _refuse(str(exc))
    loop = uvloop.new_event_loop()
    t0 = time.monotonic()
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(_serve(dp, cfg, config_path, state_file, ready_file))
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
