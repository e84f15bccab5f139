"""Fixtures for ops unit tests: a fake engine and a minimal validated config."""

from __future__ import annotations

from typing import Any

import pytest

from masqd.config import Config

from .fake_engine import FakeEngine


def make_cfg(tmp_path: Any, **over: Any) -> Config:
    data: dict[str, Any] = {
        "lan": {"address": "10.0.0.1/8"},
        "wan": {"address": "203.0.113.200/24", "gateway": "203.0.113.1"},
        "metrics": {"listen": "127.0.0.1:0"},
        "control": {"socket": str(tmp_path / "ctl.sock")},
        "logging": {"format": "json", "rate_per_event": 5.0},
    }
    data.update(over)
    # model_validate: schema only (rule-line validation belongs to masqd.firewall tests)
    return Config.model_validate(data)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def cfg(tmp_path: Any) -> Config:
    return make_cfg(tmp_path)


@pytest.fixture(autouse=True)
def _restore_logging() -> Any:
    """ops tests configure structlog and a root handler: undo both after each test."""
    import logging

    import structlog

    from masqd.ops.logging import _MasqdHandler

    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _MasqdHandler):
            root.removeHandler(h)
    structlog.reset_defaults()
