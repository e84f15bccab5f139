"""The ops runtime: one object the run loop starts once, owning every ops service.

``ops = await start_ops(engine, cfg, config_path=...)`` starts, inside the
running loop: the metrics HTTP endpoint, the control socket, the SIGHUP
handler, the periodic drain of engine events into the log, a loop-lag probe,
and the pcap capture configured in ``[capture]``. ``await ops.stop()`` undoes
all of it. The data plane's per-packet contract is only::

    if ops.capture.active:
        ops.capture.record("lan" | "wan", packet_or_frame)

Hooks the data plane may pass: ``on_reload(cfg)`` (after the engine took the
new config), ``set_wan_address(iface_addr)`` (replaces the default, which
calls ``engine.set_wan_address``), ``extra_counters()`` (the data plane's own
counters, named like the engine's and exported the same way; ``extra_gauges``
is accepted as an alias), ``sync()`` (fold what the data plane counted outside
the engine into it: called before ops reads or changes the engine), ``now``
(the engine's clock, default ``time.monotonic``) and ``save_state()`` (write
the state file now, for the control socket's ``save``: returns what was
written, raises ValueError when the state file is off, OSError when it
cannot be written).

Under systemd (``$NOTIFY_SOCKET`` set) ops speaks sd_notify
(:mod:`masqd.ops.sdnotify`): the run loop calls :meth:`Ops.ready` once the
devices are up and :meth:`Ops.stopping` when it stops; every reload (SIGHUP
or control socket) is framed by RELOADING=1 and READY=1; a timer in this
loop sends WATCHDOG=1 every half of ``$WATCHDOG_USEC`` (a stuck loop stops
the pings, and systemd restarts masqd); STATUS= carries
:meth:`Ops.status_line`, refreshed every ``STATUS_INTERVAL`` seconds.

With ``wan.address_source = "interface:NAME"`` ops also runs the
:mod:`masqd.ops.wanwatch` thread, whose address changes take the same path as
the control socket's ``wan-address set``. With any source but "config", a
reload keeps the current (dynamic) WAN address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from masqd.ops import control as control_mod
from masqd.ops.control import ControlServer, RequestError
from masqd.ops.events import EventHub
from masqd.ops.logging import EngineEventLogger, configure, get_logger
from masqd.ops.metrics import (
    MasqdCollector,
    MetricsServer,
    OpsCounters,
    make_registry,
    parse_listen,
)
from masqd.ops.pcap import Capture
from masqd.ops.reload import Reloader, ReloadResult
from masqd.ops.sdnotify import Notifier, watchdog_interval
from masqd.ops.tablefilter import PROTO_NUMBERS, entry_matches, parse_filter
from masqd.ops.wanwatch import WanAddressFollower, WanWatcher

DRAIN_INTERVAL = 0.1
LAG_INTERVAL = 0.25
STATUS_INTERVAL = 5.0
_RX_PACKETS = re.compile(r"rx_(lan|wan)_[a-z0-9]+_packets")

_VERDICTS = {0: "ACCEPT", 1: "DENY", 2: "REJECT", 3: "MASQ"}


def rule_rows(engine: Any, now: float | None = None) -> list[dict[str, Any]] | None:
    """The engine's ruleset as rows (chain, num, rule text, packet/byte hits); None if it has none.

    ``num`` 0 is the chain's policy. A reload keeps the hit counters of the rules that stay.
    The mappings LAN hosts asked for (PCP / NAT-PMP) follow as chain "pcp": inbound forwarders
    like portfw lines, with their connections counted.
    """
    rs = getattr(engine, "rules", None)
    chains = getattr(rs, "chains", None)
    if not isinstance(chains, dict):
        return None
    rows: list[dict[str, Any]] = []
    for name, ch in chains.items():
        for i, r in enumerate(getattr(ch, "rules", [])):
            rows.append({"chain": name, "num": i + 1, "rule": str(r), "origin": getattr(r, "origin", ""),
                         "pkts": getattr(r, "pkts", 0), "bytes": getattr(r, "bytes", 0)})
        if getattr(ch, "policy", None) is not None:
            rows.append({"chain": name, "num": 0, "rule": f"policy {_VERDICTS.get(ch.policy, ch.policy)}",
                         "origin": getattr(ch, "policy_origin", ""),
                         "pkts": getattr(ch, "pkts", 0), "bytes": getattr(ch, "bytes", 0)})
    pcp = getattr(engine, "pcp", None)
    if pcp is not None and now is not None:
        rows.extend(pcp.rule_rows(now))
    return rows


class Ops:
    """See the module docstring."""

    def __init__(
        self,
        engine: Any,
        cfg: Any,
        *,
        config_path: str | Path | None = None,
        now: Callable[[], float] = time.monotonic,
        on_reload: Callable[[Any], None] | None = None,
        set_wan_address: Callable[[ipaddress.IPv4Interface], None] | None = None,
        extra_counters: Callable[[], Mapping[str, int]] | None = None,
        extra_gauges: Callable[[], Mapping[str, int]] | None = None,
        sync: Callable[..., None] | None = None,
        install_signal_handlers: bool = True,
        control_socket: str | None = None,
        metrics_listen: str | None = None,
        notifier: Notifier | None = None,
        role: Callable[[], str | None] | None = None,
        save_state: Callable[[], dict[str, Any]] | None = None,
        set_role: Callable[[str, str], dict[str, Any]] | None = None,
    ) -> None:
        self.engine = engine
        self.cfg = cfg
        self.now = now
        self.counters = OpsCounters()
        self.log = get_logger("masqd")
        self.events = EngineEventLogger(cfg.logging.rate_per_event, self.counters)
        self.capture = Capture(self.counters)
        self.event_hub = EventHub(engine, self.counters.events, now, log=self.log)
        self._extra_given = extra_counters or extra_gauges
        self._sync = sync
        self.wanwatch_counters: dict[str, int] = {}
        self.wanwatch: WanWatcher | None = None
        self.collector = MasqdCollector(self.read_engine, self.counters, self._extra_counters)
        self.registry = make_registry(self.collector)
        self.metrics: MetricsServer | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.control: ControlServer | None = None
        self._on_reload = on_reload
        self._set_wan = set_wan_address
        self._extra = self._extra_counters
        self._signals = install_signal_handlers
        self._control_path = control_socket or cfg.control.socket
        self._metrics_listen = metrics_listen or cfg.metrics.listen
        self._tasks: list[asyncio.Task[None]] = []
        self.reloader = Reloader(config_path, cfg, self._apply, self.counters, self.log)
        self.notify = notifier if notifier is not None else Notifier.from_env()
        self._role = role
        self._save_state = save_state
        self._set_role = set_role
        self._status_sent: str | None = None
        self._stopping = False

    def synced_engine(self) -> Any:
        """The engine, with what the data plane counted outside it folded in, for a caller that
        changes it next (the data plane's reader threads wait until this loop iteration ends)."""
        if self._sync is not None:
            self._sync()
        return self.engine

    def read_engine(self) -> Any:
        """The same for a caller that only reads it: the reader threads go on at once."""
        if self._sync is not None:
            self._sync(hold=False)
        return self.engine

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        cfg = self.cfg
        if cfg.metrics.enabled:
            host, port = parse_listen(self._metrics_listen)
            self.metrics = MetricsServer(self.registry, cfg.metrics.path)
            self.metrics_address = await self.metrics.start(host, port)
            self.log.info("metrics_listening", address=f"{self.metrics_address[0]}:{self.metrics_address[1]}",
                          path=cfg.metrics.path)
        self.control = ControlServer(self._control_path, self.handlers(), self.counters, self.log,
                                     streams={"events": self._s_events})
        await self.control.start()
        self.log.info("control_listening", socket=self._control_path)
        for side in ("lan", "wan"):
            path = getattr(cfg.capture, side)
            if path:
                self.capture.start(side, path, getattr(cfg, side).mode)
                self.log.info("capture_started", iface=side, path=path)
        loop = asyncio.get_running_loop()
        if self._signals:
            loop.add_signal_handler(signal.SIGHUP, self._sighup)
        self._tasks.append(asyncio.create_task(self._drain_loop(), name="masqd-ops-drain"))
        self._tasks.append(asyncio.create_task(self._lag_loop(), name="masqd-ops-lag"))
        self._start_notify()
        self._start_wanwatch(cfg)

    def _extra_counters(self) -> dict[str, int]:
        out = dict(self._extra_given()) if self._extra_given is not None else {}
        for k, v in self.wanwatch_counters.items():
            out[k] = out.get(k, 0) + v
        return out

    def _start_wanwatch(self, cfg: Any) -> None:
        ifname = getattr(cfg.wan, "address_interface", None)
        if ifname is None:
            return
        follower = WanAddressFollower(ifname, self.set_wan_address, lambda: getattr(self.engine, "wan_if", None),
                                      self.log, self.wanwatch_counters)
        self.wanwatch = WanWatcher(ifname, asyncio.get_running_loop(), follower)
        self.wanwatch.start()
        self.log.info("wan_address_source", source=cfg.wan.address_source,
                      address=str(getattr(self.engine, "wan_if", None)))

    def _stop_wanwatch(self) -> None:
        if self.wanwatch is not None:
            if not self.wanwatch.stop():
                self.log.warning("wanwatch_stop_timeout", interface=self.wanwatch.ifname)
            self.wanwatch = None

    async def stop(self) -> None:
        self.stopping()
        self._stop_wanwatch()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self._signals:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        self.drain()
        self.events.flush_suppressed()
        self.capture.stop()
        self.event_hub.close_all()
        if self.control is not None:
            await self.control.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        self.notify.close()

    def drain(self) -> int:
        """Log what the engine recorded since the last call (also called by the run loop if it likes)."""
        return self.events.drain(self.engine)

    async def _drain_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(DRAIN_INTERVAL)
            try:
                self.drain()
                ticks += 1
                if ticks % 10 == 0:
                    self.capture.flush()
                if ticks % 50 == 0:
                    self.events.flush_suppressed()
            except Exception as exc:  # logging must never take the router down
                self.log.error("ops_drain_failed", error=f"{type(exc).__name__}: {exc}")

    async def _lag_loop(self) -> None:
        lat = self.counters.loop_latency
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(LAG_INTERVAL)
            lat.observe(max(0.0, time.monotonic() - t0 - LAG_INTERVAL))

    # ------------------------------------------------------------------ service manager (sd_notify)

    def _start_notify(self) -> None:
        if self.notify.problem is not None:
            self.log.warning("sd_notify_unusable", error=self.notify.problem)
        if not self.notify.enabled:
            return
        interval = watchdog_interval()
        if interval is not None:
            self._tasks.append(asyncio.create_task(self._watchdog_loop(interval), name="masqd-ops-watchdog"))
        self._tasks.append(asyncio.create_task(self._status_loop(), name="masqd-ops-status"))
        self.log.info("sd_notify", socket=os.environ.get("NOTIFY_SOCKET"),
                      watchdog_interval=interval)

    def ready(self) -> None:
        """The router is up (devices, control socket): READY=1 with the first STATUS=."""
        self._status_sent = self.status_line()
        if not self.notify.ready(self._status_sent) and self.notify.enabled:
            self.log.warning("sd_notify_failed", message="READY=1", error=self.notify.last_error)

    def stopping(self) -> None:
        """Shutdown has begun: STOPPING=1 (once)."""
        if not self._stopping:
            self._stopping = True
            self.notify.stopping("stopping")

    def status_line(self) -> str:
        """One line for ``systemctl status``: entries, packets received per side, WAN address, role."""
        rx = {"lan": 0, "wan": 0}
        for k, v in self._all_counters().items():
            m = _RX_PACKETS.fullmatch(k)
            if m:
                rx[m.group(1)] += v
        wan = getattr(self.engine, "wan_if", None)
        if wan is None and isinstance(getattr(self.engine, "wan_ip", None), int):
            wan = ipaddress.IPv4Address(self.engine.wan_ip)
        parts = [f"entries {self._entry_count()}", f"packets in: lan {rx['lan']}, wan {rx['wan']}",
                 f"WAN {wan if wan is not None else 'none'}"]
        role = self._role() if self._role is not None else None
        if role:
            parts.append(f"role {role}")
        if not self.counters.last_reload_ok:
            parts.append("last reload refused (running config kept)")
        return "; ".join(parts)

    async def _watchdog_loop(self, interval: float) -> None:
        # In the packet loop itself: a loop that stops turning stops the pings.
        while True:
            self.notify.watchdog()
            await asyncio.sleep(interval)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            try:
                line = self.status_line()
            except Exception as exc:  # a status line must never take the router down
                self.log.error("status_line_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            if line != self._status_sent:
                self._status_sent = line
                self.notify.status(line)

    # ------------------------------------------------------------------ reload

    def reload(self) -> ReloadResult:
        """One reload attempt (SIGHUP, control socket), framed by RELOADING=1 / READY=1."""
        self.notify.reloading("reloading configuration")
        try:
            return self.reloader.reload()
        finally:
            self._status_sent = self.status_line()
            self.notify.ready(self._status_sent)

    def _sighup(self) -> None:
        self.log.info("sighup_received")
        self.reload()

    def _apply(self, cfg: Any) -> None:
        cur = getattr(self.engine, "wan_if", None)
        if cfg.wan.address_source != "config" and cur is not None and cfg.wan.address != cur:
            # the address is dynamic: the config's is only the start value; keep the live one
            cfg = cfg.model_copy(update={"wan": cfg.wan.model_copy(update={"address": cur})})
        old_source = self.cfg.wan.address_source
        self.synced_engine().reload(cfg)
        self.cfg = cfg
        self.events.set_rate(cfg.logging.rate_per_event)
        if self._on_reload is not None:
            self._on_reload(cfg)
        if cfg.wan.address_source != old_source:
            self._stop_wanwatch()
            self._start_wanwatch(cfg)

    # ------------------------------------------------------------------ control handlers

    def handlers(self) -> dict[str, control_mod.Handler]:
        return {
            "ping": self._h_ping,
            "table": self._h_table,
            "stats": self._h_stats,
            "rules": self._h_rules,
            "flush": self._h_flush,
            "wan-address": self._h_wan_address,
            "reload": self._h_reload,
            "capture": self._h_capture,
            "save": self._h_save,
            "role": self._h_role,
        }

    def _h_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "uptime": time.time() - self.counters.started}

    def _h_table(self, req: dict[str, Any]) -> Any:
        """The table's rows (filtered); with ``count``: {"count": how many}."""
        flt = req.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise RequestError("table: 'filter' must be a string")
        f = parse_filter(flt or "")
        if req.get("count") and not f:
            self.read_engine()
            return {"count": self._entry_count()}
        entries = list(self.read_engine().table(self.now()))
        if f:
            entries = [e for e in entries if entry_matches(e, f)]
        return {"count": len(entries)} if req.get("count") else entries

    def _s_events(self, req: dict[str, Any]) -> control_mod.StreamRun:
        """``events``: a listener of the table's changes (filter, events, format) until the client goes."""
        lst = self.event_hub.open(req)
        self.log.info("events_listener", filter=lst.flt or None, events=sorted(lst.kinds) or None,
                      format="json" if lst.json else "text")

        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.event_hub.run(lst, reader, writer)

        return run

    def _h_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self.counters
        wan = getattr(self.engine, "wan_ip", None)
        limits = getattr(self.engine, "host_limits", None)
        return {
            "host_limits": limits(self.now()) if callable(limits) else None,
            "counters": self._all_counters(),
            "entries": self._entry_count(),
            "wan_address": str(ipaddress.IPv4Address(wan)) if isinstance(wan, int) else None,
            "reloads": {"success": c.reloads_ok, "failure": c.reloads_failed},
            "control_errors": dict(c.control_errors),
            "log_suppressed": dict(c.log_suppressed),
            "capture": self.capture.status(),
            "events": dict(c.events),
        }

    def _entry_count(self) -> int:
        """Entries in the table without building it (a million-entry table takes seconds to list,
        and the loop forwards nothing meanwhile): sessions plus the helpers' and forwarders' own."""
        eng, now = self.engine, self.now()
        if not hasattr(eng, "nsessions"):
            return len(eng.table(now))
        n = int(eng.nsessions)
        for h in getattr(eng, "helpers", ()):
            n += len(h.entries(now))
        fw = getattr(eng, "forwarders", None)
        pcp = getattr(eng, "pcp", None)
        return n + (len(fw.entries(now)) if fw is not None else 0) + (len(pcp.entries(now)) if pcp is not None else 0)

    def _all_counters(self) -> dict[str, int]:
        out = dict(getattr(self.read_engine(), "counters", {}) or {})
        if self._extra is not None:
            for k, v in self._extra().items():
                out[k] = out.get(k, 0) + v
        return out

    def _h_rules(self, req: dict[str, Any]) -> Any:
        rows = rule_rows(self.read_engine(), self.now())
        if rows is None:
            return [{"chain": "", "num": i + 1, "rule": line, "pkts": None, "bytes": None}
                    for i, line in enumerate(x for x in self.cfg.firewall.rules.splitlines() if x.strip())]
        return rows

    def _h_flush(self, req: dict[str, Any]) -> dict[str, Any]:
        flt = req.get("filter") or ""
        if not isinstance(flt, str):
            raise RequestError("flush: 'filter' must be a string")
        f = parse_filter(flt)
        extra = sorted(set(f) - {"proto", "lan"})
        if extra:
            raise RequestError(f"flush: the engine removes entries by proto and lan only, not {', '.join(extra)}")
        kw: dict[str, int] = {}
        if "proto" in f:
            num = PROTO_NUMBERS.get(f["proto"], f["proto"])
            if not str(num).isdigit() or not 0 <= int(num) <= 255:
                raise RequestError(f"flush: unknown protocol {f['proto']!r}")
            kw["proto"] = int(num)
        if "lan" in f:
            try:
                kw["lan_ip"] = int(ipaddress.IPv4Address(f["lan"].rsplit(":", 1)[0]))
            except ValueError:
                raise RequestError(f"flush: lan={f['lan']!r} is not an IPv4 address") from None
        n = self.synced_engine().flush(**kw)
        self.log.info("table_flushed", filter=flt or "all", removed=n)
        return {"removed": n}

    def _h_wan_address(self, req: dict[str, Any]) -> dict[str, Any]:
        action = req.get("action", "set")
        if action != "set":
            raise RequestError("wan-address: only action 'set' exists")
        raw = req.get("address")
        if not isinstance(raw, str) or not raw:
            raise RequestError("wan-address set: needs 'address' (A.B.C.D or A.B.C.D/LEN)")
        try:
            if "/" not in raw:
                raw = f"{raw}/{self.cfg.wan.address.network.prefixlen}"
            addr = ipaddress.IPv4Interface(raw)
        except ValueError as exc:
            raise RequestError(f"wan-address set: {exc}") from None
        try:
            self.set_wan_address(addr, "control")
        except ValueError as exc:
            raise RequestError(f"wan-address set: {exc}") from None
        return {"address": str(addr)}

    def set_wan_address(self, addr: ipaddress.IPv4Interface, by: str) -> None:
        """Change the WAN address (control socket, followed interface): engine, L2, counters, log.

        Raises ValueError for an address that cannot be the WAN address.
        """
        if addr.ip.is_multicast or addr.ip.is_unspecified or addr.ip.is_loopback \
                or addr.ip == addr.network.broadcast_address:
            raise ValueError(f"{addr.ip} cannot be a host address")
        if addr.network.overlaps(self.cfg.lan.address.network):
            raise ValueError(f"{addr} overlaps the LAN network")
        old = getattr(self.engine, "wan_if", None)
        if self._set_wan is not None:
            self._set_wan(addr)
        else:
            self.engine.set_wan_address(addr, self.now())
        self.counters.wan_address_set += 1
        self.log.info("wan_address_set", address=str(addr), old=str(old) if old is not None else None, by=by)

    def _h_reload(self, req: dict[str, Any]) -> dict[str, Any]:
        res = self.reload()
        if not res.ok:
            raise RequestError("reload refused, running configuration kept:\n" + "\n".join(
                f"{res.source}: {e}" for e in res.errors), "reload_failed")
        return res.as_dict()

    def _h_save(self, req: dict[str, Any]) -> dict[str, Any]:
        if self._save_state is None:
            raise RequestError("save: this masqd keeps no state file")
        try:
            res = self._save_state()
        except ValueError as exc:
            raise RequestError(f"save: {exc}") from None
        except OSError as exc:
            raise RequestError(f"save: cannot write the state file: {exc.strerror or exc}", "save_failed") from None
        self.log.info("state_saved", path=res.get("path"), bytes=res.get("bytes"), seconds=res.get("seconds"),
                      by="control")
        return res

    def _h_role(self, req: dict[str, Any]) -> dict[str, Any]:
        if self._set_role is None:
            raise RequestError("role: this masqd is not one of an active/backup pair ([ha] enabled = false)")
        role = req.get("role")
        if role is None:  # a question, not an order
            return {"role": self._role() if self._role is not None else None}
        by = req.get("by", "control")
        if not isinstance(role, str) or not isinstance(by, str):
            raise RequestError("role: 'role' and 'by' must be strings")
        try:
            return self._set_role(role, by[:32])
        except ValueError as exc:
            raise RequestError(f"role: {exc}") from None

    def _h_capture(self, req: dict[str, Any]) -> Any:
        action = req.get("action", "status")
        if action == "status":
            return self.capture.status()
        iface = req.get("iface")
        if action == "stop":
            if iface is not None and iface not in ("lan", "wan"):
                raise RequestError("capture stop: iface must be lan or wan")
            done = self.capture.stop(iface)
            for k, n in done.items():
                self.log.info("capture_stopped", iface=k, packets=n)
            return done
        if action != "start":
            raise RequestError("capture: action must be start, stop or status")
        if iface not in ("lan", "wan"):
            raise RequestError("capture start: iface must be lan or wan")
        path = req.get("path")
        if not isinstance(path, str) or not path:
            raise RequestError("capture start: needs 'path'")
        try:
            w = self.capture.start(iface, path, getattr(self.cfg, iface).mode)
        except OSError as exc:
            raise RequestError(f"capture start: cannot write {path}: {exc.strerror or exc}") from None
        self.log.info("capture_started", iface=iface, path=path)
        return {"iface": iface, "path": path, "linktype": w.linktype}


async def start_ops(engine: Any, cfg: Any, **kw: Any) -> Ops:
    """Create and start the ops services in the running loop; ``await ops.stop()`` at exit."""
    ops = Ops(engine, cfg, **kw)
    await ops.start()
    return ops


def setup_logging(cfg: Any) -> str:
    """Configure structlog from ``cfg.logging``; returns "json" or "console"."""
    return configure(cfg.logging.level, cfg.logging.format)
