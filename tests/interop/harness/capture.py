"""Captures on the lab's segments: tcpdump on a bridge of ``{p}-sw``, and reading its pcap back.

A scenario records the LAN and WAN segments as evidence (and as what the
checks read). tcpdump runs in its own session, bound to the harness, and is
stopped by its PID with SIGINT so the last frames reach the file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from masqd.lab import stop_process

from .process import die_with_parent


@dataclass
class Capture:
    """tcpdump writing one segment's frames (in ``{p}-sw``) to a pcap file."""

    ns: str
    iface: str
    path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Capture:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "tcpdump", "-i", self.iface, "-U", "-n", "-s", "256",
             "-w", str(self.path), "not", "arp", "and", "not", "ip6"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGINT),
        )  # fmt: skip
        # tcpdump reports "listening on" on stderr once the capture runs.
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 5
        os.set_blocking(self.proc.stderr.fileno(), False)
        buf = b""
        while time.monotonic() < deadline and b"listening" not in buf:
            chunk = self.proc.stderr.read() or b""
            buf += chunk
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tcpdump on {self.iface} exited: {buf.decode(errors='replace')}"
                )
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            time.sleep(0.2)  # let the last frames reach the file
            stop_process(self.proc, timeout=3, sig=signal.SIGINT, group=True)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None


def read_pcap_summary(path: Path, bpf: str) -> list[str]:
    """Lines `tcpdump -nr PATH BPF` prints (one per matching packet)."""
    if not path.exists():
        return []
    res = subprocess.run(["tcpdump", "-nr", str(path), bpf], capture_output=True, text=True)
    return [line for line in res.stdout.splitlines() if line.strip()]
