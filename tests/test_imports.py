"""The import graph of parallel/ and launch/: no cycles, and imports inside functions only for optional
dependencies (so nothing needs to be imported lazily to dodge a cycle, and no preload list is needed)."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("parallel", "launch")
# Third-party packages that are extras (not in `dependencies`): imported where they are used, inside functions.
OPTIONAL = ("matplotlib", "datasets", "deepspeed", "safetensors", "transformers", "accelerate", "tokenizers", "pyarrow",
            "torch.utils.tensorboard", "tensorboard")


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    out[".".join(rel)] = os.path.join(d, f)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, module: str, is_pkg: bool, mods: dict):
    """(module-level project imports, function-level imports) of one file."""
    top, nested = set(), []

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            parts = parts if is_pkg else parts[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for t in targets(child):
                    if in_function:
                        nested.append((t, child.lineno))
                    elif t.split(".")[0] in PACKAGES:
                        top.add(t)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    visit(tree, False)
    return {t for t in top if t in mods and t != module}, nested


def _graph():
    mods = _modules()
    graph, nested = {}, {}
    for m, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        graph[m], nested[m] = _imports(tree, m, path.endswith("__init__.py"), mods)
    return graph, nested


def _cycles(graph: dict) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph, _ = _graph()
    assert len(graph) > 40                       # the walk found the packages
    assert "parallel.config.load" in graph["parallel.config"]
    cycles = _cycles(graph)
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(" → ".join(c) for c in cycles)


def test_config_is_a_leaf():
    graph, _ = _graph()
    outside = {m: sorted(t for t in ts if not t.startswith("parallel.config")) for m, ts in graph.items()
               if m.startswith("parallel.config")}
    assert not any(outside.values()), f"parallel.config imports other parts of parallel: {outside}"


def test_imports_inside_functions_only_for_optional_dependencies():
    _, nested = _graph()
    bad = [f"{m}:{line} imports {t}" for m, items in nested.items() for t, line in items
           if not any(t == o or t.startswith(o + ".") for o in OPTIONAL)]
    assert not bad, "imports inside functions (hoist them to the module top):\n" + "\n".join(sorted(bad))
