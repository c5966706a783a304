"""Reading a Python method's source as an AST: the helpers :mod:`parallel.tensor_parallel.semantics` and
:mod:`parallel.tensor_parallel.reductions` share to follow a module's ``forward`` (which ``self.<attr>`` it reads,
its simple statements in source order)."""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap

__all__ = ["_fn_tree", "_self_name", "_is_self_attr", "_simple_statements"]


@functools.lru_cache(maxsize=None)
def _fn_tree(fn):
    """(ast.FunctionDef, first line, file) of a Python function, or None where its source is unavailable."""
    try:
        lines, start = inspect.getsourcelines(fn)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0] if tree.body and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    return None if node is None else (node, start, inspect.getsourcefile(fn) or "?")


def _self_name(fn: ast.FunctionDef) -> str | None:
    return fn.args.args[0].arg if fn.args.args else None


def _is_self_attr(node, self_name) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == self_name


def _simple_statements(body):
    """The simple statements of a function body in source order (compound statements' bodies inlined)."""
    for st in body:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        inner = [getattr(st, f, []) for f in ("body", "orelse", "handlers", "finalbody")]
        if any(inner):
            for part in inner:
                yield from _simple_statements(part)
        else:
            yield st
