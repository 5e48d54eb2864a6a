"""gym_plugin's import graph: no cycle among its modules, and nothing outside ``gym_plugin/testing`` imports
``gym_plugin.testing``. Read from the source with ``ast`` (nothing is imported), over every module of the package.

What counts as an import: every ``import`` / ``from ... import`` statement of a module, wherever it stands: at the
top, inside a function (a lazy import), or under ``if TYPE_CHECKING:``. A lazy import still makes one module
depend on the other, and one that only exists to dodge an import-time cycle is a cycle in design terms, so it
fails here like a top-level one; an annotation-only import is a dependency too. ``from pkg import name`` is an edge
to ``pkg.name`` when that is a module, else to ``pkg``.

What does not count:
- the parent packages Python runs first when a submodule is imported (``import a.b.c`` runs ``a/__init__`` and
  ``a/b/__init__``): only the module named in the statement is a dependency;
- module names held as data and imported by name at run time: `gym_plugin.servers.registry.BUILTIN_MODULES`
  (implementation name -> the module that registers it, imported when a config names it) and the lazy exports of
  ``gym_plugin/__init__`` and ``gym_plugin/servers/embedded/__init__``. The registry knows names, not modules;
  the servers depend on the registry (its decorator), never the other way round.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gym_plugin"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _edges(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported gym_plugin module: line of the first statement importing it}."""
    edges: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        out: dict[str, int] = {}
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                if target.startswith("gym_plugin") and target != name:
                    while target not in mods:  # `import gym_plugin.x.y` where y is a name, not a module
                        target = target.rsplit(".", 1)[0]
                    out.setdefault(target, node.lineno)
        edges[name] = out
    return edges


def _cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_lazy_and_type_checking_imports():
    # The walk itself, on modules whose imports are known: a function-level import and a relative-free
    # `from pkg import module` are both edges.
    edges = _edges(_modules())
    assert "gym_plugin.servers.base" in edges["gym_plugin.servers.agent"]  # top-level
    assert "gym_plugin.servers.head" in edges["gym_plugin.launch"]
    assert "gym_plugin.models.tiny" in edges["gym_plugin.models"]  # inside load_policy_model
    assert "gym_plugin.weight_sync.vllm" in edges["gym_plugin.weight_sync"]  # `from pkg.module import name`
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_gym_plugin_modules():
    mods = _modules()
    edges = _edges(mods)
    problems = []
    for component in _cycles(edges):
        inside = set(component)
        lines = [f"    {m} -> {t} ({mods[m].relative_to(PACKAGE.parent)} line {line})"
                 for m in component for t, line in sorted(edges[m].items()) if t in inside]
        problems.append(f"cycle among {component}:\n" + "\n".join(lines))
    assert not problems, "\n".join(problems)


def test_nothing_outside_testing_imports_gym_plugin_testing():
    edges = _edges(_modules())
    offenders = [f"{m} imports {t} (line {line})" for m, targets in sorted(edges.items())
                 if not m.startswith("gym_plugin.testing")
                 for t, line in targets.items() if t == "gym_plugin.testing" or t.startswith("gym_plugin.testing.")]
    assert not offenders, offenders
