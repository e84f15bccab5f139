"""The router between the LAN and WAN segments in an interop scenario.

`MasqdRouter` runs the real ``masqd run -c FILE`` process in ``{p}-fw`` in TAP
mode: masqd creates its TAP devices, moves them to ``{p}-sw`` and enslaves
them to ``br-lan`` / ``br-wan``, so masqd (and nothing else) carries traffic
between the segments. It is stopped by its PID; its log and masquerade table
are kept as evidence. `KernelRouter` is the reference stand-in (the kernel's
nftables masquerade in ``{p}-fw``) used to validate the harness itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from masqd.lab import FW_LAN, FW_WAN, ISP_WAN, Lab, stop_process

from .process import die_with_parent


class Router(Protocol):
    """What runs between the LAN and WAN segments during a scenario."""

    def start(self) -> None: ...

    def evidence(self) -> list[Path]: ...

    def stop(self) -> None: ...


@dataclass
class NoRouter:
    """Peers on one segment talk directly."""

    def start(self) -> None:
        pass

    def evidence(self) -> list[Path]:
        return []

    def stop(self) -> None:
        pass


@dataclass
class KernelRouter:
    """Reference: Linux forwarding + nftables masquerade (with the PPTP conntrack helper) in
    ``{p}-fw``, on masqd's own addresses, so the same peers run through it unchanged."""

    lab: Lab
    run_dir: Path

    def start(self) -> None:
        self.lab.kernel_router_up(replace_masqd=True, pptp_helper=True)

    def evidence(self) -> list[Path]:
        out = self.run_dir / "conntrack.txt"
        res = self.lab.exec("fw", ["conntrack", "-L"], check=False)
        out.write_text(res.stdout + res.stderr)
        return [out]

    def stop(self) -> None:
        pass


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(doc: Mapping[str, Mapping[str, Any]]) -> str:
    """Write a two-level document (sections of scalars / nested tables) as TOML."""
    lines: list[str] = []

    def section(name: str, body: Mapping[str, Any]) -> None:
        lines.append(f"[{name}]")
        subs = []
        for key, value in body.items():
            if isinstance(value, Mapping):
                subs.append((f"{name}.{key}", value))
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
        for sub_name, sub_body in subs:
            section(sub_name, sub_body)

    for name, body in doc.items():
        section(name, body)
    return "\n".join(lines)


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge, ``extra`` wins."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def masqd_command() -> list[str]:
    exe = Path(sys.executable).with_name("masqd")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("masqd")
    return [found] if found else [sys.executable, "-m", "masqd.cli"]


@dataclass
class MasqdRouter:
    """The real masqd process in ``{p}-fw``, TAP mode, its TAPs on the lab's bridges.

    Not :class:`masqd.lab.MasqdProcess`: the configuration is a dict merged per scenario,
    masqd's log, state and config stay in the run directory as evidence (the lab's own
    directory goes with the lab), and masqd dies with the harness (:func:`die_with_parent`).
    """

    lab: Lab
    run_dir: Path
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    last_snapshot: dict[str, Any] | None = None

    @property
    def lan_tap(self) -> str:
        return f"{self.lab.prefix}-mlan"

    @property
    def wan_tap(self) -> str:
        return f"{self.lab.prefix}-mwan"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "masqd.log"

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "masqd.sock"

    def config(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "lan": {
                "name": self.lan_tap,
                "mode": "tap",
                "address": f"{FW_LAN}/8",
                "netns": self.lab.ns("sw"),
                "bridge": "br-lan",
            },
            "wan": {
                "name": self.wan_tap,
                "mode": "tap",
                "address": f"{FW_WAN}/24",
                "gateway": ISP_WAN,
                "netns": self.lab.ns("sw"),
                "bridge": "br-wan",
            },
            "metrics": {"enabled": False},
            "logging": {"level": "debug", "format": "json"},
            "control": {"socket": str(self.socket_path)},
            "state": {"file": str(self.run_dir / "masqd.state")},
        }
        return merge(base, self.extra_config)

    @property
    def state_path(self) -> Path:
        return self.run_dir / "masqd-state.json"

    @property
    def ready_path(self) -> Path:
        return self.run_dir / "masqd.ready"

    def start(self, timeout: float = 15.0) -> None:
        cfg = self.run_dir / "masqd.toml"
        cfg.write_text(to_toml(self.config()))
        cmd = [*masqd_command(), "run", "-c", str(cfg), "--state-file", str(self.state_path),
               "--ready-file", str(self.ready_path)]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.ns("fw"), *cmd],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"masqd exited rc={self.proc.returncode} at start-up; log {self.log_path}:\n"
                    + self.log_path.read_text(errors="replace")[-1500:]
                )
            if (
                self.ready_path.exists()
                and self._enslaved(self.lan_tap, "br-lan")
                and self._enslaved(self.wan_tap, "br-wan")
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"masqd not ready (ready file, TAPs {self.lan_tap}/{self.wan_tap} on br-lan/br-wan "
            f"in {self.lab.ns('sw')}) after {timeout:.0f}s; log {self.log_path}"
        )

    def _enslaved(self, tap: str, bridge: str) -> bool:
        res = self.lab.exec("sw", ["ip", "-o", "link", "show", "dev", tap], check=False)
        return (
            res.returncode == 0
            and f"master {bridge}" in res.stdout
            and re.search(r"<[^>]*\bUP\b", res.stdout) is not None
        )

    def snapshot(self, timeout: float = 3.0) -> dict[str, Any] | None:
        """masqd's table and counters: SIGUSR1 makes it write its state file."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        before = self.state_path.stat().st_mtime_ns if self.state_path.exists() else 0
        os.kill(self.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state_path.exists() and self.state_path.stat().st_mtime_ns != before:
                time.sleep(0.05)
                try:
                    data = json.loads(self.state_path.read_text())
                except ValueError:
                    continue
                return data if isinstance(data, dict) else None
            time.sleep(0.05)
        return None

    def evidence(self) -> list[Path]:
        out = self.run_dir / "masqd-table.txt"
        try:
            snap = self.snapshot()
            self.last_snapshot = snap
            out.write_text(json.dumps(snap, indent=1, sort_keys=True) if snap else
                           "masqd wrote no state snapshot\n")  # fmt: skip
        except OSError as exc:
            out.write_text(f"could not read masqd's state: {exc}\n")
        return [self.log_path, out, self.state_path]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=5, group=True)
            self.proc = None
