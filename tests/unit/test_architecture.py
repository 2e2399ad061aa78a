"""The package reads as six services side by side over shared parts, with no import circles.

Invariants, read from every module's own imports (``ast``; module-level, inside functions and under
``TYPE_CHECKING`` alike, plus ``importlib.import_module`` / ``find_spec`` of a literal name):

- a service (``cache``, ``quantization``, ``registry``, ``router``, ``serving``, ``training``) imports only its
  own modules and the shared ones: ``llmops.common`` (the runtime, the clients and the contracts the
  services share: formats, datasets, artifacts, the response cache) and ``llmops.proto``;
- a shared module imports only shared modules, never a service or the composition layer;
- only the composition layer (``llmops.stack``, ``llmops.cli``) may import several services;
- no two modules import each other, directly or through others.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import llmops

ROOT = Path(llmops.__file__).parent
SERVICES = frozenset({"cache", "quantization", "registry", "router", "serving", "training"})
SHARED = frozenset({"common", "proto"})
COMPOSITION = frozenset({"stack", "cli"})
_IMPORTERS = frozenset({"import_module", "find_spec"})


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imported(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every ``llmops`` module ``module`` imports, with the line; ``from pkg import sub`` is ``pkg.sub``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in MODULES else base), node.lineno
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in _IMPORTERS and node.args and isinstance(node.args[0], ast.Constant):
                value = node.args[0].value
                if isinstance(value, str) and value.startswith("llmops."):
                    yield value, node.lineno


def _graph() -> dict[str, set[str]]:
    return {
        module: {target for target, _ in _imported(module, path) if target in MODULES and target != module}
        for module, path in MODULES.items()
    }


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_package_has_the_parts_this_test_knows() -> None:
    tops = {_top(m) for m in MODULES} - {""}
    assert tops == SERVICES | SHARED | COMPOSITION, "a new top-level part: say here what it may import"


def test_no_service_imports_another_service_and_shared_parts_import_no_service() -> None:
    crossings = []
    for module, path in MODULES.items():
        source = _top(module)
        if source in COMPOSITION or source == "proto":
            continue
        allowed = SHARED | ({source} if source in SERVICES else set())
        for target, line in _imported(module, path):
            if target.startswith("llmops.") and _top(target) not in allowed:
                crossings.append(f"{path.relative_to(ROOT.parent)}:{line} {module} imports {target}")
    assert not crossings, "\n".join(crossings)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_no_modules_import_each_other() -> None:
    circles = _circles(_graph())
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_checks_see_a_crossing_and_a_circle() -> None:
    """The two checks above can fail: a circle is found, and a crossing import is read."""
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
    imported = dict(_imported("llmops.serving.app", MODULES["llmops.serving.app"]))
    assert any(name.startswith("llmops.common.") for name in imported)
