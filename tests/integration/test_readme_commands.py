"""The README's two set-up commands, as a new user runs them: root on a fresh checkout, no sudo.

The checkout is a copy of this worktree's files (tracked and new, as ``git ls-files`` lists
them) in a directory of its own, without .venv or the built native module, so
``scripts/setup`` creates the virtualenv, installs masqd and compiles its fast path from
nothing. The demo runs in that copy under a per-run lab prefix. Non-root users get the
scripts re-run through sudo when sudo exists, and a clear refusal when it does not.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def readme_commands() -> list[str]:
    """The commands of the README's first code block (comments dropped)."""
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block
    return [ln.split("#")[0].strip() for ln in block.group(1).splitlines() if ln.split("#")[0].strip()]


@pytest.fixture(scope="module")
def checkout(stale_labs_removed: None) -> Iterator[Path]:
    dest = Path(f"/var/tmp/masqd-fresh-{os.getpid()}")
    shutil.rmtree(dest, ignore_errors=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    dest.chmod(0o755)
    try:
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_readme_commands_need_no_sudo() -> None:
    assert readme_commands() == ["scripts/demo", "scripts/test"]
    assert "as root" in (ROOT / "README.md").read_text().split("```sh")[0].splitlines()[-2]


@pytest.mark.usefixtures("root")
def test_demo_as_root_on_a_fresh_checkout_without_sudo(checkout: Path) -> None:
    assert not (checkout / ".venv").exists() and not list(checkout.glob("masqd/dataplane/*.so"))
    env = {"PATH": SYSTEM_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    assert shutil.which("sudo", path=SYSTEM_PATH) is None, "this test is about a machine without sudo"
    prefix = f"t{os.getpid()}d"
    r = subprocess.run(["scripts/demo", "--prefix", prefix], cwd=checkout, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [ln for ln in r.stdout.splitlines() if re.match(r"setup \[\d/4\] ", ln)]
    assert [ln[:12] for ln in steps if not ln.startswith("setup [3/4]   ")] == [
        "setup [1/4] ", "setup [2/4] ", "setup [3/4] ", "setup [3/4] ", "setup [4/4] "], steps
    assert "virtualenv: creating .venv" in r.stdout
    assert re.search(r"^setup \[3/4\] pip install: done \(\d+ s\)$", r.stdout, re.M)
    assert "native fast path: built and imports" in r.stdout
    assert "demo passed" in r.stdout
    assert not [n for n in os.listdir("/run/netns") if n.startswith(f"{prefix}-")]


@pytest.mark.usefixtures("root")
@pytest.mark.parametrize("script", ["scripts/demo", "scripts/test", "scripts/setup"])
def test_non_root_without_sudo_is_told_to_run_as_root(checkout: Path, script: str) -> None:
    r = subprocess.run([*NOBODY, script, "--prefix", "x"], cwd=checkout, env={"PATH": SYSTEM_PATH},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr == (f"{Path(script).name}: needs root (network namespaces, TUN/TAP devices, Debian "
                        "packages) and sudo is not installed: run it as root\n")
    assert r.stdout == ""


@pytest.mark.usefixtures("root")
@pytest.mark.parametrize("script", ["scripts/demo", "scripts/test"])
def test_non_root_with_sudo_runs_itself_again_through_sudo(checkout: Path,
                                                           script: str) -> None:
    """sudo is not installed here: a stand-in on PATH records how it is called, which is what
    the script under test decides."""
    bindir = Path(f"/var/tmp/masqd-fakesudo-{os.getpid()}")
    bindir.mkdir(exist_ok=True)
    try:
        record = bindir / "argv"
        (bindir / "sudo").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\nexit 7\n')
        (bindir / "sudo").chmod(0o755)
        bindir.chmod(0o777)  # nobody writes the record
        r = subprocess.run([*NOBODY, script, "--prefix", "x y"], cwd=checkout,
                           env={"PATH": f"{bindir}:{SYSTEM_PATH}"}, capture_output=True, text=True, timeout=60)
        assert r.returncode == 7, r.stderr  # sudo's status is the script's: it exec'd sudo
        assert record.read_text().splitlines() == ["--", str(checkout / script), "--prefix", "x y"]
    finally:
        shutil.rmtree(bindir, ignore_errors=True)
