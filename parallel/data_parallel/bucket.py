"""Flat buffers (buckets) and their partition over the dp axis.

A :class:`FlatBucket` lays a list of parameters end to end in one flat buffer of ``numel``
elements, padded to ``padded = ceil(numel / N) · N`` so that it splits into N equal shards of
``shard = padded / N`` elements; rank r owns the elements ``[r·shard, (r+1)·shard)`` (ZeRO,
Rajbhandari et al., arXiv 1910.02054, §5: "partition the optimizer states / gradients /
parameters into N equal partitions"). Every bucket is partitioned on its own (as FSDP's flat
parameters are), so a bucket's gradient reduce-scatter lands each rank's part directly in its
owned shard, and the bucket's parameter all-gather fills the flat buffer from the shards.

Padding goes on the wire: a bucket's reduce-scatter/all-gather moves ``padded`` elements, at most
N − 1 more than ``numel``; tests compare against Ψ (unpadded) and state that slack. The counted
in-place collectives on these buffers are :func:`parallel.comm.all_gather_into` and
:func:`parallel.comm.reduce_scatter_into`.
"""
from __future__ import annotations

import math

import torch

__all__ = ["FlatBucket", "fill_buckets", "make_buckets"]


class FlatBucket:
    """Parameters ``params`` (names ``names``) laid out flat; rank ``rank`` of ``world`` owns a shard.

    Buffers (set by the owner of the bucket, any may be None):
      flat_param   the full flat parameters (stage 0–2: persistent; stage 3: gathered on demand)
      shard_param  this rank's shard of the parameters (stage 3)
      flat_grad    the full flat gradient (stage 0/1: persistent; stage 2/3: alive from the first
                   gradient of a step until its reduce-scatter completes)
      shard_grad   this rank's reduced gradient shard (stage 2/3)
      master       the fp32 tensor handed to the optimizer (stage 0: the whole flat; else the shard)
    """

    def __init__(self, index: int, named_params: list, world: int, rank: int, pad: bool = True):
        if not named_params:
            raise ValueError("FlatBucket needs at least one parameter")
        self.index = index
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.offsets, off = [], 0
        for n in self.sizes:
            self.offsets.append(off)
            off += n
        self.numel = off
        self.world, self.rank = world, rank
        self.pad = pad
        self.padded = -(-off // world) * world if pad else off
        self.shard = self.padded // world if pad else off
        self.flat_param = self.shard_param = self.flat_grad = self.shard_grad = self.master = None
        self.deferred = False

    @property
    def lo(self) -> int:
        """First flat index of this rank's shard."""
        return self.rank * self.shard if self.pad else 0

    @property
    def hi(self) -> int:
        return self.lo + self.shard

    def views(self, flat: torch.Tensor) -> list:
        """Each parameter's view into a flat buffer laid out like this bucket."""
        return [flat[o:o + n].view(s) for o, n, s in zip(self.offsets, self.sizes, self.shapes)]

    def pieces(self, lo: int | None = None, hi: int | None = None):
        """``(i, a, b)``: parameter i's elements that fall in the flat range [lo, hi) (default: the
        owned shard), as flat indices a..b; yields only non-empty pieces, in order."""
        lo = self.lo if lo is None else lo
        hi = self.hi if hi is None else hi
        for i, (o, n) in enumerate(zip(self.offsets, self.sizes)):
            a, b = max(o, lo), min(o + n, hi)
            if a < b:
                yield i, a, b

    def flatten(self, tensors: list, dtype: torch.dtype, device=None) -> torch.Tensor:
        """A new padded flat buffer holding ``tensors`` (one per parameter) end to end."""
        device = device if device is not None else (tensors[0].device if tensors else None)
        flat = torch.zeros(self.padded, dtype=dtype, device=device)
        for t, o, n in zip(tensors, self.offsets, self.sizes):
            flat[o:o + n].copy_(t.reshape(-1))
        return flat

    def __repr__(self):
        return (f"FlatBucket({self.index}, {len(self.params)} params, numel={self.numel}, "
                f"padded={self.padded}, shard=[{self.lo}, {self.hi}))")


def fill_buckets(nbytes: list, bucket_bytes: float) -> list:
    """Greedy fill in *reverse* order: the indices into ``nbytes`` (bytes per parameter) of each
    bucket, bucket 0 first. A bucket takes parameters (last first) until the next would exceed
    ``bucket_bytes``; a parameter bigger than a bucket gets a bucket of its own."""
    out, cur, cur_bytes = [], [], 0
    for i in reversed(range(len(nbytes))):
        if cur and cur_bytes + nbytes[i] > bucket_bytes:
            out.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += nbytes[i]
    if cur:
        out.append(cur)
    return out


def make_buckets(named_params: list, bucket_bytes: float, element_size: int, world: int, rank: int,
                 pad: bool, start_index: int = 0) -> list:
    """Split parameters into buckets of about ``bucket_bytes`` each, in *reverse* order
    (:func:`fill_buckets`): backward produces gradients roughly last layer first, so bucket 0 fills
    first (as torch DDP does)."""
    groups = fill_buckets([p.numel() * element_size for _, p in named_params], bucket_bytes)
    return [FlatBucket(start_index + k, [named_params[i] for i in idx], world, rank, pad)
            for k, idx in enumerate(groups)]
