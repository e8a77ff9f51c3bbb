"""The module structure of kernelgen and lowmem_ops: no import circle (counting imports inside
functions too, which only hide one), every kernelgen module imports on its own in a fresh
interpreter, and the contract both sides share needs none of the generator's dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernelgen", "lowmem_ops")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `name` imports anywhere in its body. `from P import x` counts as
    importing P.x where that is a module, else P."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_reads_relative_and_lazy_imports():
    # the walker itself, on modules whose imports are known: a lazy import inside a function counts
    graph = {n: _imports(n, p, set(_modules())) for n, p in _modules().items()}
    assert "kernelgen.space" in graph["kernelgen.families.activation"]  # from .. import space
    assert "kernelgen.families.norm" in graph["kernelgen.families"]  # from .norm import NORM
    assert "kernelgen.build" in graph["kernelgen.tuner"]  # inside plan()
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# The one circle left in the runtime (lazy imports: memory.plan -> plan -> conversion -> memory);
# breaking it is conversion.py's and plan.py's business. Any other circle fails the test.
KNOWN_CIRCLES = {"kernelgen": [], "lowmem_ops": [["lowmem_ops.conversion", "lowmem_ops.memory", "lowmem_ops.plan"]]}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle(package):
    modules = _modules()
    graph = {n: _imports(n, p, set(modules)) for n, p in modules.items() if n.split(".")[0] == package}
    graph = {n: {m for m in deps if m in graph} for n, deps in graph.items()}
    # a package's __init__ importing its own submodules is how a package is built, not a circle
    # back to it: a submodule importing its package is what would close one
    assert _cycles(graph) == KNOWN_CIRCLES[package]


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_kernelgen_module_imports_on_its_own():
    names = [n for n in _modules() if n.split(".")[0] == "kernelgen" and not n.startswith("kernelgen.specs")
             and not n.endswith("__main__")]  # __main__ runs the command line
    # one interpreter per module: an import that works only after another module was imported fails here
    script = ("import importlib, subprocess, sys\n"
              f"for name in {names!r}:\n"
              "    r = subprocess.run([sys.executable, '-c', f'import {name}'], capture_output=True, text=True)\n"
              "    if r.returncode:\n"
              "        print(name, r.stderr.strip().splitlines()[-1])\n")
    result = _fresh(script)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_the_contract_needs_no_generator_dependency_and_the_generator_no_runtime():
    result = _fresh("import sys\n"
                    "import kernelgen.contract\n"
                    "heavy = sorted(m for m in ('jinja2', 'sympy', 'scipy', 'torch', 'triton', 'lowmem_ops') if m in sys.modules)\n"
                    "print(heavy)\n"
                    "import lowmem_ops._contract as c\n"
                    "print(c is kernelgen.contract.contract)\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]  # lowmem_ops then shares the module kernelgen loaded
