"""The import contract of docs/ARCHITECTURE.md, checked over every import in kvmas/ (function-local ones too).

Floors, lowest first; a module may import its own package and anything on a lower floor, nothing beside or
above it. Module-level import circles fail too, wherever they are.
"""

import ast
import shutil
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1] / "kvmas"
FLOORS = [
    {"__init__", "errors"},
    {"paths", "clock", "stats", "db", "progress"},
    {"trace", "tasks", "envs"},
    {"models", "telemetry"},
    {"agents"},
    {"primitives", "memory", "attribution", "testing"},
    {"organizer"},
    {"serve"},
    {"bench"},
    {"cli"},
]
FLOOR = {unit: i for i, units in enumerate(FLOORS) for unit in units}


def module_name(path: Path, root: Path) -> str:
    parts = ("kvmas",) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, root: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(imported kvmas module, line) for every import statement and ``importlib.import_module("kvmas...")``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # ``from kvmas.x import y``: the submodule y when it is one, else kvmas.x
                sub = f"{node.module}.{a.name}"
                out.append((sub if sub in modules else node.module, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import (kvmas uses absolute imports)")
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.args[0].value, node.lineno))
    return [(m, line) for m, line in out if m == "kvmas" or m.startswith("kvmas.")]


def check(root: Path = ROOT) -> list[str]:
    """Every violation of the contract under ``root`` (a ``kvmas`` package folder), as readable lines."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(files)
    graph = nx.DiGraph()
    problems = []
    for mod, path in sorted(files.items()):
        graph.add_node(mod)
        src = unit_of(mod)
        if src not in FLOOR:
            problems.append(f"{mod}: package {src!r} is on no floor of the contract")
            continue
        for target, line in imports(path, root, modules):
            dst = unit_of(target)
            if target in modules and target != mod:
                graph.add_edge(mod, target)
            if dst == src:
                continue
            if dst not in FLOOR:
                problems.append(f"{mod}:{line} imports {target}: package {dst!r} is on no floor")
            elif FLOOR[dst] >= FLOOR[src]:
                where = "beside" if FLOOR[dst] == FLOOR[src] else "above"
                problems.append(f"{mod}:{line} imports {target}: {dst} is {where} {src} (floor {FLOOR[dst]} vs "
                                f"{FLOOR[src]})")
    for cycle in nx.simple_cycles(graph):
        problems.append("import circle: " + " -> ".join(cycle + cycle[:1]))
    return problems


def test_every_import_obeys_the_floors_and_none_forms_a_circle():
    assert check() == []


def test_the_check_fails_on_a_forbidden_import_and_on_a_circle(tmp_path):
    pkg = tmp_path / "kvmas"
    shutil.copytree(ROOT, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    trace = pkg / "trace.py"
    trace.write_text(trace.read_text() + "\n\ndef _late():\n    from kvmas.cli import app  # noqa\n")
    (pkg / "errors.py").write_text((pkg / "errors.py").read_text() + "\nimport kvmas.paths  # noqa\n")
    (pkg / "paths.py").write_text((pkg / "paths.py").read_text() + "\nimport kvmas.errors  # noqa\n")
    problems = check(pkg)
    assert any(p.startswith("kvmas.trace:") and "kvmas.cli" in p and "above" in p for p in problems), problems
    assert any("import circle" in p and "kvmas.errors" in p and "kvmas.paths" in p for p in problems), problems


def test_architecture_doc_names_every_floor():
    doc = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for units in FLOORS:
        for unit in units - {"__init__"}:
            assert f"`{unit}" in doc, unit
