"""ZeRO-3's gathered parameters that lie in this rank's own shard are views of the shard: the gather copies only
what straddles the shard's edges.

A stage-3 unit (:class:`~parallel.data_parallel.bucket.FlatBucket`) is all-gathered into its flat buffer of
``padded = N·S`` elements before use; rank r already holds chunk ``[lo, hi) = [r·S, (r+1)·S)`` as ``shard_param``.
The plain all-gather first copies that shard into the buffer's own chunk (Ψ/N·b bytes read and written per
gather; forward and backward gather, so 2Ψ/N·b per step and rank: 4Ψ bytes at N = 2, fp32 — what FSDP2's
copy-in also costs). A parameter whose elements ``[o, o+n)`` lie wholly inside ``[lo, hi)`` does not need them
there: its gathered value *is* ``shard_param[o−lo : o+n−lo]``, so it becomes a view of the shard, and the gather
leaves the own chunk unwritten (``all_gather_into(fill_own=False)``: the gloo ring and one rank skip it; other
backends write it anyway, unread). Only a parameter that straddles ``lo`` or ``hi`` (at most two per unit) needs
its own piece copied into the buffer, next to the pieces received from the neighbours. The copy per gather drops
from S elements to the straddlers' own pieces.

What keeps the values right:
* the shard is never freed (a unit's free resizes the *flat buffer's* storage to 0 and swaps every ``p.data`` for
  an empty tensor, as before); autograd's saved views of a weight that is a shard view stay valid through backward;
* the shard changes only in place (the optimizer's write-back ``shard_param.copy_(master)``, or the fp32 master
  being the shard itself; checkpoint loads go through the write-back), after backward, and a parameter is
  re-bound to its view at every gather;
* bf16/fp16: the shard is the low-precision copy the write-back casts into, exactly what the gather would copy;
* a write into a gathered parameter that is a view reaches the shard (the plain path's writes died with the freed
  buffer): nothing in the engine writes gathered parameters (evaluation and export only read them); new weights
  go in through the optimizer (``load_state_dict`` / ``load_full_state_dict``: masters, then the write-back);
* parameter offload (``shards=``: the shard lives in a store and is fetched into a buffer released after the
  gather) keeps the plain path: there is no resident shard to view.
The values every parameter holds are the same bytes as the plain path's, so losses are bitwise unchanged.
Zhao et al., arXiv 2304.11277 (FSDP's flat parameters and their all-gather); Rajbhandari et al., arXiv 1910.02054.
"""
from __future__ import annotations

import torch

__all__ = ["plan", "fill_straddlers", "bind"]


def plan(u) -> tuple:
    """``(inside, straddle)`` of unit ``u``: the indices of parameters lying wholly in the own shard ``[lo, hi)``,
    and the pieces ``(i, a, e)`` (flat indices) of parameters lying partly in it. Cached on the unit (the layout
    never changes)."""
    got = getattr(u, "own_plan", None)
    if got is None:
        lo, hi = u.lo, u.hi
        inside = frozenset(i for i, (o, n) in enumerate(zip(u.offsets, u.sizes)) if lo <= o and o + n <= hi)
        straddle = [(i, a, e) for i, a, e in u.pieces() if i not in inside]
        got = u.own_plan = (inside, straddle)
    return got


def fill_straddlers(u, flat: torch.Tensor, src: torch.Tensor) -> int:
    """Copy the own pieces of the straddling parameters from the shard ``src`` into the gathered ``flat``;
    returns the elements copied."""
    lo, moved = u.lo, 0
    for _, a, e in plan(u)[1]:
        flat[a:e].copy_(src[a - lo:e - lo])
        moved += e - a
    return moved


def bind(u, flat: torch.Tensor, src: torch.Tensor | None) -> None:
    """Point every parameter of ``u`` at its gathered value: a view of the shard ``src`` for those wholly inside
    it, a view of ``flat`` for the rest (``src`` None, the plain path: every parameter a view of ``flat``)."""
    if src is None:
        for p, v in zip(u.params, u.views(flat)):
            p.data = v
        return
    inside, lo = plan(u)[0], u.lo
    for i, (p, o, n, s) in enumerate(zip(u.params, u.offsets, u.sizes, u.shapes)):
        p.data = (src[o - lo:o - lo + n] if i in inside else flat[o:o + n]).view(s)
