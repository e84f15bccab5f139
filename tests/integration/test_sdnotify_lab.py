"""The real masqd process tells a service manager its state: sd_notify messages in order.

masqd runs in the lab's ``{p}-fw`` namespace with ``$NOTIFY_SOCKET`` naming a
datagram socket this test owns (a path: a socket file works across network
namespaces, as systemd's /run/systemd/notify does) and ``$WATCHDOG_USEC`` set,
as systemd would start it with ``Type=notify`` and ``WatchdogSec=``.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from masqd.lab import SRV1, Lab
from masqd.ops.control import request

pytestmark = pytest.mark.integration

WATCHDOG_USEC = 1_000_000  # systemd's WatchdogSec=1s: masqd pings every 0.5 s


class Manager:
    """The service manager's end: every datagram with its arrival time, read in a thread."""

    def __init__(self, path: Path, on_ready: Callable[[], object]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self.at_ready: object = None
        self._on_ready = on_ready
        self._run = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._run:
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            if msg.startswith("READY=1") and self.at_ready is None:
                self.at_ready = self._on_ready()  # what the world looks like when masqd says ready
            self.messages.append((time.monotonic(), msg))

    def wait_for(self, pred: Callable[[str], bool], timeout: float, after: int = 0) -> int:
        """Index of the first message from ``after`` on that satisfies ``pred``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(after, len(self.messages)):
                if pred(self.messages[i][1]):
                    return i
            time.sleep(0.02)
        raise AssertionError(f"no such message within {timeout} s: {[m for _, m in self.messages[after:]]}")

    def close(self) -> None:
        self._run = False
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def lab(own_lab: Callable[[str, str], Lab]) -> Lab:
    return own_lab("tap", "n")


@pytest.fixture
def manager(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    p = lab.prefix

    def devices_now() -> str:
        return lab.exec("sw", ["ip", "-o", "link", "show"]).stdout + f"\n(devices {p}-lan {p}-wan)"

    mgr = Manager(tmp_path / "notify", devices_now)
    monkeypatch.setenv("NOTIFY_SOCKET", str(mgr.path))
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield mgr
    mgr.close()


def test_ready_watchdog_reload_status_stop_in_order(lab: Lab, manager: Manager) -> None:
    p = lab.prefix
    m = lab.start_masqd()
    try:
        ready = manager.wait_for(lambda s: s.startswith("READY=1"), 10)
        # READY=1 came once both devices were up on their bridges
        seen = str(manager.at_ready)
        assert f"{p}-lan" in seen and f"{p}-wan" in seen, seen
        assert "master br-lan" in seen and "master br-wan" in seen, seen
        assert "\nSTATUS=entries 0; packets in: lan 0, wan 0; WAN 203.0.113.200/24" in \
            manager.messages[ready][1], manager.messages[ready]

        # watchdog pings at half of WATCHDOG_USEC, never a gap the service manager would act on
        time.sleep(3.0)
        pings = [t for t, s in manager.messages if s == "WATCHDOG=1"]
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert len(pings) >= 5, manager.messages
        assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
        assert 0.4 < sum(gaps) / len(gaps) < 0.7, gaps

        # traffic shows in the STATUS line within a refresh period (5 s)
        lab.exec("lan2", ["ping", "-c", "2", "-i", "0.2", "-W", "2", SRV1])
        n = len(manager.messages)
        st = manager.wait_for(lambda s: s.startswith("STATUS=") and "packets in: lan 0," not in s, 7, n)
        line = manager.messages[st][1]
        assert "entries 1;" in line and "WAN 203.0.113.200/24" in line, line

        # SIGHUP: RELOADING=1 (with the monotonic time) then READY=1
        n = len(manager.messages)
        os.kill(m.pid, signal.SIGHUP)
        rel = manager.wait_for(lambda s: s.startswith("RELOADING=1"), 5, n)
        assert "\nMONOTONIC_USEC=" in manager.messages[rel][1]
        again = manager.wait_for(lambda s: s.startswith("READY=1"), 5, rel)
        assert "last reload refused" not in manager.messages[again][1]

        # the control socket's reload is framed the same way
        n = len(manager.messages)
        request(f"/run/masqd/{p}.sock", {"cmd": "reload"})
        rel = manager.wait_for(lambda s: s.startswith("RELOADING=1"), 5, n)
        manager.wait_for(lambda s: s.startswith("READY=1"), 5, rel)
    finally:
        n = len(manager.messages)
        rc = m.stop()
    assert rc == 0, m.log()
    stop = manager.wait_for(lambda s: s.startswith("STOPPING=1"), 2, n)
    time.sleep(0.6)
    assert [s for _, s in manager.messages[stop + 1:]] == [], "messages after STOPPING=1"
    order = [s.split("\n")[0].split("=")[0] for _, s in manager.messages if not s.startswith(("WATCHDOG", "STATUS"))]
    assert order == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"], order


def test_start_failure_leaves_its_reason_in_status(lab: Lab, manager: Manager) -> None:
    cfg = lab.masqd_config().replace('bridge = "br-lan"', 'bridge = "br-none"')
    assert "br-none" in cfg
    from masqd.lab import LabError

    with pytest.raises(LabError):
        lab.start_masqd(cfg, timeout=10)
    st = manager.wait_for(lambda s: s.startswith("STATUS="), 2)
    assert "failed to start" in manager.messages[st][1] and "br-none" in manager.messages[st][1]
    assert not any(s.startswith("READY=1") for _, s in manager.messages)
