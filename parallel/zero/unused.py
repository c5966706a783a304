"""Parameters that no dp rank gave a gradient this step: skipped by the optimizer, as torch skips them.

One process never updates a parameter whose ``grad`` is None after backward (a branch the step's data did not
take, an expert no token reached): torch's optimizers skip it — no weight decay, no momentum or Adam moment
decay, no step count. Data parallelism reduces *flat* gradient buckets (:mod:`parallel.data_parallel.reducer`),
where a parameter without a gradient on a rank contributes zeros; that is exact for the sum whenever some rank
had a gradient, but a parameter that got none on *any* rank then reaches the optimizer with a zero gradient and
AdamW moves it (decoupled weight decay, the moments' decay): the losses agree, the weights drift.

So the ranks agree, every step, on which parameters had a gradient anywhere (torch DDP does the same with
``find_unused_parameters=True``: it all-reduces a bitmap of locally used parameters each iteration; Li et al.,
"PyTorch Distributed", arXiv 2006.15704, §3.2.3). To cost no extra collective in the usual step, each rank first
counts its parameters that got no gradient (``b.had``, set by the reducer's hooks, also inside ``no_sync``) and
the count rides in a collective issued anyway: at stages ≥ 1 the gradient-norm all-reduce over dp (a fourth
float64: 32 bytes instead of 24; :func:`parallel.zero.grad_norm.grad_norm_sq`; expert buckets' counts are added
to it, so every rank takes the same branch), at stage 0 — whose norm needs no dp reduction — one extra element
of the last gradient bucket's all-reduce of each group (:mod:`parallel.data_parallel.unused_flag`). Only when the sum is
non-zero — some rank missed some parameter — a second all-reduce per group (control channel, max, one int64
flag per parameter: over dp for the dense buckets, over edp for expert buckets, :mod:`parallel.moe`) finds those
no rank had; they are listed in ``b.unused`` and the optimizer leaves them out (``grad = None``). An expert no
token reached on any rank of its edp group is skipped as one process skips it.

Optimizer offload (:mod:`.optimizer_offload`) skips them too: a bucket this rank missed a parameter of is not
updated early (inside backward) but in ``step()``, where the unused pieces are left out and keep their own step
counts (torch's per-parameter ``step``), as one process; with 8-bit moments each piece's segment likewise.

ZeRO-3 regions agree in :meth:`GradReducer._launch_late` instead. Two cases cannot be exact and warn with the
reason (never silently): the 1-bit family (1-bit Adam / LAMB, 0/1 Adam: one step count and, after warm-up, one
compressed momentum for the whole model — a parameter without a gradient counts as a zero gradient, as these
optimizers do on one process; :func:`warn_onebit_unused`) and the tied weights reduced after the pipeline's sum
(``deferred``: the pp exchange carries the summed gradient, not whether a stage had one;
:func:`parallel.pipeline.split.sync_tied_grads` warns when a stage's copy got none).
"""
from __future__ import annotations

import warnings

import torch

from parallel import comm

__all__ = ["eligible", "local_missing", "agree_unused", "warn_onebit_unused"]

ALL = "all"            # agree_unused's totals: one total that decides for every group


def eligible(b) -> bool:
    """Buckets this module decides for (see the module docstring for the others)."""
    return not getattr(b, "deferred", False) and not getattr(b, "at_finish", False) and hasattr(b, "had")


def local_missing(buckets, group=None, dp_group=None) -> int:
    """How many parameters of the eligible buckets got no gradient on this rank this step: all of them, or
    (``group`` given) those reduced over ``group`` (``b.group``, or ``dp_group`` for the dense ones)."""
    return sum(len(b.had) - sum(b.had) for b in buckets
               if eligible(b) and (group is None or (b.group or dp_group) is group))


def agree_unused(buckets, group, totals: dict) -> int:
    """``totals``: {id(reduction group): the sum over it of the ranks' :func:`local_missing` (or of flags)}, or
    {ALL: one sum for every group}; each group's buckets are reduced over ``b.group or group``. For each group
    whose total is non-zero, one all-reduce over its control channel finds the parameters no rank had a
    gradient for and sets ``b.unused`` (indices) on their buckets; every rank of a group sees the same total.
    The dense group goes first, then the others in bucket order (the same on every rank). Returns how many
    parameters are unused everywhere."""
    mine = [b for b in buckets if eligible(b)]
    groups = {id(group): group}
    for b in mine:
        groups.setdefault(id(b.group or group), b.group or group)
    n = 0
    for key, grp in groups.items():
        if not totals.get(key, totals.get(ALL, 0)):
            continue
        part = [b for b in mine if (b.group or group) is grp]
        had = torch.tensor([h for b in part for h in b.had], dtype=torch.int64)
        if grp.size > 1 and len(had):
            comm.all_reduce(had, grp.control(), op="max")
        k = 0
        for b in part:
            m = len(b.params)
            b.unused = tuple(i for i in range(m) if not had[k + i])
            n += len(b.unused)
            k += m
    return n


def warn_onebit_unused(z, compressed: bool) -> None:
    """The 1-bit family under ZeroOptimizer (``z.optimizer.local_gradients`` exists): said once, naming the
    parameters, when one got no gradient on any dp rank (warm-up: ``b.unused``) or — in the compressed phase,
    where the gradients are not reduced and no rank learns the others' — on this rank."""
    if getattr(z, "_warned_onebit", False) or not hasattr(z.optimizer, "local_gradients"):
        return
    if compressed:
        names = [b.names[i] for b in z.buckets if eligible(b) for i, h in enumerate(b.had) if not h]
    else:
        names = [b.names[i] for b in z.buckets for i in getattr(b, "unused", ())]
    if not names:
        return
    z._warned_onebit = True
    where = "on this dp rank (the compressed phase does not agree over ranks)" if compressed else "on any dp rank"
    warnings.warn(f"{type(z.optimizer).__name__}: {len(names)} parameter(s) got no gradient {where} this step "
                  f"(e.g. {names[:3]}); this optimizer keeps one step count and (after warm-up) one compressed "
                  f"momentum for the whole model, so it counts a missing gradient as zero and still moves them "
                  f"(momentum, weight decay) — as it does on one process, unlike torch's AdamW, which skips a "
                  f"parameter whose grad is None. Use optimizer.name adamw for exact skipping, or weight_decay 0 "
                  f"if those parameters must not move", stacklevel=3)
