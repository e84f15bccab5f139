"""The wheel (what pip installs, and what the Docker image is built from) holds what a user runs.

The source tree is copied to a temporary directory (so no build files land in
the work tree, and the tests, benchmarks and interop harness beside the
package are there to be wrongly picked up) and built as scripts/docker-build
does: ``pip wheel`` with build isolation, from the local wheel store, offline.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                     ".*_cache", "*.so", "*.pcap", "runs")


def test_wheel_holds_the_product_and_no_test_code(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    assert (src / "tests" / "interop" / "harness").is_dir()  # there to be left out
    out = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
         "--wheel-dir", str(out), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = out.glob("masqd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {"masqd", dist_info}
    assert not [n for n in names if n.startswith("masqd/interop/") or "/harness/" in n or "/guest/" in n]
    assert not [n for n in names if Path(n).name.startswith("test_") or Path(n).name == "conftest.py"]
    # what `masqd lab` and `masqd demo` run, and the command itself
    for module in ("cli.py", "lab/__init__.py", "lab/topology.py", "lab/demo.py", "lab/nettool.py"):
        assert f"masqd/{module}" in names, module
    assert "masqd = masqd.cli:main" in entry_points
