"""Shared test fixtures: root check, per-run lab prefixes, a lab with masqd running in it.

Lab names carry a per-run prefix ``t<pid><m>`` (m: a = TAP, u = TUN) so two
runs never collide; a session first removes labs left by test runs whose
process is gone (a crash, a kill -9), and every lab fixture tears down on
every path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from masqd.lab import Lab, MasqdProcess

_PREFIX = re.compile(r"^(t(\d+)[a-z])-")


def is_root() -> bool:
    return os.geteuid() == 0


@pytest.fixture(scope="session")
def root() -> None:
    """Tests that build namespaces need root (CI runs as root)."""
    if not is_root():
        pytest.skip("needs root: network namespaces and TUN/TAP devices")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def stale_labs_removed(root: None) -> None:
    """Remove labs of earlier test runs whose pytest process no longer exists."""
    if not os.path.isdir("/run/netns"):
        return
    seen = set()
    for name in os.listdir("/run/netns"):
        m = _PREFIX.match(name)
        if m and m.group(1) not in seen and not _pid_alive(int(m.group(2))):
            seen.add(m.group(1))
            Lab(m.group(1)).down()


def run_prefix(mode: str, tag: str = "") -> str:
    """``t<pid>`` plus one letter: a/u for the shared TAP/TUN labs, ``tag`` for a test's own lab."""
    return f"t{os.getpid()}{tag or ('a' if mode == 'tap' else 'u')}"


@pytest.fixture
def own_lab(stale_labs_removed: None) -> Iterator[Callable[[str, str], Lab]]:
    """A factory for a test's private lab: ``own_lab(mode, tag)``; all torn down afterwards."""
    made: list[Lab] = []

    def make(mode: str, tag: str) -> Lab:
        lab = Lab(run_prefix(mode, tag), mode=mode)
        made.append(lab)
        lab.down()
        lab.up()
        return lab

    try:
        yield make
    finally:
        for lab in made:
            lab.down()


@dataclass
class Routed:
    """A lab with masqd running between its LAN and WAN."""

    lab: Lab
    masqd: MasqdProcess
    mode: str


@pytest.fixture(scope="module", params=["tap", "tun"])
def routed(request: pytest.FixtureRequest, stale_labs_removed: None) -> Iterator[Routed]:
    """The lab (TAP and TUN mode in turn) with masqd running in ``{p}-fw``."""
    mode = request.param
    lab = Lab(run_prefix(mode), mode=mode)
    lab.down()
    try:
        lab.up()
        proc = lab.start_masqd()
        try:
            yield Routed(lab, proc, mode)
        finally:
            proc.stop()
    finally:
        lab.down()
