"""The global gradient norm of a ZeRO partition, and what a non-finite one does to the step.

Global gradient norm (for clipping and reporting), ‖g‖² = Σ over the dp partitions (stage ≥ 1)
and over ``norm_groups``: a parameter split by tp (``param_info(p).tp_split``) is a distinct shard per tp rank
(summed over a group whose axis is "tp"); any other parameter is replicated over tp and counted
once (from tp rank 0); a parameter with ``param_info(p).pp_duplicate`` is a second copy (a tied
embedding on the last pipeline stage) and is not counted, nor is one with ``tp_duplicate`` (a replicated
kv head on all but the first of the tp ranks holding it); over other groups (pp) all are summed.
The three parts are kept apart, [Σ tp-split g², Σ replicated g², Σ duplicate g²], in float64.

Non-finite policy (``on_nonfinite``, the config's ``train.on_nonfinite``). The parts are
all-reduced, so every rank sees the same verdict and takes the same branch:

* fp16: the loss scaler owns overflow (skip the step, lower the scale), whatever the policy;
* ``stop``: raise :class:`NonFiniteError`, nothing applied;
* ``skip``: drop this step's gradients, leave weights and optimizer state as they are; the step
  still counts (like an fp16 overflow), its result says ``nonfinite_skip``. The engine counts
  consecutive skips: more than ``train.max_skips`` (default 10) in a row raise
  :class:`NonFiniteError` (:meth:`parallel.engine.Engine.step`).
"""
from __future__ import annotations

import torch

from parallel import comm
from parallel.parameters import param_info

__all__ = ["NONFINITE_POLICIES", "NonFiniteError", "SKIP_MESSAGE", "norm_segments", "grad_norm_sq", "piece_kind",
           "sum_over_groups"]

NONFINITE_POLICIES = ("stop", "skip")
SKIP_MESSAGE = "non-finite gradient: update skipped (train.on_nonfinite=skip)"


class NonFiniteError(RuntimeError):
    """A step produced a non-finite gradient or loss and the policy is ``stop``; the update was not
    applied. ``parts``: the gradient norm² parts [tp-sharded, replicated, duplicate]."""

    def __init__(self, message: str, parts=()):
        super().__init__(message)
        self.parts = [float(x) for x in parts]


def piece_kind(p) -> int:
    """The norm part parameter ``p`` counts in: 0 = tp split, 1 = replicated, 2 = duplicate."""
    info = param_info(p)
    return 2 if info.pp_duplicate or info.tp_duplicate else 0 if info.tp_split else 1


def norm_segments(b) -> list:
    """Runs (a, e, kind) of bucket ``b`` in shard coordinates; kind as :func:`piece_kind`."""
    segs = []
    for i, a, e in b.pieces():
        kind = piece_kind(b.params[i])
        if segs and segs[-1][2] == kind and segs[-1][1] == a - b.lo:
            segs[-1] = (segs[-1][0], e - b.lo, kind)
        else:
            segs.append((a - b.lo, e - b.lo, kind))
    return segs


def grad_norm_sq(buckets, segments: dict, dp_group, partitioned: bool, norm_groups,
                 count: torch.Tensor | None = None) -> torch.Tensor:
    """[Σ tp-split g², Σ replicated g², Σ duplicate g²] over the whole model (float64), from the
    ``master.grad`` of ``buckets``; ``partitioned``: each dp rank holds a different part (stage ≥ 1).
    Expert buckets (``b.group`` set, :mod:`parallel.moe`) are partitioned over their own group and hold
    distinct experts on each rank of ``b.norm_group`` (ep): their part is summed over both.
    ``count`` (float64 slots, partitioned only): summed over dp in the same all-reduce, in place, and read
    back before any sum over ``norm_groups`` — the parameters without a gradient (:mod:`parallel.zero.unused`)
    and, from the engine, the step's loss (:mod:`parallel.zero.norm_carry`): 8 more bytes each and no extra
    collective."""
    dev = buckets[0].master.device
    parts: dict = {}                                 # one partial sum per partition group, in bucket order
    if count is not None and partitioned:
        parts[id(dp_group)] = (dp_group, None, torch.zeros(3 + len(count), dtype=torch.float64, device=dev))
        parts[id(dp_group)][2][3:] = count
    for b in buckets:
        grp = b.group or dp_group
        part = parts.setdefault(id(grp), (grp, b.norm_group, torch.zeros(3, dtype=torch.float64, device=dev)))[2]
        g = b.master.grad
        for a, e, kind in segments[b]:
            part[kind] += torch.linalg.vector_norm(g[a:e]).double() ** 2     # fp32 norm, summed in fp64
    v = torch.zeros(3, dtype=torch.float64, device=dev)
    for grp, across, part in parts.values():
        if partitioned:
            comm.all_reduce(part, grp)
        if across is not None:
            comm.all_reduce(part, across)
        if len(part) > 3:
            count.copy_(part[3:])
        v += part[:3]
    return sum_over_groups(v, norm_groups)


def sum_over_groups(v: torch.Tensor, norm_groups) -> torch.Tensor:
    """The three parts ``v`` of this rank summed over ``norm_groups`` (tp, pp) in place."""
    for grp in norm_groups:
        if grp.axis == "tp" and grp.rank != 0:
            v[1] = 0.0                           # replicated over tp: counted once
        comm.all_reduce(v, grp)
    return v
