"""The conformance marker and ``pytest --conformance-json``: what a run records, and bad markers.

Runs pytest in a subprocess on a test file made for the purpose, with tests/conftest.py
loaded as a plugin (the real requirement list, tests/conformance.toml).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SAMPLE = '''
import pytest

@pytest.mark.conformance("RFC 4787 REQ-1")
def test_passes():
    assert True

@pytest.mark.conformance("RFC 4787 REQ-1", "RFC 4787 REQ-9")
def test_fails():
    assert False

@pytest.mark.conformance("checksums")
def test_skipped():
    pytest.skip("not here")

@pytest.fixture
def broken():
    raise RuntimeError("setup")

@pytest.mark.conformance("defragmentation")
def test_setup_error(broken):
    pass

@pytest.mark.conformance("untrusted input")
@pytest.mark.parametrize("n", [1, 2])
def test_cases(n):
    assert n

def test_unmarked():
    pass
'''


def run_pytest(tmp_path: Path, body: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(body, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_the_record_has_each_marked_test_its_requirements_and_outcome(tmp_path: Path) -> None:
    out = tmp_path / "rec" / "conformance.json"
    cp = run_pytest(tmp_path, SAMPLE, "--conformance-json", str(out))
    assert cp.returncode == 1, cp.stdout + cp.stderr  # one test fails, one errors: the run says so
    rec = json.loads(out.read_text(encoding="utf-8"))
    assert rec["command"].startswith("pytest -q -p tests.conftest") and rec["date"]
    got = sorted((r["requirement"], r["test"], r["outcome"]) for r in rec["results"])
    assert got == sorted([
        ("RFC 4787 REQ-1", "test_sample.py::test_passes", "passed"),
        ("RFC 4787 REQ-1", "test_sample.py::test_fails", "failed"),
        ("RFC 4787 REQ-9", "test_sample.py::test_fails", "failed"),
        ("checksums", "test_sample.py::test_skipped", "skipped"),
        ("defragmentation", "test_sample.py::test_setup_error", "error"),
        ("untrusted input", "test_sample.py::test_cases[1]", "passed"),
        ("untrusted input", "test_sample.py::test_cases[2]", "passed"),
    ])


def test_without_the_option_nothing_is_written(tmp_path: Path) -> None:
    cp = run_pytest(tmp_path, SAMPLE, "-k", "passes")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_sample.py"]


def test_a_marker_naming_an_unknown_requirement_stops_the_run(tmp_path: Path) -> None:
    body = 'import pytest\n\n@pytest.mark.conformance("RFC 9999 REQ-1")\ndef test_x():\n    pass\n'
    cp = run_pytest(tmp_path, body)
    assert cp.returncode == 4, cp.stdout + cp.stderr  # usage error
    assert "test_sample.py::test_x: conformance marker ('RFC 9999 REQ-1',)" in cp.stderr
    assert "unknown: ['RFC 9999 REQ-1']" in cp.stderr
    cp = run_pytest(tmp_path, 'import pytest\n\n@pytest.mark.conformance\ndef test_x():\n    pass\n')
    assert cp.returncode == 4 and "name one or more requirement ids" in cp.stderr
