"""Shared test fixtures: root check, per-run lab prefixes, a lab with masqd running in it.

Lab names carry a per-run prefix ``t<pid><m>`` (m: a = TAP, u = TUN) so two
runs never collide; a session first removes labs left by test runs whose
process is gone (a crash, a kill -9), and every lab fixture tears down on
every path.

Also the ``conformance`` marker: a marked test must name requirements listed in
``tests/conformance.toml``, and ``pytest --conformance-json PATH`` writes the
requirement, test id and outcome of every marked test the run collected
(``scripts/gen-docs`` renders ``docs/conformance.md`` from it).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from masqd.lab import Lab, MasqdProcess

CONFORMANCE_REQUIREMENTS = Path(__file__).with_name("conformance.toml")

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


# --- conformance marker and record -----------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--conformance-json", metavar="PATH", default=None,
        help="write requirement, test id and outcome of every test marked conformance to PATH "
             "(tests/conformance.json is the committed record; scripts/gen-docs renders it)")


def conformance_requirement_ids() -> list[str]:
    with CONFORMANCE_REQUIREMENTS.open("rb") as f:
        return [str(r["id"]) for r in tomllib.load(f)["requirement"]]


def marked_requirements(item: pytest.Item) -> list[str]:
    return [str(a) for m in item.iter_markers("conformance") for a in m.args]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A conformance marker must name known requirements, and at least one."""
    known: set[str] | None = None
    for item in items:
        for mark in item.iter_markers("conformance"):
            known = known if known is not None else set(conformance_requirement_ids())
            bad = [a for a in mark.args if a not in known]
            if not mark.args or bad or mark.kwargs:
                raise pytest.UsageError(
                    f"{item.nodeid}: conformance marker {mark.args!r}: name one or more requirement "
                    f"ids of {CONFORMANCE_REQUIREMENTS.name} (unknown: {bad})")


class ConformanceRecorder:
    """Collects the outcome of each marked test and writes them at the end of the session."""

    def __init__(self, config: pytest.Config, path: str) -> None:
        self.config = config
        self.path = Path(path)
        self.requirements: dict[str, list[str]] = {}
        self.outcome: dict[str, str] = {}

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:
            reqs = marked_requirements(item)
            if reqs:
                self.requirements[item.nodeid] = reqs
                self.outcome[item.nodeid] = "not run"

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid not in self.outcome:
            return
        if report.when == "call":
            self.outcome[report.nodeid] = "skipped" if report.skipped else report.outcome
        elif report.failed:  # setup or teardown
            self.outcome[report.nodeid] = "error"
        elif report.skipped:
            self.outcome[report.nodeid] = "skipped"

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        results = [{"requirement": r, "test": nodeid, "outcome": self.outcome[nodeid]}
                   for nodeid, reqs in self.requirements.items() for r in reqs]
        head = {
            "command": " ".join(["pytest", *self.config.invocation_params.args]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
        rows = ",\n".join(f"  {json.dumps(r, ensure_ascii=False)}" for r in results)
        text = "{\n" + "\n".join(lines) + '\n "results": [\n' + rows + "\n ]\n}\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(text, encoding="utf-8")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--conformance-json")
    if path:
        config.pluginmanager.register(ConformanceRecorder(config, path), "conformance-recorder")
