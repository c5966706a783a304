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
the count rides in the gradient-norm all-reduce over dp that stages ≥ 1 issue anyway (a fourth float64: 32 bytes
instead of 24; :func:`parallel.zero.grad_norm.grad_norm_sq`); stage 0, whose norm needs no dp reduction, sends
it alone (8 bytes on the dp group's control channel). Only when the sum is non-zero — some rank missed some
parameter — a second all-reduce (control channel, max, one byte-sized int64 flag per parameter) finds those no
rank had; they are listed in ``b.unused`` and the optimizer leaves them out (``grad = None``).

Not covered here: ZeRO-3 regions (their buckets agree in :meth:`GradReducer._launch_late`), the tied-parameter
bucket reduced after the pipeline's sum (``deferred``), expert buckets over their own group (:mod:`parallel.moe`),
optimizer offload (its streamed update does not skip) and 1-bit Adam (no flat reduction).
"""
from __future__ import annotations

import warnings

import torch

from parallel import comm

__all__ = ["eligible", "local_missing", "agree_unused", "warn_offload_unused"]


def eligible(b) -> bool:
    """Buckets this module decides for (see the module docstring for the others)."""
    return not getattr(b, "deferred", False) and not getattr(b, "at_finish", False) and b.group is None \
        and hasattr(b, "had")


def local_missing(buckets) -> int:
    """How many parameters of the eligible buckets got no gradient on this rank this step."""
    return sum(len(b.had) - sum(b.had) for b in buckets if eligible(b))


def agree_unused(buckets, group, total: int) -> int:
    """``total``: the dp sum of :func:`local_missing`. When non-zero, one all-reduce over ``group``'s control
    channel finds the parameters no rank had a gradient for and sets ``b.unused`` (indices) on their buckets;
    every rank calls it with the same ``total``. Returns how many parameters are unused everywhere."""
    if total == 0:
        return 0
    mine = [b for b in buckets if eligible(b)]
    had = torch.tensor([h for b in mine for h in b.had], dtype=torch.int64)
    if group.size > 1:
        comm.all_reduce(had, group.control(), op="max")
    k = n = 0
    for b in mine:
        m = len(b.params)
        b.unused = tuple(i for i in range(m) if not had[k + i])
        n += len(b.unused)
        k += m
    return n


def warn_offload_unused(z) -> None:
    """Optimizer offload streams one Adam update over whole flat chunks (one step count per chunk): it cannot
    skip a parameter, so one that no rank had a gradient for is moved by weight decay and the moments' decay
    where one process would leave it. Said once per optimizer, naming the parameters."""
    if getattr(z, "_warned_unused", False):
        return
    z._warned_unused = True
    names = [b.names[i] for b in z.buckets for i in getattr(b, "unused", ())]
    warnings.warn(f"zero.offload.optimizer: {len(names)} parameter(s) got no gradient on any dp rank this step "
                  f"(e.g. {names[:3]}); the offloaded Adam updates them anyway (weight decay, moment decay), unlike "
                  f"torch, which skips a parameter whose grad is None. Set zero.offload.optimizer: none for exact "
                  f"semantics, or weight_decay 0 if those parameters must not move", stacklevel=3)
