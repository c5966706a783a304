"""Reductions over a split feature dimension: a forward that takes a statistic across the features of a
column-parallel output computes it over 1/tp of them per rank.

A column layer's output Y = [Y_1 | … | Y_tp] is split along its last (feature) dimension; elementwise code
on it is exact per shard, but a reduction along that dimension is not: Gemma-3n's MLP sparsifies its gate
activations with a Gaussian top-k, ``relu(g − (mean(g, −1) + std(g, −1)·Φ⁻¹(s)))`` (Gemma 3n, "activation
sparsity"), and mean(Y_i) ≠ mean(Y), std(Y_i) ≠ std(Y): every rank cuts at its own threshold and the losses
differ (1e-3 relative at tp = 2, no error). Such a forward is refused at plan time, naming the line.

:func:`split_reduction` follows the forward in source order (branches inlined, like :func:`.semantics._input_width`):
a name holds a per-rank feature shard when it is assigned from an expression that calls a split child
(``self.gate_proj(x)``) or loads such a name, with no shape-changing call in between (``view``, ``reshape``,
``transpose``, ``@``, … make it something else: attention's q/k/v reshaped into heads reduce over keys, not
features). A reduction (mean, std, var, sum, norm, softmax, topk, max, …) of such a name along the last
dimension (``dim=-1``) or over all elements (no ``dim``) is reported; a method called on self with such an
argument is followed into, its parameter holding the shard.
"""
from __future__ import annotations

import ast
import inspect

from parallel.tensor_parallel.source_ast import _fn_tree, _is_self_attr, _self_name, _simple_statements

REDUCTIONS = {"mean", "std", "var", "sum", "norm", "softmax", "log_softmax", "logsumexp", "amax", "amin", "max",
              "min", "topk", "sort", "argmax", "argmin", "cumsum", "prod", "median", "quantile", "kthvalue",
              "std_mean", "var_mean", "nansum", "nanmean", "normalize", "layer_norm", "rms_norm"}
# Calls after which a tensor no longer has the split features as its last dimension (or is no longer elementwise).
RESHAPES = {"view", "reshape", "transpose", "permute", "flatten", "unflatten", "matmul", "bmm", "einsum", "split",
            "chunk", "unsqueeze", "squeeze", "movedim", "swapaxes", "t", "mT", "view_as", "expand", "repeat",
            "unbind", "narrow", "gather", "index_select", "linear", "conv1d", "scaled_dot_product_attention"}


def _call_name(c: ast.Call) -> str | None:
    f = c.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _dim(c: ast.Call, method: bool):
    """The reduction's dim: an int, "none" (reduces everything), or None (unknown: a variable)."""
    for k in c.keywords:
        if k.arg in ("dim", "axis"):
            v = k.value
            if isinstance(v, ast.UnaryOp) and isinstance(v.op, ast.USub) and isinstance(v.operand, ast.Constant):
                return -v.operand.value
            return v.value if isinstance(v, ast.Constant) and isinstance(v.value, int) else None
        if k.arg == "normalized_shape":
            return -1
    pos = c.args[0 if method else 1:]
    if _call_name(c) in ("layer_norm", "rms_norm"):
        return -1
    if not pos:
        return "none"
    v = pos[0]
    if isinstance(v, ast.UnaryOp) and isinstance(v.op, ast.USub) and isinstance(v.operand, ast.Constant):
        return -v.operand.value
    return v.value if isinstance(v, ast.Constant) and isinstance(v.value, int) else None


def _loads(n) -> set:
    return {x.id for x in ast.walk(n) if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Load)}


def split_reduction(cls, split: set, row: set = frozenset()) -> str | None:
    """Where ``cls.forward`` (or a method it calls on self) reduces the output of a child in ``split`` (column
    layers) along its feature dimension, as ``"Class.method line N: `code`"``, or None."""
    seen: set = set()

    def visit(fname: str, shards: set) -> str | None:
        if (fname, frozenset(shards)) in seen:
            return None
        seen.add((fname, frozenset(shards)))
        got = _fn_tree(inspect.getattr_static(cls, fname, None))
        if got is None:
            return None
        fn, start, _ = got
        me = _self_name(fn)
        per_rank = set(shards)

        def shard_expr(n) -> bool:
            calls = [c for c in ast.walk(n) if isinstance(c, ast.Call)]
            if any(isinstance(x, ast.BinOp) and isinstance(x.op, ast.MatMult) for x in ast.walk(n)):
                return False
            if any(_call_name(c) in RESHAPES for c in calls):
                return False
            if any(_is_self_attr(c.func, me) and c.func.attr in row for c in calls):
                return False
            return bool(_loads(n) & per_rank) or any(_is_self_attr(c.func, me) and c.func.attr in split
                                                     for c in calls)

        for st in _simple_statements(fn.body):
            for c in (x for x in ast.walk(st) if isinstance(x, ast.Call)):
                if _is_self_attr(c.func, me):           # a method on self: followed with its shard parameters
                    if inspect.isfunction(inspect.getattr_static(cls, c.func.attr, None)):
                        sub = {p for p, a in zip(_method_params(cls, c.func.attr), c.args) if shard_expr(a)}
                        if sub and (why := visit(c.func.attr, sub)):
                            return why
                    continue
                method = isinstance(c.func, ast.Attribute) and not (isinstance(c.func.value, ast.Name)
                                                                    and c.func.value.id in ("torch", "F", "nn"))
                operand = c.func.value if method else (c.args[0] if c.args else None)
                if _call_name(c) in REDUCTIONS and operand is not None and shard_expr(operand) \
                        and _dim(c, method) in (-1, "none"):
                    return f"{cls.__qualname__}.{fname} line {start + st.lineno - 1}: `{ast.unparse(st)[:120]}`"
            value = getattr(st, "value", None)
            targets = getattr(st, "targets", None) or [getattr(st, "target", None)]
            names = {x.id for t in targets if t is not None for x in ast.walk(t) if isinstance(x, ast.Name)}
            if value is not None and names:
                per_rank = per_rank | names if shard_expr(value) else per_rank - names
        return None

    return visit("forward", set())


def _method_params(cls, fname: str) -> list:
    got = _fn_tree(inspect.getattr_static(cls, fname, None))
    return [a.arg for a in got[0].args.args[1:]] if got else []
