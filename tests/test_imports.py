"""Imports run one way: models -> graph_export's op layer; hw_plugins -> graph_export and
hw_plugins.base; the engine -> graph runner and plugins. Every import in every module
counts, including those inside functions."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("perfxlm", "graph_export", "hw_plugins")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's own __init__ is not an edge)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # `import a.b.c` of a function or class: its module
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):
                    edges.add(t)
        graph[mod] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_imports_of_every_kind():
    graph = import_graph()
    assert "graph_export.ops" in graph["graph_export.export"]                  # from x import y
    assert "perfxlm.engine.graph_runner" in graph["perfxlm.engine.model_runner"]
    assert "perfxlm.models.graph_cache" in graph["perfxlm.engine.executor_setup"]
    assert "hw_plugins.cpu.plan" in graph["hw_plugins.cpu.plugin"]               # inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_layers_import_one_way():
    allowed = {  # a module prefix -> prefixes it may import from this project
        "graph_export": ("graph_export",),
        "hw_plugins": ("hw_plugins", "graph_export"),
        "perfxlm.models": ("perfxlm.models", "graph_export", "perfxlm.version", "perfxlm.tokenizer"),
    }
    bad = []
    for mod, deps in import_graph().items():
        rule = next((v for k, v in allowed.items() if mod == k or mod.startswith(k + ".")), None)
        bad += [f"{mod} -> {d}" for d in deps if rule and not any(d == p or d.startswith(p + ".") for p in rule)]
    assert bad == []
