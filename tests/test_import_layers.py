"""The layering rules, checked on the source: nothing under engines/ imports `server` (engines/ is the layer
below HTTP, usable without it), and kiln's modules import each other without a cycle.

The cycle rule: every import of a kiln module (engines.*, server.*) is an edge of the graph, wherever it is
written, at module level or inside a function. A lazy import therefore cannot hide a cycle: a shared helper
two modules need moves to a module of its own instead (engines/build/result.py, engines/build/fingerprint.py).
Imports of third-party packages are no edges, so importing an optional or heavy dependency (tensorrt_llm,
transformers, triton) inside the function that needs it stays fine. Imports under `if TYPE_CHECKING:` are left
out: they never run. A package's __init__ is not an implicit edge of its submodules' imports.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engines", "server")


def _module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = _module_files()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(module: str, path: Path) -> list[str]:
    """Every dotted name `module` imports (`from a import b` gives a.b), relative imports resolved, except
    those under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_type_checking(node)
        for child in node.body
        for n in ast.walk(child)
    }
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def _kiln_module(name: str) -> str | None:
    """The kiln module a dotted name lives in (a.b.c -> a.b when c is a function of a.b)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets = {_kiln_module(name) for name in _imported_names(module, path) if name.split(".")[0] in PACKAGES}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_under_engines_imports_server():
    offenders = sorted(
        f"{module} imports {name}"
        for module, path in MODULES.items()
        if module.startswith("engines")
        for name in _imported_names(module, path)
        if name.split(".")[0] == "server"
    )
    assert offenders == []


def test_importing_every_engines_module_loads_no_server_module():
    """The transitive check: import every module under engines/ in a fresh interpreter, then look for `server`."""
    engines_modules = [module for module in MODULES if module.startswith("engines")]
    script = (
        "import importlib, json, sys\n"
        f"for name in {engines_modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'server' or m.startswith('server.'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_kiln_modules_import_each_other_without_a_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_check_sees_lazy_imports():
    """The checker itself: an import inside a function closes a cycle as much as one at module level."""
    graph = {"engines.a": {"engines.b"}, "engines.b": {"engines.a"}, "engines.c": set()}
    assert find_cycle(graph) == ["engines.a", "engines.b", "engines.a"]
    assert find_cycle({"engines.a": {"engines.b"}, "engines.b": set()}) is None
    source = "import json\n\ndef f():\n    from engines.build import builder\n    import tensorrt_llm\n"
    tree_names = _names_in(source, "engines.trtllm.build")
    assert "engines.build.builder" in tree_names and "tensorrt_llm" in tree_names


def _names_in(source: str, module: str) -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.py"
        path.write_text(source)
        return _imported_names(module, path)
