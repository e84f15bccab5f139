"""Start and stop one User-Mode Linux guest whose network card is a host TAP device.

The guest's root is a cached image tree (:mod:`.images`) over hostfs,
read-only, with a private overlay made by the guest init. A per-guest host
folder is mounted at ``/peer`` in the guest; the harness writes ``run.sh``
there and reads back ``ready``, ``done``, ``result.txt`` and daemon logs.
The UML process runs inside the namespace that holds the TAP (the lab's
switch namespace), in its own session, and is stopped by its PID.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from masqd.lab import stop_process

from .process import die_with_parent

UML_BINARY = "linux.uml"


@dataclass
class UmlGuest:
    """One guest process. ``peer_dir`` is the host folder seen as /peer inside."""

    name: str
    image: Path
    netns: str
    tap: str
    peer_dir: Path
    mem_mb: int = 160
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    started_at: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def console_log(self) -> Path:
        return self.peer_dir / "console.log"

    def command(self) -> list[str]:
        umid = f"masqd-{self.tap}"
        return [
            "ip", "netns", "exec", self.netns, UML_BINARY,
            f"mem={self.mem_mb}M",
            f"umid={umid}",
            f"uml_dir={self.peer_dir / 'uml'}",
            "root=/dev/root", "rootfstype=hostfs", f"rootflags={self.image}", "ro",
            "init=/sbin/masqd-guest-init",
            f"masqd_peer={self.peer_dir}",
            f"vec0:transport=tap,ifname={self.tap}",
            "con0=null,fd:1", "con=null",
        ]  # fmt: skip

    def start(self) -> UmlGuest:
        if shutil.which(UML_BINARY) is None:
            raise RuntimeError(f"{UML_BINARY} not found: run scripts/interop-setup")
        if not (self.image / "sbin" / "masqd-guest-init").exists():
            raise RuntimeError(f"guest image {self.image} missing: run scripts/interop-setup")
        (self.peer_dir / "uml").mkdir(parents=True, exist_ok=True)
        out = self.console_log.open("wb")
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM),  # UML cleans up its helpers on TERM
            )
        finally:
            out.close()
        self.started_at = time.monotonic()
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the guest by PID (its process group); idempotent."""
        if self.proc is None:
            return
        stop_process(self.proc, timeout=timeout, group=True)
        shutil.rmtree(self.peer_dir / "uml", ignore_errors=True)
