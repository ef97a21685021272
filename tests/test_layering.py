"""The house's floors hold: imports only go down, and no module imports itself round a circle.

Floors, top to bottom (README "Architecture"):
    exporter.cli -> exporter.api -> exporter stages -> engines -> graph_passes -> export_errors
calibration_data sits beside the stages and imports only export_errors. Inside exporter/ the stages are
floors too, in the order data flows (`EXPORTER_FLOORS`); exporter.testing (seeded test models) is used by
tests, tools and the demo, never by the product. Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("exporter", "graph_passes", "engines", "calibration_data", "export_errors")

# What each top-level package may import besides itself.
ALLOWED = {
    "export_errors": set(),
    "graph_passes": {"export_errors"},
    "engines": {"export_errors", "graph_passes"},
    "calibration_data": {"export_errors"},
    "exporter": {"export_errors", "graph_passes", "engines", "calibration_data"},
}

# exporter's own floors, bottom first: a module may import its own floor and the ones below.
EXPORTER_FLOORS: list[tuple[str, ...]] = [
    ("exporter.config", "exporter.progress"),
    ("exporter.tasks",),
    ("exporter.model_dir",),
    ("exporter.validate",),
    ("exporter.restructure",),
    ("exporter.export",),
    ("exporter.quantize",),
    ("exporter.runtime", "exporter.report"),
    ("exporter.engine_stage", "exporter.cpu_engine_stage", "exporter.outputs", "exporter.logfile"),
    ("exporter.api",),
    ("exporter.cli", "exporter", "exporter.console"),
]
TEST_MODELS = "exporter.testing"
MAX_TOP_LEVEL_EXPORTER_MODULES = 12


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_modules(path: Path, name: str, known: Iterable[str]) -> Iterator[str]:
    """Our modules that `path` imports: `from a.b import c` names a.b.c when that is a module, else a.b."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                yield target


def import_graph() -> dict[str, set[str]]:
    modules = product_modules()
    return {name: set(imported_modules(path, name, modules)) - {name} for name, path in modules.items()}


def floor(module: str) -> int | None:
    for index, names in enumerate(EXPORTER_FLOORS):
        if any(module == n or module.startswith(n + ".") for n in names if n != "exporter"):
            return index
    return len(EXPORTER_FLOORS) - 1 if module == "exporter" else None


def layering_problems(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        top = module.split(".")[0]
        for target in sorted(targets):
            target_top = target.split(".")[0]
            if target_top != top and target_top not in ALLOWED[top]:
                problems.append(f"{module} imports {target}: {top} may not import {target_top}")
            elif target == TEST_MODELS or target.startswith(TEST_MODELS + "."):
                if not module.startswith(TEST_MODELS):
                    problems.append(f"{module} imports {target}: test models stay out of the product")
            elif top == target_top == "exporter" and not module.startswith(TEST_MODELS):
                mine, theirs = floor(module), floor(target)
                if mine is None or theirs is None:
                    problems.append(f"{module} or {target} has no floor in EXPORTER_FLOORS")
                elif theirs > mine:
                    problems.append(f"{module} imports {target}, a higher floor")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_only_go_down() -> None:
    assert layering_problems(import_graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_exporter_top_level_stays_small() -> None:
    top_level = sorted(p.name for p in (ROOT / "exporter").glob("*.py"))
    assert len(top_level) <= MAX_TOP_LEVEL_EXPORTER_MODULES, top_level


def test_every_exporter_module_has_a_floor() -> None:
    assert [m for m in import_graph() if m.startswith("exporter") and floor(m) is None] == [
        m for m in import_graph() if m.startswith(TEST_MODELS)
    ]


def test_every_package_says_what_enters_and_leaves() -> None:
    for init in sorted(ROOT.glob("*/**/__init__.py")):
        if init.parts[len(ROOT.parts)] in PACKAGES:
            assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"


def test_the_checks_can_fail() -> None:
    """The checkers catch what they are for: upward imports, test models in the product, circles."""
    graph = {
        "engines.base": {"exporter.api"},
        "graph_passes.pipeline": {"engines.base"},
        "exporter.model_dir.loader": {"exporter.export.torch_to_onnx"},
        "exporter.quantize.int8": {"exporter.testing.synthetic"},
        "exporter.model_dir.lora": {"exporter.model_dir.masks"},
        "exporter.model_dir.masks": {"exporter.model_dir.lora"},
    }
    problems = layering_problems(graph)
    assert len(problems) == 4, problems
    assert cycles(graph) == [["exporter.model_dir.lora", "exporter.model_dir.masks"]]
    assert "exporter.model_dir.loader" in import_graph()["exporter.api"]
