"""The step's gradient-norm all-reduce and what rides in it: the unused-parameter count and the step's loss.

At stages ≥ 1 the global gradient norm needs one all-reduce over dp of three float64 parts
(:func:`parallel.zero.grad_norm.grad_norm_sq`). Two small sums that every step needs anyway ride in it as
further float64 slots, each read back right after the dp all-reduce (before any sum over tp / pp):

* slot 3: the parameters this rank got no gradient for (:mod:`.unused`, ``local_missing``), summed over dp;
* slot 4 (when the caller set ``z.loss_carry``): this rank's mean micro-batch loss of the step, summed over
  dp into ``z.carried_loss``. The engine (:meth:`parallel.engine.Engine.train_step`; with pp > 1 the last
  stage's loss, broadcast over pp before the step) then reports
  ``z.carried_loss / dp`` — the same float64 sum its separate control all-reduce over dp·cp (the ZeRO
  group) gave, without that extra blocking call after the step. The verdict (non-finite gradient) reads the
  three norm parts only, as before; a non-finite loss is summed and reported as it was.

Where nothing is reduced over dp by the norm — stage 0 (the gradient is already all-reduced, the norm is
local), stage 0 over one rank (``z.direct``), 1-bit Adam's compressed phase (:mod:`.onebit`) — and on a
simulated (meta) engine, which sends the slot (its bytes are counted) but reads no value, ``z.carried_loss``
stays None and the engine keeps its own control all-reduce. The planner counts the slot
(:mod:`parallel.planning.cost`: 40 bytes over dp).
"""
from __future__ import annotations

import torch

from parallel.data_parallel.unused_flag import unused_totals
from parallel.zero.direct_grads import direct_norm_sq
from parallel.zero.grad_norm import grad_norm_sq
from parallel.zero.unused import ALL, agree_unused, local_missing, warn_onebit_unused

__all__ = ["can_carry", "norm_sq_and_carry"]


def can_carry(z) -> bool:
    """Whether ``z``'s norm all-reduce runs over its dp group, so the loss can ride in it (module docstring). A
    simulated engine carries the slot (its bytes are counted, :mod:`launch.simulate`) but reads nothing back."""
    return z.stage > 0 and not z.direct and z.fold_loss


def norm_sq_and_carry(z) -> torch.Tensor:
    """[Σ tp-split g², Σ replicated g², Σ duplicate g²] over the whole model (float64) for
    :class:`~parallel.zero.optimizer.ZeroOptimizer` ``z``; agrees on the parameters no dp rank got a gradient
    for (``b.unused``) and sums ``z.loss_carry`` over dp into ``z.carried_loss`` (module docstring)."""
    dev = z._all[0].master.device
    loss, z.loss_carry, z.carried_loss = z.loss_carry, None, None
    carry = loss is not None and can_carry(z)
    slots = [float(local_missing(z.buckets))] + ([loss] if carry else [])
    count = torch.tensor(slots, dtype=torch.float64, device=dev)
    if z.direct:
        v = direct_norm_sq(z, count)
    else:
        v = grad_norm_sq(z._all, z._segments, z.group, z.stage > 0, z.norm_groups, count)
    if z.simulated:                                # meta tensors (launch.simulate): bytes only, no verdict
        return v
    if carry:
        z.carried_loss = count[1].item()
    totals = {ALL: float(count[0])}                # stage ≥ 1: the dp sum; stage 0: this rank's own count
    if z.stage == 0:                               # (for groups of one rank), the carriers' sums for the rest
        totals.update(unused_totals(z.reducer))
    if agree_unused(z.buckets, z.group, totals):
        warn_onebit_unused(z, compressed=False)
    return v
