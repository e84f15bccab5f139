"""Interop suite fixtures: guest images are built (or reused) once per session, and a
SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C so every scenario's teardown runs."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from .harness.images import ensure_images


@pytest.fixture(scope="session")
def guest_images() -> dict[str, Path]:
    if os.geteuid() != 0:
        pytest.fail("the interop suite needs root (namespaces, TAP devices, UML guests)")
    return ensure_images(log=False)


@pytest.fixture(scope="session", autouse=True)
def sigterm_unwinds() -> Iterator[None]:
    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}: tearing the interop lab down")

    previous = signal.signal(signal.SIGTERM, interrupt)
    yield
    signal.signal(signal.SIGTERM, previous)
