"""The layer rules of the masqd package, checked by reading its source (ast), and no import cycles.

Layers, lowest first; a module may import its own layer and the layers below it:

    wire <- firewall <- config <- engine <- dataplane <- ops <- cli

``lab`` stands apart: the standard library and pyroute2 only, nothing from masqd but
itself, imported by ``cli`` only. ``masqd/__init__.py`` imports nothing from masqd.
``wire``, ``firewall``, ``config`` and ``engine`` are sans-IO: no asyncio, socket,
uvloop, pytun, pyroute2, prometheus_client or structlog.

Every import counts: at module level, inside functions, and under ``if TYPE_CHECKING:``
(a cycle or a reach upwards dodged that way is still one). ``bench/`` and ``deploy/``
are outside these rules; so is everything under ``tests/``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "masqd"

# Layer name -> the masqd layers it may import (its own included).
ORDER = ["wire", "firewall", "config", "engine", "dataplane", "ops", "cli"]
ALLOWED: dict[str, set[str]] = {name: {"root", *ORDER[: i + 1]} for i, name in enumerate(ORDER)}
ALLOWED["cli"].add("lab")
ALLOWED["lab"] = {"lab"}
ALLOWED["root"] = set()
# top-level modules that are not packages, by the layer they belong to
MODULE_LAYERS = {"config": "config", "cli": "cli", "rulescheck": "cli", "daemon": "cli", "version": "cli", "__main__": "cli"}

SANS_IO = ("wire", "firewall", "config", "engine")
IO_LIBRARIES = {"asyncio", "socket", "uvloop", "pytun", "pyroute2", "prometheus_client", "structlog"}
LAB_THIRD_PARTY = {"pyroute2"}


@dataclass(frozen=True)
class Import:
    """One import statement's target, as written and resolved, and where it is."""

    importer: str  # dotted module name of the file
    target: str  # dotted name of the module (or package) it imports
    file: str  # the importer's path, from the package's parent directory
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def module_name(path: Path, top: Path) -> str:
    rel = path.relative_to(top.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(top: Path) -> dict[str, Path]:
    """Every module of the package at ``top``: dotted name -> file."""
    return {module_name(p, top): p for p in sorted(top.rglob("*.py"))}


def imports_of(path: Path, top: Path, name: str, known: set[str]) -> list[Import]:
    """Every import in the file, wherever it stands. A ``from P import x`` whose x is a
    module of the package is an import of P.x (that is the module it needs)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    file = str(path.relative_to(top.parent))
    is_package = path.name == "__init__.py"
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(name, a.name, file, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "__future__":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            if subs:
                found += [Import(name, s, file, node.lineno) for s in subs]
            if len(subs) < len(node.names):
                found.append(Import(name, mod, file, node.lineno))
        elif isinstance(node, ast.Call) and _is_import_call(node.func) and node.args:
            found += [Import(name, t, file, node.lineno) for t in _dynamic_targets(node.args[0], known)]
    return found


def _is_import_call(func: ast.expr) -> bool:
    """``importlib.import_module(...)``, ``import_module(...)`` or ``__import__(...)``."""
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def _dynamic_targets(arg: ast.expr, known: set[str]) -> list[str]:
    """What a dynamic import may load: a literal name, or for an f-string every module of
    the package whose name starts with its literal beginning."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.JoinedStr) and arg.values:
        head = arg.values[0]
        if isinstance(head, ast.Constant) and isinstance(head.value, str) and head.value:
            return sorted(m for m in known if m.startswith(head.value) and m != head.value)
    return []


def layer_of(module: str, top: str = "masqd") -> str | None:
    """The layer a masqd module belongs to, None when it belongs to none."""
    if module == top:
        return "root"
    part = module.split(".")[1]
    if part in MODULE_LAYERS:
        return MODULE_LAYERS[part]
    return part if part in ALLOWED and part != "root" else None


def import_graph(top: Path) -> tuple[dict[str, Path], list[Import]]:
    mods = modules(top)
    known = set(mods)
    edges: list[Import] = []
    for name, path in mods.items():
        edges += imports_of(path, top, name, known)
    return mods, edges


def internal_target(target: str, known: set[str]) -> str | None:
    """The package module an import resolves to (the longest known prefix), or None."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in known:
            return cand
    return None


def layer_violations(top: Path) -> list[str]:
    mods, edges = import_graph(top)
    known = set(mods)
    strays = sorted({".".join(m.split(".")[:2]) for m in mods if layer_of(m, top.name) is None})
    out = [f"{s.replace('.', '/')}: {s} is in no layer (wire, firewall, config, engine, dataplane, ops, "
           f"lab, cli)" for s in strays]
    for e in edges:
        src = layer_of(e.importer, top.name)
        tgt_mod = internal_target(e.target, known)
        if src is None or tgt_mod is None:
            continue
        tgt = layer_of(tgt_mod, top.name)
        if tgt is not None and tgt not in ALLOWED[src]:
            out.append(f"{e.where()}: {e.importer} ({src}) imports {tgt_mod} ({tgt})")
    return out


def library_violations(top: Path) -> list[str]:
    mods, edges = import_graph(top)
    known = set(mods)
    stdlib = set(sys.stdlib_module_names)
    out = []
    for e in edges:
        src = layer_of(e.importer, top.name)
        if internal_target(e.target, known) is not None or e.target.split(".")[0] == top.name:
            continue
        lib = e.target.split(".")[0]
        if src in SANS_IO and lib in IO_LIBRARIES:
            out.append(f"{e.where()}: {e.importer} ({src}, sans-IO) imports {e.target}")
        if src == "lab" and lib not in stdlib and lib not in LAB_THIRD_PARTY:
            out.append(f"{e.where()}: {e.importer} (lab) imports {e.target} (stdlib and pyroute2 only)")
    return out


def cycles(top: Path) -> list[list[Import]]:
    """Each strongly connected group of modules (more than one module, or one importing
    itself), as the imports that join it."""
    mods, edges = import_graph(top)
    known = set(mods)
    graph: dict[str, list[Import]] = {m: [] for m in mods}
    for e in edges:
        t = internal_target(e.target, known)
        if t is not None:
            graph[e.importer].append(Import(e.importer, t, e.file, e.line))
    groups = strongly_connected(graph)
    found = []
    for g in groups:
        inside = [e for m in sorted(g) for e in graph[m] if e.target in g]
        if len(g) > 1 or inside:
            found.append(inside)
    return found


def strongly_connected(graph: dict[str, list[Import]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work: list[tuple[str, Iterator[Import]]] = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                t = nxt.target
                if t not in index:
                    index[t] = low[t] = counter
                    counter += 1
                    stack.append(t)
                    on_stack.add(t)
                    work.append((t, iter(graph[t])))
                elif t in on_stack:
                    low[node] = min(low[node], index[t])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    group.add(m)
                    if m == node:
                        break
                groups.append(group)
    return groups


def shortest_cycle(inside: list[Import]) -> list[Import]:
    """One shortest cycle through the first module of a group (breadth-first)."""
    start = inside[0].importer
    paths: dict[str, list[Import]] = {start: []}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for e in inside:
            if e.importer != node:
                continue
            if e.target == start:
                return paths[node] + [e]
            if e.target not in paths:
                paths[e.target] = paths[node] + [e]
                queue.append(e.target)
    return []


def describe(groups: list[list[Import]]) -> list[str]:
    """A group as one of its cycles, then every import that joins it, with file and line."""
    out = []
    for inside in groups:
        names = sorted({e.importer for e in inside})
        ring = shortest_cycle(inside)
        out.append(f"cycle between {', '.join(names)}: "
                   + " -> ".join([e.importer for e in ring] + [ring[0].importer]))
        out += [f"    {e.where()}: {e.importer} imports {e.target}" for e in inside]
    return out


# --- the rules on masqd ---------------------------------------------------------------


def test_each_layer_imports_only_the_layers_below_it() -> None:
    problems = layer_violations(PACKAGE)
    assert not problems, "layer rules broken:\n" + "\n".join(problems)


def test_sans_io_layers_and_the_lab_use_only_their_libraries() -> None:
    problems = library_violations(PACKAGE)
    assert not problems, "library rules broken:\n" + "\n".join(problems)


def test_no_import_cycles_between_modules() -> None:
    found = cycles(PACKAGE)
    assert not found, "import cycles:\n" + "\n".join(describe(found))


def test_each_package_says_its_job_and_what_it_may_import() -> None:
    missing = []
    for init in [PACKAGE / "__init__.py", *sorted(PACKAGE.glob("*/__init__.py"))]:
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        if "May import:" not in doc or len(doc.split("May import:")[0].strip()) < 20:
            missing.append(str(init.relative_to(ROOT)))
    assert not missing, f"package docstring without its job and a 'May import:' paragraph: {missing}"


# --- the checker itself, on a package made for the purpose ---------------------------


def _write(top: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = top / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")


def test_the_checker_finds_cycles_hidden_in_functions_and_type_checking(tmp_path: Path) -> None:
    top = tmp_path / "masqd"
    _write(top, {
        "__init__.py": "",
        "config.py": "def f():\n    from masqd.firewall import rules\n",
        "firewall/__init__.py": "",
        "firewall/rules.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from masqd.config import X\n",
        "engine/__init__.py": "from masqd.engine.core import E\n",
        "engine/core.py": "from masqd.engine import forward\n",
        "engine/forward.py": "from .core import E\n",
        "engine/nat.py": "from . import nat\n",
        "engine/helpers/__init__.py": "import importlib\nfor n in ('ipsec',):\n"
                                      "    importlib.import_module(f'masqd.engine.helpers.{n}')\n",
        "engine/helpers/ipsec.py": "from masqd.engine.helpers import HELPERS\n",
        "wire/__init__.py": "import asyncio\n",
    })
    text = "\n".join(describe(cycles(top)))
    assert "masqd.config, masqd.firewall.rules" in text
    assert "masqd.engine.core, masqd.engine.forward" in text
    assert "masqd/engine/forward.py:1: masqd.engine.forward imports masqd.engine.core" in text
    assert "cycle between masqd.engine.nat: masqd.engine.nat -> masqd.engine.nat" in text  # itself
    assert "masqd.engine," not in text  # a package importing its own submodule is no cycle
    assert "masqd/engine/helpers/__init__.py:3: masqd.engine.helpers imports masqd.engine.helpers.ipsec" in text
    layers = layer_violations(top)
    assert layers == ["masqd/firewall/rules.py:3: masqd.firewall.rules (firewall) imports masqd.config (config)"]
    libs = library_violations(top)
    assert libs == ["masqd/wire/__init__.py:1: masqd.wire (wire, sans-IO) imports asyncio"]


def test_the_checker_places_unknown_packages_and_holds_the_lab_apart(tmp_path: Path) -> None:
    top = tmp_path / "masqd"
    _write(top, {
        "__init__.py": "",
        "extra/__init__.py": "",
        "lab/__init__.py": "import json\nimport scapy\nfrom masqd.wire import x\n",
        "wire/__init__.py": "",
        "ops/__init__.py": "from masqd.lab import Lab\n",
        "cli.py": "from masqd.lab import Lab\nfrom masqd.ops import y\n",
    })
    layers = layer_violations(top)
    assert layers == [
        "masqd/extra: masqd.extra is in no layer (wire, firewall, config, engine, dataplane, ops, lab, cli)",
        "masqd/lab/__init__.py:3: masqd.lab (lab) imports masqd.wire (wire)",
        "masqd/ops/__init__.py:1: masqd.ops (ops) imports masqd.lab (lab)",
    ]
    assert library_violations(top) == [
        "masqd/lab/__init__.py:2: masqd.lab (lab) imports scapy (stdlib and pyroute2 only)"]
