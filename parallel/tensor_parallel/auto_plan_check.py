"""The numerical check behind :mod:`.auto_plan`: one block converted at tp ranks in a single process.

Each of the tp copies of the block is converted by the real conversion code as rank r (its weight shards
and per-rank head attributes); its row-parallel layers return rank r's partial X_r A_r, recorded, and the
replayed sum over ranks Σ_r X_r A_r + b — the all-reduce. Pass k fixes the k-th row call's sum, so a block
with n row calls settles in n + 1 passes (at most ``_MAX_PASSES``). A plan is accepted when every rank's
output equals the unsplit block's: max|y_r − y| ≤ TOL · max|y| (:func:`_simulate`). :func:`_partial_grads`
finds the replicated modules that act on tp-split tensors (their gradients need a tp all-reduce).
"""
from __future__ import annotations

import copy
import functools as ft
import re

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from parallel.comm import Group
from parallel.tensor_parallel.layers import RowParallelLinear

__all__ = ["TOL"]

TOL = 1e-5                         # max|y_r − y| / max|y| of the simulated block, fp32
_MAX_PASSES = 16                   # row-layer replay passes (n row calls per block need n + 1)


def _row_sim(mod, x, state):
    """Rank r's partial X_r A_r, recorded; returns the replayed sum over ranks (+ b once) when known."""
    y = F.linear(x, mod.weight.t() if mod.transposed else mod.weight)
    i = len(state["calls"])
    state["calls"].append(y)
    y = (state["sums"][i] if i < len(state["sums"]) else y).clone()     # fresh: the model may add in place
    return y if mod.bias is None else y + mod.bias


def _short(e: Exception) -> str:
    msg = re.sub(r"^tensor-parallel plan cannot be applied to \w+ with tp = \d+: *", "", " ".join(str(e).split()))
    return f"{type(e).__name__}: {msg[:240]}"


def _run(block, inputs, dtype):
    args, kwargs = tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else
                            (t.clone() if isinstance(t, torch.Tensor) else t), inputs)       # fresh copies
    with torch.no_grad():
        out = block(*args, **kwargs)
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _reference(block) -> tuple:
    """(dtype, an eval copy of ``block`` in it): float64 blocks stay float64, anything else runs in fp32."""
    dtype = torch.float64 if next(block.parameters()).dtype == torch.float64 else torch.float32
    return dtype, copy.deepcopy(block).to(dtype).eval()


def _converted_rank(ref_block, rel_plan: dict, tp: int, r: int, convert, state: dict):
    """A copy of ``ref_block`` converted as tp rank ``r``, its row layers replaying the all-reduce (``state``)."""
    c = copy.deepcopy(ref_block)
    convert(c, Group(None, "tp", tuple(range(tp)), r), dict(rel_plan))
    for m in c.modules():
        if isinstance(m, RowParallelLinear):
            m.forward = ft.partial(_row_sim, m, state=state)
    return c


def _simulate(block, inputs, rel_plan: dict, tp: int, convert) -> str | None:
    """None when every rank's output of the converted block equals the unsplit block's; else the reason."""
    dtype, ref_block = _reference(block)
    ref = _run(ref_block, inputs, dtype)
    state = {"sums": [], "calls": []}
    try:
        copies = [_converted_rank(ref_block, rel_plan, tp, r, convert, state) for r in range(tp)]
    except Exception as e:                               # the conversion refused it
        return "the conversion refuses it: " + _short(e)
    try:
        for _ in range(_MAX_PASSES):
            partials, outs = [], []
            for c in copies:
                state["calls"] = []
                outs.append(_run(c, inputs, dtype))
                partials.append(state["calls"])
            sums = [sum(ps) for ps in zip(*partials)]
            if len(sums) == len(state["sums"]) and all(torch.equal(a, b) for a, b in zip(sums, state["sums"])):
                break
            state["sums"] = sums
        else:
            return f"the row-layer sums did not settle in {_MAX_PASSES} passes"
    except Exception as e:                               # the model's own code fails on the split
        return "the model's forward fails on it: " + _short(e)
    for r, out in enumerate(outs):
        if len(out) != len(ref) or any(a.shape != b.shape for a, b in zip(out, ref)):
            shapes = [[tuple(t.shape) for t in o] for o in (out, ref)]
            return f"rank {r}'s output shapes {shapes[0]} differ from {shapes[1]}"
        for a, b in zip(out, ref):
            err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
            if not err <= TOL:
                return f"rank {r}'s output differs from the unsplit block by {err:.2g} (relative, > {TOL:g})"
    return None


def _partial_grads(block, inputs, rel_plan: dict, tp: int, convert) -> list:
    """Modules of the block outside the plan that hold parameters and act on a tensor split across tp (a
    per-head q/k norm between the column and the row layer, Gemma3 / OLMo2 / Qwen3): each rank's gradient of
    their replicated weights covers only its own heads, so it must be summed over tp
    (``replicated_grad_allreduce``). Found by shape: their input on rank 0 of the converted block differs from
    the unsplit block's. Modules on replicated tensors (a norm before the column layers) keep whole gradients."""
    if not rel_plan:
        return []
    planned = [n for n in rel_plan]
    cands = [n for n, m in block.named_modules() if n and any(p is not None for p in m._parameters.values())
             and n not in planned and not any(k.startswith(n + ".") for k in planned)]
    if not cands:
        return []
    dtype, ref_block = _reference(block)
    conv = _converted_rank(ref_block, rel_plan, tp, 0, convert, {"sums": [], "calls": []})
    shapes: dict = {}

    def record(mod, args, kwargs, key):
        t = next((a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)), None)
        shapes.setdefault(key, None if t is None else tuple(t.shape))

    hooks = []
    for tag, blk in (("ref", ref_block), ("tp", conv)):
        mods = dict(blk.named_modules())
        hooks += [mods[n].register_forward_pre_hook(ft.partial(record, key=(tag, n)), with_kwargs=True)
                  for n in cands if n in mods]
    try:
        _run(ref_block, inputs, dtype)
        _run(conv, inputs, dtype)
    except Exception:                                    # _simulate accepted this plan: not expected
        return []
    finally:
        for h in hooks:
            h.remove()
    return [n for n in cands if shapes.get(("ref", n)) is not None
            and shapes.get(("tp", n)) not in (None, shapes[("ref", n)])]
