"""keepalived's FIFO script for masqd: VRRP state changes become ``role`` requests, in order.

keepalived (``vrrp_notify_fifo FIFO`` + ``vrrp_notify_fifo_script``) starts
this program with the FIFO's path and writes one line per transition, e.g.
``INSTANCE "masqd" MASTER 150``. Each line becomes a ``role`` request on
masqd's control socket (MASTER -> active, BACKUP -> backup, FAULT -> fault,
STOP -> backup), sent one after the other, so masqd sees the transitions in
the order keepalived made them (separate notify scripts run concurrently and
may arrive out of order). When keepalived dies the FIFO reports end of file:
nobody decides any more, so masqd is told ``fault`` (it stops routing rather
than risk two active routers); the same when keepalived stops or ends this
script (SIGTERM, SIGHUP). Standard library only: it starts fast.

    python3 -m masqd.ops.keepalived SOCKET [FIFO]
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

STATES = {"MASTER": "active", "BACKUP": "backup", "FAULT": "fault", "STOP": "backup"}


def tell(sock_path: str, role: str, by: str, attempts: int = 20) -> bool:
    """Send ``role`` to masqd (retried for a while: masqd may be starting)."""
    req = json.dumps({"cmd": "role", "role": role, "by": by}).encode() + b"\n"
    for _ in range(attempts):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5.0)
                s.connect(sock_path)
                s.sendall(req)
                reply = s.makefile("rb").readline()
            return bool(json.loads(reply or b"{}").get("ok"))
        except (OSError, ValueError):
            time.sleep(0.1)
    return False


def role_of(line: str) -> str | None:
    parts = line.split()
    if len(parts) >= 3 and parts[0] == "INSTANCE":
        return STATES.get(parts[2])
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python3 -m masqd.ops.keepalived SOCKET [FIFO]", file=sys.stderr)
        return 2
    sock_path = args[0]
    fifo = args[-1] if len(args) > 1 else None
    # keepalived may hand us its own end of the FIFO: with it open, its death would never show
    os.closerange(3, 1 << 16)
    # keepalived stopping (or dying: its VRRP process ends its scripts) terminates us
    signal.signal(signal.SIGTERM, _gone)
    signal.signal(signal.SIGHUP, _gone)
    try:
        _follow(sock_path, fifo)
    except _Gone:
        pass
    tell(sock_path, "fault", "keepalived-gone", attempts=3)
    return 0


class _Gone(Exception):
    pass


def _gone(signum: int, frame: object) -> None:
    raise _Gone


def _follow(sock_path: str, fifo: str | None) -> None:
    stream = open(fifo, encoding="utf-8", errors="replace") if fifo else sys.stdin  # noqa: SIM115
    with stream:
        for line in stream:
            role = role_of(line)
            if role is not None and not tell(sock_path, role, "keepalived"):
                print(f"masqd-keepalived: masqd at {sock_path} did not take role {role}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
