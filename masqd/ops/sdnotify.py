"""The sd_notify protocol: tell the service manager (systemd) our state over $NOTIFY_SOCKET.

A message is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX
SOCK_DGRAM socket named by ``$NOTIFY_SOCKET``: a file-system path, or a name
in the abstract namespace written with a leading ``@`` (sent with a NUL
byte in its place). masqd uses::

    READY=1                        devices up, control socket listening
    RELOADING=1 + MONOTONIC_USEC=  a reload begins (systemd >= 253 wants the
                                   CLOCK_MONOTONIC time in the same message)
    READY=1                        ... and ends (refused or applied)
    STOPPING=1                     shutdown begins
    WATCHDOG=1                     keep-alive, every half of $WATCHDOG_USEC
    STATUS=...                     one line shown by ``systemctl status``

Without ``$NOTIFY_SOCKET`` every call is a no-op, so masqd behaves the same
outside systemd. A send never blocks (MSG_DONTWAIT) and never raises: a
service manager that is gone or slow must not stop the router; failures are
counted in :attr:`Notifier.errors` and the last one kept for the log.

The watchdog settings follow sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` is
the interval systemd expects pings within, and when ``$WATCHDOG_PID`` is set
it must be our PID (otherwise the watchdog is meant for another process).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC= with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def socket_address(value: str) -> str | bytes:
    """The address to send to for a $NOTIFY_SOCKET value: a path, or bytes for ``@abstract``.

    Raises ValueError for anything else (systemd also knows ``vsock:`` addresses,
    which masqd does not speak).
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ValueError(f"NOTIFY_SOCKET={value!r}: only a socket path or an @abstract name is supported")


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when no watchdog is asked
    of this process (unset, zero, malformed, or $WATCHDOG_PID names another process)."""
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1e6


class Notifier:
    """Sends sd_notify messages to one socket; ``enabled`` is False (and sends do nothing) without one."""

    def __init__(self, address: str | None) -> None:
        self.address: str | bytes | None = None
        self.problem: str | None = None  # why an address that was given cannot be used
        self.errors = 0
        self.last_error: str | None = None
        self.sent = 0
        self._sock: socket.socket | None = None
        if address:
            try:
                self.address = socket_address(address)
            except ValueError as exc:
                self.problem = str(exc)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``lines`` (``"KEY=VALUE"`` each) as one message; True when the datagram went out."""
        if self.address is None:
            return False
        data = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self.address)
        except OSError as exc:
            self.errors += 1
            self.last_error = f"{exc.strerror or exc}"
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.split()),)  # one line: newlines would end the field
