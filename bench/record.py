"""Where and on what a benchmark ran (date, command line, machine), and its results files.

Every JSON object the benchmarks print carries ``date``, ``command`` and ``machine``
(CPU model, cores, kernel, Python). ``--record FILE`` writes the runs into a results
file under ``bench/results/`` (appending to it when it exists, so three invocations
make one set of three runs); ``scripts/gen-docs`` renders docs/benchmark.md from
those files. A results file::

    {"bench": "e2e", "label": "defaults, TAP", "source": "measured",
     "command": "...", "date": "...", "machine": {...}, "runs": [{...}, ...]}
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """CPU model, cores (online, and those this process may use), kernel release, Python."""
    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "cores_allowed": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def command() -> str:
    """The command line, with the script's path relative to the repository when inside it."""
    script = Path(sys.argv[0]).resolve()
    try:
        name = str(script.relative_to(ROOT))
    except ValueError:
        name = sys.argv[0]
    return " ".join([name, *sys.argv[1:]])


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def stamp() -> dict[str, Any]:
    """What every printed result carries besides its figures."""
    return {"date": now(), "command": command(), "machine": machine()}


def record(path: str, bench: str, label: str, runs: list[dict[str, Any]]) -> None:
    """Add ``runs`` to the results file at ``path`` (created if missing)."""
    p = Path(path)
    runs = [{k: v for k, v in r.items() if k not in ("command", "machine")} for r in runs]
    if p.exists():
        data = json.loads(p.read_text(encoding="utf-8"))
        if data.get("bench") != bench or "runs" not in data:
            raise SystemExit(f"{path}: not a results file of bench/{bench}.py runs; choose another file")
        if data.get("machine") != machine() or data.get("command") != command():
            raise SystemExit(f"{path}: recorded by another command or on another machine; "
                             "a results file holds one set of runs: choose another file")
        data["runs"] += runs
    else:
        data = {"bench": bench, "label": label, "source": "measured", "command": command(),
                "date": now(), "machine": machine(), "runs": runs}
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"recorded {len(runs)} run(s) in {path}", file=sys.stderr)
