"""Which samples each rank trains on (the parity contract in DESIGN.md).

Global batch t holds the dataset positions [t·G, (t+1)·G) (G = data.global_batch_size), read
modulo the dataset length so training can run several epochs; with ``data.shuffle`` position i of
epoch e maps through a permutation seeded by (seed, e), the same on every layout. dp rank r takes
the contiguous slice [r·G/dp, (r+1)·G/dp) of the global batch; the engine cuts that into
micro-batches. So the union over dp ranks of one step is exactly one single-process batch.
"""
from __future__ import annotations

import torch
from torch.utils.data import default_collate


def check_dataset(dataset, global_batch_size: int) -> int:
    try:
        n = len(dataset)
    except TypeError:
        raise TypeError(f"data.factory must return a map-style Dataset with __len__ and __getitem__, "
                        f"got {type(dataset).__name__}") from None
    if n < global_batch_size:
        raise ValueError(f"the dataset has {n} samples, fewer than one global batch "
                         f"(data.global_batch_size={global_batch_size}): use a larger dataset or a smaller batch")
    return n


def global_indices(step: int, global_batch_size: int, n: int, seed: int = 0, shuffle: bool = False) -> list[int]:
    """Dataset indices of global batch ``step`` (the same whatever the layout)."""
    out, perms = [], {}
    for pos in range(step * global_batch_size, (step + 1) * global_batch_size):
        epoch, i = divmod(pos, n)
        if shuffle:
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            i = int(perms[epoch][i])
        out.append(i)
    return out


def rank_batch(dataset, step: int, global_batch_size: int, dp: int, dp_rank: int,
               seed: int = 0, shuffle: bool = False):
    """This dp rank's (inputs, targets) for global batch ``step``, collated."""
    idx = global_indices(step, global_batch_size, len(dataset), seed, shuffle)
    per = global_batch_size // dp
    return default_collate([dataset[i] for i in idx[dp_rank * per:(dp_rank + 1) * per]])


def split_micro(batch, micro_batch_size: int) -> list:
    """Cut a collated (inputs, targets) batch into micro-batches of ``micro_batch_size`` samples along
    dim 0 (the engine's cut; the last is shorter when the size does not divide the batch)."""
    x, y = batch
    return list(zip(torch.split(x, micro_batch_size), torch.split(y, micro_batch_size)))


def microbatches(inputs, targets, m: int) -> list:
    """Split a global batch along dim 0 into ``m`` equal (input, target) micro-batches (the pipeline
    executor's input): :func:`split_micro` into pieces of b/m samples, after checking that m divides b."""
    b = inputs.shape[0]
    if m < 1 or b % m:
        raise ValueError(f"pipeline: {m} micro-batches do not divide the batch of {b} samples; change "
                         f"data.global_batch_size / data.micro_batch_size so that the micro-batch count divides {b}")
    return split_micro((inputs, targets), b // m)
