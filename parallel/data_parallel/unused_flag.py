"""Stage 0's unused-parameter flag, carried in one extra element of the last gradient all-reduce of each group.

ZeRO skips the parameters no dp rank had a gradient for (:mod:`parallel.zero.unused`); every rank must first
learn whether any rank missed one. At stages ≥ 1 that count rides in the gradient-norm all-reduce; stage 0's
norm needs no dp reduction, so the flag rides here: the last bucket all-reduced over each group of more than one
rank (dp, or an expert bucket's edp) holds ``padded + 1`` elements (``b.wire``; ``b.flat_grad`` is its first
``padded``) and, when it launches, the extra one is set to 1 if this rank missed a gradient for a parameter of
that group's buckets (``reducer._missing(group)``: the count, :func:`parallel.zero.unused.local_missing`), else 0.
The all-reduce sums it: every rank of the group sees how many ranks missed one, with no collective of its own
(it was an 8-byte control all-reduce per step) — one element more of memory and wire per group.

The count is final when that bucket launches: buckets launch strictly in order, so the last bucket of a group
launches from a gradient hook only when every bucket of that group before it did, each complete (every
parameter had its gradients), and otherwise from ``finish()``, after backward. The deferred (tied) bucket
launches last of all, so it carries the dp group's flag when there is one. The flag is set after the division
by N and summed as a small integer, exact in every gradient dtype.
"""
from __future__ import annotations

import torch

__all__ = ["carry_unused", "place_carriers", "with_flag", "unused_totals"]


def _order(r) -> list:
    return r.buckets + ([r.deferred] if r.deferred else [])


def carry_unused(r, missing) -> None:
    """Turn the flag on for GradReducer ``r`` (all-reduce mode); ``missing(group)``: this rank's count."""
    r._missing = missing
    place_carriers(r)


def place_carriers(r) -> None:
    """Give each group's last bucket in ``r``'s launch order a wire of ``padded + 1`` elements, the others none
    (called when the order is set: :func:`carry_unused` and the observed-order rebuild; a no-op until then)."""
    if getattr(r, "_missing", None) is None:
        return
    last = {id(b.group or r.group): b for b in _order(r) if (b.group or r.group).size > 1}
    carriers = set(map(id, last.values()))
    flags = unused_totals(r)            # this step's sums stay readable when a carrier moves (after finish())
    for b in _order(r):
        want = id(b) in carriers
        if want == (getattr(b, "wire", None) is not None):
            continue
        buf = torch.zeros(b.padded + want, dtype=b.flat_grad.dtype, device=b.flat_grad.device)
        buf[:b.padded].copy_(b.flat_grad)
        b.wire, b.flat_grad = (buf if want else None), buf[:b.padded]
        if want:
            buf[-1] = flags.get(id(b.group or r.group), 0.0)
        for p, v in zip(b.params, b.views(b.flat_grad)):
            if p.grad is not None:
                p.grad = v


def with_flag(r, b, group, g: torch.Tensor) -> torch.Tensor:
    """What ``b``'s all-reduce sends: ``g``, or (a carrier) its wire with this rank's flag set."""
    if getattr(b, "wire", None) is None:
        return g
    b.wire[-1] = float(r._missing(group) > 0)
    return b.wire


def unused_totals(r) -> dict:
    """After ``finish()``: {id(group): how many of its ranks missed a gradient} for the groups with a carrier."""
    return {id(b.group or r.group): float(b.wire[-1]) for b in _order(r) if getattr(b, "wire", None) is not None}
