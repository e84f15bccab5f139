"""docs/: the generated blocks are what scripts/gen-docs renders from the committed inputs.

Benchmark figures come from bench/results/*.json, the conformance table from
tests/conformance.toml and the recorded run tests/conformance.json; nobody edits them by
hand. Also checked: the recorded run covers exactly the tests that carry a conformance
marker today, and the generator and bench/record.py behave on inputs made for the purpose.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    loader.exec_module(mod)
    return mod


gen = load("gen_docs", ROOT / "scripts" / "gen-docs")
record_mod = load("bench_record", ROOT / "bench" / "record.py")


# --- the committed docs ---------------------------------------------------------------


def test_generated_blocks_are_what_the_committed_inputs_give() -> None:
    pages = gen.render_pages(ROOT)
    blocks = {m.group(2) for now, _new in pages.values() for m in gen.BLOCK.finditer(now)}
    assert blocks == {"e2e", "e2e-goals", "e2e-floor", "engine", "conformance"}, \
        "a generated block went missing from docs/"
    stale = {str(p.relative_to(ROOT)): gen.differing_blocks(now, new)
             for p, (now, new) in pages.items() if now != new}
    assert not stale, f"generated blocks edited by hand or inputs changed: {stale}; run scripts/gen-docs"


def test_gen_docs_check_passes_on_the_committed_inputs() -> None:
    cp = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-docs"), "--check"],
                        capture_output=True, text=True, timeout=60, check=False)
    assert cp.returncode == 0, cp.stderr


def marked_tests(root: Path) -> set[tuple[str, str]]:
    """(requirement, test id) of every conformance marker in tests/, read from the source."""
    found = set()
    for path in sorted((root / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel = str(path.relative_to(root))
        scopes: list[tuple[str, list[ast.stmt]]] = [(rel, tree.body)]
        while scopes:
            prefix, body = scopes.pop()
            for node in body:
                if isinstance(node, ast.ClassDef):
                    scopes.append((f"{prefix}::{node.name}", node.body))
                elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    for dec in node.decorator_list:
                        if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                                and dec.func.attr == "conformance"):
                            found |= {(str(ast.literal_eval(a)), f"{prefix}::{node.name}") for a in dec.args}
    return found


def test_the_recorded_conformance_run_covers_the_marked_tests() -> None:
    run = json.loads((ROOT / "tests" / "conformance.json").read_text(encoding="utf-8"))
    recorded = {(r["requirement"], r["test"].split("[", 1)[0]) for r in run["results"]}
    marked = marked_tests(ROOT)
    assert marked, "no conformance markers found"
    assert recorded == marked, (
        f"markers not in the record: {sorted(marked - recorded)}; recorded but no longer marked: "
        f"{sorted(recorded - marked)}. Record again: pytest -m conformance --conformance-json "
        "tests/conformance.json, then scripts/gen-docs")


# --- the generator on inputs made for the purpose ------------------------------------


def _tree(root: Path, runs: list[dict[str, Any]], outcomes: dict[str, str]) -> Path:
    (root / "docs").mkdir(parents=True)
    (root / "bench" / "results").mkdir(parents=True)
    (root / "tests").mkdir()
    machine = {"cpu_model": "Test CPU", "cores": 2, "kernel": "6.1.0", "python": "3.11.2"}
    (root / "bench" / "results" / "a.json").write_text(json.dumps(
        {"bench": "e2e", "label": "defaults, TAP", "source": "measured", "command": "bench/e2e.py --runs 2",
         "date": "2026-12-01T10:00:00+00:00", "machine": machine, "runs": runs}), encoding="utf-8")
    (root / "tests" / "conformance.toml").write_text(
        '[[requirement]]\nid = "R1"\ntext = "one"\n[[requirement]]\nid = "R2"\ntext = "two"\n'
        '[[requirement]]\nid = "R3"\ntext = "three"\n[[requirement]]\nid = "R4"\ntext = "four"\n',
        encoding="utf-8")
    results = [{"requirement": t.split(":")[0], "test": f"tests/engine/test_x.py::{t.split(':')[1]}", "outcome": o}
               for t, o in outcomes.items()]
    (root / "tests" / "conformance.json").write_text(json.dumps(
        {"command": "pytest -m conformance", "date": "2026-12-01", "results": results}), encoding="utf-8")
    return root


RUN = {"tcp1_masqd_gbps": 9.0, "tcp1_kernel_gbps": 12.0, "tcp4_masqd_gbps": 11.0, "tcp4_kernel_gbps": 13.0,
       "udp_small_cpu_us_per_pkt": 2.5, "rtt_added_median_ms": 0.07, "rtt_added_p99_ms": 0.2,
       "udp_small_masqd_loss_pct": 0.0, "udp_small_native_pct": 100.0}

PAGE = """# A page

Prose before.

<!-- BEGIN generated: e2e -->
| typed | by hand |
<!-- END generated: e2e -->

Prose between.

<!-- BEGIN generated: conformance -->
<!-- END generated: conformance -->

