"""The layers of docs/architecture.md, checked on the code's own imports (every import, those inside
functions too): no import circle between persona_tune's modules, and no library module imports a
stage module (a `persona-tune` command's module)."""

from __future__ import annotations

import ast
from pathlib import Path

from persona_tune.cli import COMMANDS

PACKAGE = Path(__file__).resolve().parent.parent / "persona_tune"
STAGES = {module for module, _ in COMMANDS.values()}
ENTRY = {"persona_tune.cli"}  # the command line itself
# The bottom layer: the file contract, variant names, the Config machinery, names, errors, resources.
FOUNDATION = {f"persona_tune{m}" for m in ("", ".runfolder", ".variants", ".stage", ".names", ".errors",
                                            ".resources", ".net", ".noise")}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports() -> dict[str, dict[str, int]]:
    """module -> {imported persona_tune module: line of the first such import}."""
    mods = modules()
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target in mods and target != module:
                    edges[module].setdefault(target, node.lineno)
    return edges


def circles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_every_command_module_exists():
    assert STAGES <= set(modules()), STAGES - set(modules())


def test_no_import_circle():
    assert circles(imports()) == []


def test_the_check_finds_a_circle():
    assert circles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_library_modules_never_import_a_stage_module():
    wrong = [f"{module} -> {target} (line {line})" for module, targets in imports().items()
             if module not in STAGES | ENTRY for target, line in targets.items() if target in STAGES]
    assert wrong == []


def test_the_foundation_imports_nothing_above_it():
    wrong = [f"{module} -> {target} (line {line})" for module in FOUNDATION
             for target, line in imports()[module].items() if target not in FOUNDATION]
    assert wrong == []
