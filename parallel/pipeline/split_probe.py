"""The pipeline split's probe forward: the whole model run once (or ``repeats`` times) on ``sample`` with
hooks on the body's blocks and the other parameter owners — the first-call order, per-block times or FLOPs,
the hidden state's extra dims, and the block inputs other than the hidden state; a block input computed
from parameters (it requires grad with every parameter requiring grad) is refused by the split."""
from __future__ import annotations

import contextlib
import inspect
import itertools
import time

import torch
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["probe"]


def probe(model, body, owners, sample, repeats, flops=False):
    """Run the whole model on ``sample`` with hooks: the first-call order of each owner relative
    to the body, per-block and per-owner forward times (min over ``repeats``) or, with ``flops``, the
    FLOPs FlopCounterMode counts inside each, and the block I/O form."""
    fc = FlopCounterMode(display=False) if flops else contextlib.nullcontext()
    clock = fc.get_total_flops if flops else time.perf_counter
    seq, order, t_in, cost = itertools.count(), {}, {}, {}
    info = {"calls": [], "start": None, "end": None, "tuple": 0, "hidden": True}
    handles = []

    def pre(key):
        def h(mod, args, kwargs):
            order.setdefault(key, next(seq))
            t_in[key] = clock()
            if isinstance(key, int):
                info["calls"].append(key)
                info["hidden"] &= bool(args) or "hidden_states" in kwargs
                info["start"] = order[0]
                learned = info.setdefault("learned", [])
                learned += [n for n in _learned_inputs(mod, args, kwargs) if n not in learned]
        return h

    def post(key):
        def h(mod, args, kwargs, out):
            cost.setdefault(key, []).append(clock() - t_in[key])
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(key, int) and isinstance(hidden, torch.Tensor):      # what block key hands on
                info.setdefault("outs", {}).setdefault(key, (tuple(hidden.shape), hidden.dtype))
            if key == len(body) - 1 and info["end"] is None:
                info["end"] = next(seq)
                info["tuple"] = len(out) if isinstance(out, (tuple, list)) else 0
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                info["extra_dims"] = hidden.dim() - sample.dim() if isinstance(hidden, torch.Tensor) else 1
        return h

    for key, mod in list(enumerate(body)) + list(owners.items()):
        handles.append(mod.register_forward_pre_hook(pre(key), with_kwargs=True))
        handles.append(mod.register_forward_hook(post(key), with_kwargs=True))
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    try:
        # with gradients on every parameter, a block input computed from parameters requires grad
        for p in grads:
            p.requires_grad_(True)
        with torch.enable_grad(), fc:
            for _ in range(repeats):
                model(sample)
    except Exception as e:
        raise ValueError(f"pipeline split: probing {type(model).__name__} with an input of shape "
                         f"{tuple(sample.shape)} failed ({type(e).__name__}: {e}); pass sample= a valid "
                         "input (e.g. one micro-batch)") from e
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
        for p, g in grads.items():
            p.requires_grad_(g)
    name = type(model).__name__
    if info["calls"] != list(range(len(body))) * repeats or not info["hidden"]:
        counts = {i: info["calls"].count(i) // repeats for i in range(len(body))}
        again = {i: c for i, c in counts.items() if c != 1}
        what = (f"blocks called more than once or never per forward ({again}: a looped or recurrent "
                f"model)" if again else "not called with the hidden state first or as hidden_states="
                if not info["hidden"] else "blocks called out of order")
        raise ValueError(f"pipeline split: the blocks of {name} are not each called once, in order, with the "
                         f"hidden state first or as hidden_states= ({what}; calls: {info['calls'][:12]}); "
                         "stages need a straight block stack: set parallel.pp=1 for this model")
    if info.get("learned"):
        raise ValueError(f"pipeline split: the blocks of {name} receive {', '.join(info['learned'])} besides the "
                         f"hidden state, computed with parameters (e.g. a learned position bias or per-layer "
                         f"embeddings made before the blocks); a later stage would get zeros for it, not the "
                         f"value. Stages support per-layer inputs computed without parameters (masks, rotary "
                         f"tables) only: set parallel.pp=1 for this model")
    return order, {k: min(v) for k, v in cost.items()}, info


def _learned_inputs(block, args, kwargs) -> list:
    """The block's tensor inputs, other than the hidden state, that require grad while every parameter
    does: they were computed with parameters, so the stage that owns the block cannot rebuild them."""
    try:
        names = list(inspect.signature(block.forward).parameters)
    except (TypeError, ValueError):
        names = []
    found = []
    for i, a in enumerate(args[1:], 1):
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten(a)[0]):
            found.append(f"`{names[i]}`" if i < len(names) else f"positional argument {i}")
    for k, a in kwargs.items():
        if k != "hidden_states" and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten(a)[0]):
            found.append(f"`{k}`")
    return found


# ----------------------------------------------------------------------------------- planning