Prose after.
"""


def test_a_hand_edited_block_is_found_and_only_the_blocks_are_rewritten(tmp_path: Path) -> None:
    root = _tree(tmp_path, [RUN, {**RUN, "tcp1_masqd_gbps": 10.8, "rtt_added_median_ms": float("nan")}],
                 {"R1:test_a": "passed"})
    page = root / "docs" / "page.md"
    page.write_text(PAGE, encoding="utf-8")
    assert gen.main(["--check"], root) == 1
    assert page.read_text(encoding="utf-8") == PAGE  # --check changes nothing
    assert gen.main([], root) == 0
    text = page.read_text(encoding="utf-8")
    assert gen.main(["--check"], root) == 0
    for prose in ("# A page\n\nProse before.\n\n", "\n\nProse between.\n\n", "\n\nProse after.\n"):
        assert prose in text
    assert "typed" not in text
    row = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    # ranges over the two runs: TCP 9.0 - 10.8 of 12.0 (ratio 0.75 - 0.90); NaN left out
    assert "| 2 | 9.0 - 10.8 / 12.0 (0.75 - 0.90) | 11.0 / 13.0 | 2.50 | +0.070 ms (+0.20) | 0.0 % (100 %) |" in row
    assert "Test CPU, 2 cores, kernel 6.1.0, Python 3.11.2; source: measured." in text


def test_the_floor_block_has_a_row_only_for_files_measured_with_the_floor(tmp_path: Path) -> None:
    """e2e-floor: medians (min - max) of the floor's figures beside masqd's, for results files whose
    runs have them (bench/e2e.py --floor); a file without them has no row there."""
    floor = {"tcp1_floor_ratio": 0.85, "tcp1_ratio": 0.80, "tcp1_masqd_vs_floor": 0.94,
             "udp_small_floor_cpu_us_per_pkt": 2.3, "udp_small_cpu_us_per_pkt": 3.1,
             "udp_small_masqd_over_floor_us": 0.8}
    root = _tree(tmp_path, [RUN, RUN], {"R1:test_a": "passed"})
    assert "No results file" in gen.render_e2e_floor(root)
    (root / "bench" / "results" / "b.json").write_text(json.dumps(
        {"bench": "e2e", "label": "with the floor", "source": "measured", "command": "bench/e2e.py --floor",
         "date": "2026-12-02T10:00:00+00:00", "machine": {"cores": 2},
         "runs": [floor, {**floor, "tcp1_floor_ratio": 0.95, "udp_small_masqd_over_floor_us": 0.6},
                  {**floor, "tcp1_floor_ratio": 0.75, "udp_small_masqd_over_floor_us": 1.0}]}), encoding="utf-8")
    rows = [line for line in gen.render_e2e_floor(root).splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1 and "with the floor" in rows[0] and "defaults, TAP" not in rows[0]
    assert "| 3 | 0.85 (0.75 - 0.95) | 0.80 (0.80 - 0.80) | 0.94 (0.94 - 0.94) | – | – | 2.30 (2.30 - 2.30) |" \
        in rows[0]
    assert "| +0.80 (+0.60 - +1.00) |" in rows[0]


def test_conformance_rows_say_when_no_test_passes(tmp_path: Path) -> None:
    root = _tree(tmp_path, [RUN], {"R1:test_a": "passed", "R1:test_b": "passed", "R2:test_c": "passed",
                                   "R2:test_d": "failed", "R3:test_e": "skipped"})
    text = gen.render_conformance(root)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| R")}
    assert rows["R1"].endswith("| `engine/test_x.py`: `test_a`, `test_b` | pass |")
    assert rows["R2"].endswith("| **FAIL**: 1 failed of 2 |")
    assert rows["R3"].endswith("| **no passing test**: 1 skipped |")
    assert rows["R4"].endswith("| – | **no passing test**: none recorded |")


def test_bad_inputs_are_refused_with_the_file_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _tree(tmp_path, [RUN], {"R9:test_a": "passed"})
    (root / "docs" / "page.md").write_text(PAGE, encoding="utf-8")
    assert gen.main(["--check"], root) == 2
    assert "tests/conformance.json: requirements not in tests/conformance.toml: ['R9']" in capsys.readouterr().err
    (root / "docs" / "page.md").write_text("<!-- BEGIN generated: nope -->\n<!-- END generated: nope -->\n",
                                           encoding="utf-8")
    assert gen.main(["--check"], root) == 2
    assert "docs/page.md: unknown generated block 'nope'" in capsys.readouterr().err
    (root / "docs" / "page.md").write_text(PAGE, encoding="utf-8")
    (root / "bench" / "results" / "b.json").write_text('{"bench": "e2e", "label": "x"}', encoding="utf-8")
    assert gen.main(["--check"], root) == 2
    assert "bench/results/b.json: missing source, command, date, machine" in capsys.readouterr().err


def test_record_adds_runs_to_one_set_and_refuses_another_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "engine.py"), "--quick"])
    run = {**record_mod.stamp(), "udp_out_ns_10k": 900.0}
    assert run["command"] == "bench/engine.py --quick"
    assert set(run["machine"]) >= {"cpu_model", "cores", "kernel"}
    record_mod.record(str(path), "engine", "quick", [run])
    record_mod.record(str(path), "engine", "quick", [{**run, "udp_out_ns_10k": 950.0}])
    data = json.loads(path.read_text(encoding="utf-8"))
    assert [r["udp_out_ns_10k"] for r in data["runs"]] == [900.0, 950.0]
    assert data["command"] == "bench/engine.py --quick" and "machine" not in data["runs"][0]
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "engine.py")])
    with pytest.raises(SystemExit, match="another command"):
        record_mod.record(str(path), "engine", "full", [run])
    (tmp_path / "bench" / "results").mkdir(parents=True)
    path.rename(tmp_path / "bench" / "results" / "r.json")
    table = gen.render_engine(tmp_path).splitlines()
    assert table[0] == "| figure | 1. quick (2 runs) |"
    assert "| `udp_out_ns_10k` | 900 - 950 |" in table
