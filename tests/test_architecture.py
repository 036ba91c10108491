"""The package's shape: no import loops, own modules imported at the top, nothing cited
from outside the repository."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "vllm_amphista"
# Our modules that may be imported inside a function, and why.
LAZY_OWN_IMPORTS = {
    "vllm_amphista.kernels.triton_head_attention": "Triton is only imported where it runs",
    "vllm_amphista.kernels.triton_tree_attention": "Triton is only imported where it runs",
    "vllm_amphista.training.ray_launcher": "Ray is optional and heavy",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module of ours, imported inside a function?) for every import in path."""
    tree = ast.parse(path.read_text())
    nested = {id(node) for top in tree.body for node in ast.walk(top)
              if isinstance(top, ast.FunctionDef | ast.ClassDef) and node is not top}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("vllm_amphista", "benchmarks") and (
                    name in MODULES or name.startswith("benchmarks")):
                found.append((name, id(node) in nested))
    return found


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(p) for p in FILES}


def test_no_import_cycles() -> None:
    graph = {module_name(p): {m for m, _ in own_imports(p)} for p in FILES}
    state: dict[str, int] = {}  # 1 = on the path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                raise AssertionError("import loop: " + " -> ".join([*path, module, dep]))
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_own_modules_are_imported_at_the_top() -> None:
    lazy = sorted(f"{module_name(p)} imports {m}" for p in FILES for m, inside in own_imports(p)
                  if inside and m not in LAZY_OWN_IMPORTS)
    assert lazy == []


def test_the_package_never_imports_the_benchmarks() -> None:
    assert [p.name for p in FILES if any(m.startswith("benchmarks")
                                         for m, _ in own_imports(p))] == []


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    skip = set(LAZY_OWN_IMPORTS)  # they import triton/ray at their top
    code = "import importlib\n" + "".join(
        f"importlib.import_module({m!r})\n" for m in sorted(MODULES - skip))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_nothing_cites_documents_outside_the_repository() -> None:
    texts = [p for p in REPO.rglob("*") if p.suffix in (".py", ".md") and ".venv" not in p.parts
             and "runs" not in p.parts and p.is_file()]
    citing = [str(p.relative_to(REPO)) for p in texts
              if any(name in p.read_text(errors="ignore") for name in ("DESIGN" + ".md",
                                                                        "ENVIRONMENT" + ".md"))]
    assert citing == []
