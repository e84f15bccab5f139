"""sd_notify: the messages reach a real AF_UNIX datagram listener (path and abstract name), and
the ops runtime sends them at the right moments (ready, watchdog pings, reload, stop)."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from masqd.ops.logging import configure
from masqd.ops.runtime import Ops
from masqd.ops.sdnotify import Notifier, monotonic_usec, socket_address, watchdog_interval

from .fake_engine import FakeEngine

BASE = """
[lan]
address = "10.0.0.1/8"
[wan]
address = "203.0.113.200/24"
gateway = "203.0.113.1"
[control]
socket = "{sock}"
[metrics]
listen = "127.0.0.1:0"
"""


class Listener:
    """What systemd does: a datagram socket bound to the name in $NOTIFY_SOCKET."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(name))

    def recv(self, timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def collect(self) -> None:
        """Read in a thread from now on, as systemd does (the kernel queues only a few datagrams:
        net.unix.max_dgram_qlen, 10 by default)."""
        self.messages: list[str] = []
        self.sock.settimeout(0.05)
        self._run = True

        def reader() -> None:
            while self._run:
                try:
                    self.messages.append(self.sock.recv(4096).decode())
                except TimeoutError:
                    continue

        self._thread = threading.Thread(target=reader, daemon=True)
        self._thread.start()

    def collected(self) -> list[str]:
        time.sleep(0.1)
        self._run = False
        self._thread.join(2)
        return self.messages

    def close(self) -> None:
        self._run = False
        self.sock.close()


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[Listener]:
    lst = Listener(str(tmp_path / "notify"))
    yield lst
    lst.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    lst = Listener(f"@masqd-test-notify-{os.getpid()}-{time.monotonic_ns()}")
    yield lst
    lst.close()


def test_ready_with_status_reaches_a_path_socket(path_listener: Listener) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": path_listener.name})
    assert n.enabled
    assert n.ready("3 entries\nsecond line")
    assert path_listener.recv() == "READY=1\nSTATUS=3 entries second line"
    assert n.sent == 1 and n.errors == 0
    n.close()


def test_abstract_namespace_name(abstract_listener: Listener) -> None:
    assert isinstance(socket_address(abstract_listener.name), bytes)
    n = Notifier(abstract_listener.name)
    assert n.watchdog() and n.stopping("bye")
    assert abstract_listener.recv() == "WATCHDOG=1"
    assert abstract_listener.recv() == "STOPPING=1\nSTATUS=bye"
    n.close()


def test_reloading_carries_the_monotonic_time(path_listener: Listener) -> None:
    n = Notifier(path_listener.name)
    before = monotonic_usec()
    n.reloading()
    after = monotonic_usec()
    lines = path_listener.recv().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after
    # the same clock as systemd's: CLOCK_MONOTONIC, which time.monotonic() reads on Linux
    assert abs(int(value) / 1e6 - time.monotonic()) < 5


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier.from_env({})
    assert not n.enabled and n.problem is None
    assert not n.ready("x") and n.sent == 0 and n._sock is None


def test_unusable_address_is_reported_not_raised() -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled and "vsock:2:1234" in (n.problem or "")
    assert not n.ready()


def test_gone_listener_is_counted_not_raised(tmp_path: Path) -> None:
    lst = Listener(str(tmp_path / "gone"))
    n = Notifier(lst.name)
    lst.close()
    os.unlink(lst.name)
    assert not n.ready()
    assert n.errors == 1 and n.last_error


def test_full_listener_never_blocks_the_sender(path_listener: Listener) -> None:
    n = Notifier(path_listener.name)
    t0 = time.monotonic()
    results = [n.watchdog() for _ in range(5000)]  # nobody reads: the queue fills up
    assert time.monotonic() - t0 < 5
    assert results[0] and not results[-1] and n.errors > 0
    n.close()


@pytest.mark.parametrize(("env", "interval"), [
    ({}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "junk"}, None),
    ({"WATCHDOG_USEC": "3000000"}, 1.5),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "4242"}, 1.5),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "4243"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "x"}, None),
])
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert watchdog_interval(env, pid=4242) == interval


def test_ops_ready_watchdog_reload_stop(tmp_path: Path, path_listener: Listener,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The ops runtime's messages, in order, against the listener."""
    configure("info", "json", io.StringIO())
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.name)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pings every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    conf = tmp_path / "masqd.toml"
    conf.write_text(BASE.format(sock=tmp_path / "ctl.sock"))
    from masqd import config

    cfg = config.load(conf)
    eng = FakeEngine()

    path_listener.collect()

    async def main() -> None:
        ops = Ops(eng, cfg, config_path=conf, role=lambda: "backup")
        await ops.start()
        ops.ready()
        await asyncio.sleep(0.55)
        ops.reload()  # a good reload
        conf.write_text("[lan\n")
        ops.reload()  # a refused one: READY=1 all the same, and the status says so
        await ops.stop()

    asyncio.run(main())
    msgs = path_listener.collected()
    pings = [i for i, m in enumerate(msgs) if m == "WATCHDOG=1"]
    ready = msgs.index(next(m for m in msgs if m.startswith("READY=1")))
    assert ready == 0, msgs
    assert 5 <= len(pings) <= 9, msgs  # 0.55 s at one ping per 0.1 s
    rest = [m for m in msgs[ready:] if m != "WATCHDOG=1"]
    assert [m.split("\n")[0] for m in rest] == ["READY=1", "RELOADING=1", "READY=1", "RELOADING=1",
                                               "READY=1", "STOPPING=1"], rest
    assert rest[0] == ("READY=1\nSTATUS=entries 3; packets in: lan 10, wan 3; WAN 203.0.113.200; "
                       "role backup")
    assert rest[1].split("\n")[1].startswith("MONOTONIC_USEC=")
    assert "last reload refused" not in rest[2] and "last reload refused" in rest[4]
    assert msgs[-1].startswith("STOPPING=1")  # nothing after the stop, not even a ping


def test_ops_without_notify_socket_sends_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configure("info", "json", io.StringIO())
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    conf = tmp_path / "masqd.toml"
    conf.write_text(BASE.format(sock=tmp_path / "ctl.sock"))
    from masqd import config

    async def main() -> Ops:
        ops = Ops(FakeEngine(), config.load(conf), config_path=conf)
        await ops.start()
        ops.ready()
        await asyncio.sleep(0.15)
        ops.reload()
        await ops.stop()
        return ops

    ops = asyncio.run(main())
    assert not ops.notify.enabled and ops.notify.sent == 0 and ops.notify.errors == 0
    assert ops.counters.reloads_ok == 1  # the reload itself is unchanged
