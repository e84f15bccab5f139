"""Interop suite fixtures: guest images are built (or reused) once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from masqd.interop.images import ensure_images


@pytest.fixture(scope="session")
def guest_images() -> dict[str, Path]:
    if os.geteuid() != 0:
        pytest.fail("the interop suite needs root (namespaces, TAP devices, UML guests)")
    return ensure_images(log=False)
