"""The layering of docs/architecture.md, checked on the source: which r1lab package may import which, and no
import cycles. Reads every module's imports with `ast` (imports inside functions count for the layers; only
those run at import time count for cycles; `if TYPE_CHECKING:` blocks count for neither)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "r1lab"

# A package may import itself and the packages of strictly lower layers (docs/architecture.md).
LAYERS = [
    {"errors", "fsutil", "distributed"},
    {"config", "tokenizer", "sandbox"},
    {"run_dir", "model", "rewards", "tools"},
    {"rollout", "tasks"},
    {"train", "eval"},
    {"pipeline"},
    {"serve"},
    {"cli", "testing"},
    {"__main__"},
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported r1lab module, runs at import time) for every import statement of the file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, at_import: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            inner = at_import and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, at_import) for a in child.names if a.name.split(".")[0] == "r1lab")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] != "r1lab":
                    continue
                out.append((target, at_import))
                for alias in child.names:  # `from r1lab.train import grpo` imports the submodule too
                    candidate = f"{target}.{alias.name}"
                    if _exists(candidate):
                        out.append((candidate, at_import))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return out


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


FILES = sorted(ROOT.rglob("*.py"))
GRAPH = {_module_name(f): _imports(f) for f in FILES}


def test_every_package_has_a_layer():
    packages = {_package(m) for m in GRAPH} - {"__init__"}
    assert packages <= set(RANK), f"add {sorted(packages - set(RANK))} to LAYERS and docs/architecture.md"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_go_down_the_layers(module):
    mine = _package(module)
    if mine == "__init__":
        return
    for target, _ in GRAPH[module]:
        theirs = _package(target)
        if theirs == mine or theirs == "__init__":
            continue
        assert RANK[theirs] < RANK[mine], (
            f"{module} imports {target}: {mine} (layer {RANK[mine]}) may not import {theirs} (layer {RANK[theirs]})")


def test_only_the_cli_imports_serve():
    importers = sorted({m for m, targets in GRAPH.items() for t, _ in targets
                        if _package(t) == "serve" and _package(m) not in ("serve", "cli", "__main__")})
    assert importers == []


def test_no_import_cycles():
    """Depth-first search over the imports that run at import time, module by module. A module's own
    enclosing packages are always mid-import when it runs, so an edge to one of them is no cycle."""
    edges = {m: sorted({t for t, now in targets if now and t in GRAPH and not m.startswith(t + ".") and t != m})
             for m, targets in GRAPH.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                walk(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            walk(m)


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The rules are not vacuous: a model module importing the trainers is caught."""
    bad = tmp_path / "r1lab" / "model" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from r1lab.train.grpo import Trainer\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path / "r1lab"
    try:
        (target, at_import), = [i for i in _imports(bad) if i[0] == "r1lab.train.grpo"]
    finally:
        ROOT = saved
    assert not at_import and RANK[_package(target)] > RANK["model"]
