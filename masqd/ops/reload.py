"""Configuration reload (SIGHUP or control socket): validate fully, then swap.

The file is re-read and validated in full by :func:`masqd.config.load` (TOML,
schema and every rule line). Only a config that passes reaches
``engine.reload(cfg)``, which swaps it in one step between two packets (the
run loop is single-threaded) and keeps the masquerade table. A bad file keeps
the running config: every error is logged with its file/line/key, the failure
is counted (``masqd_reloads_total{result="failure"}``) and
``masqd_config_last_reload_successful`` drops to 0 until a good reload.

Rule hit counters: the ruleset is rebuilt from the new text, so per-rule hit
counts restart at zero after a successful reload (rules are identified by
their position in the new text, and an edited list has no reliable mapping
to the old one). Engine counters (packets, drops, ESP, PPTP...) are kept.

Settings that name devices (interface names, modes, netns, bridges) cannot
change without recreating the devices; a reload that changes them is refused
with a message saying so, and the running config is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masqd import config as config_mod
from masqd.ops.metrics import OpsCounters

# Fields whose change needs the devices recreated (restart, not reload), by section.
_DEVICE_FIELDS = ("name", "mode", "netns", "bridge", "persistent", "offload")
_RESTART_FIELDS = {
    "lan": _DEVICE_FIELDS,
    "wan": _DEVICE_FIELDS,
    "dataplane": ("rps", "napi", "queues"),  # applied when the devices are opened
}


@dataclass
class ReloadResult:
    ok: bool
    source: str
    errors: list[str] = field(default_factory=list)
    config: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "source": self.source, "errors": list(self.errors)}


def restart_only_changes(old: Any, new: Any) -> list[str]:
    """Fields that differ between two configs and that a reload cannot apply."""
    out: list[str] = []
    for section, fields in _RESTART_FIELDS.items():
        a, b = getattr(old, section, None), getattr(new, section, None)
        for f in fields:
            if getattr(a, f, None) != getattr(b, f, None):
                out.append(f"{section}.{f}: changed from {getattr(a, f, None)!r} to {getattr(b, f, None)!r}; "
                           "this needs a restart, not a reload")
    return out


class Reloader:
    """Holds the config path and the running config; ``reload()`` does one attempt."""

    def __init__(
        self,
        path: str | Path | None,
        current: Any,
        apply: Callable[[Any], None],
        counters: OpsCounters,
        logger: Any,
        loader: Callable[[str | Path], Any] = config_mod.load,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.current = current
        self.apply = apply
        self.counters = counters
        self.log = logger
        self.loader = loader
        self.wall = wall
        self.counters.last_reload_time = wall()

    def reload(self, path: str | Path | None = None) -> ReloadResult:
        src = path if path is not None else self.path
        if src is None:
            return self._fail("<none>", ["no configuration file to reload (masqd was started without one)"])
        try:
            cfg = self.loader(src)
        except config_mod.ConfigError as exc:
            return self._fail(exc.source, list(exc.errors))
        except Exception as exc:  # a loader bug must not kill the router
            return self._fail(str(src), [f"unexpected error while loading: {type(exc).__name__}: {exc}"])
        problems = restart_only_changes(self.current, cfg)
        if problems:
            return self._fail(str(src), problems)
        try:
            self.apply(cfg)
        except Exception as exc:
            return self._fail(str(src), [f"engine refused the new config: {type(exc).__name__}: {exc}"])
        self.current = cfg
        self.counters.reloads_ok += 1
        self.counters.last_reload_ok = True
        self.counters.last_reload_time = self.wall()
        self.log.info("config_reloaded", source=str(src))
        return ReloadResult(True, str(src), config=cfg)

    def _fail(self, source: str, errors: list[str]) -> ReloadResult:
        self.counters.reloads_failed += 1
        self.counters.last_reload_ok = False
        for e in errors:
            self.log.error("config_reload_error", source=source, error=e)
        self.log.warning("config_reload_refused", source=source, errors=len(errors),
                         kept="running configuration")
        return ReloadResult(False, source, errors)
