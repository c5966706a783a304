"""How a non-elementwise optimizer sees whole parameters while it holds only pieces of them.

ZeRO hands an optimizer 1-D pieces of its dp shard (:mod:`parallel.zero.optimizer`); tensor
parallelism splits a parameter over the tp ranks. An elementwise update (SGD, Adam) does not care.
LAMB's trust ratio needs ‖w‖ and ‖u‖ of each *whole* tensor, Muon's Newton–Schulz step the whole
matrix. A :class:`TensorwiseOptimizer` asks its ``partition`` for both, one call per step:

    partition.sum_sq(*lists)    → for each list (one tensor per optimizer tensor j), per j: Σ x² over
                                  the whole logical parameter j belongs to (its pieces on every dp
                                  rank, its shards on every tp rank), float64 —
                                  one all-reduce of 8·L·P bytes over dp (stage ≥ 1) and one over tp
                                  (L lists, P parameters in this rank's model/stage), counted in CommStats
    partition.shape(j)          → the full (unsplit, unpadded) shape of the parameter of tensor j
    partition.gather(tensors, select)
                                → {j: the full tensor (shape(j)) of tensor j's parameter} for the j
                                  whose full shape passes ``select`` (tensors[j] is read for those;
                                  a rank holds at most one piece of a parameter); a collective:
                                  every rank calls it, in the same order
    partition.local(j, full)    → tensor j's part of a full tensor (the re-shard; no traffic)

:class:`LocalPartition` is the single-process case (each tensor is a whole parameter): no traffic,
and the optimizer computes exactly what its textbook form does. ZeRO binds its own
(:class:`parallel.zero.partition.ZeroPartition`) through ``optimizer.bind_partition``.
"""
from __future__ import annotations

import torch

__all__ = ["LocalPartition", "TensorwiseOptimizer"]


class LocalPartition:
    """Each tensor is a whole parameter, on one process."""

    def __init__(self, tensors):
        self.tensors = list(tensors)

    def shape(self, j: int) -> tuple:
        return tuple(self.tensors[j].shape)

    def sum_sq(self, *lists) -> list:
        return [[torch.linalg.vector_norm(t).double() ** 2 for t in lst] for lst in lists]

    def gather(self, tensors, select) -> dict:
        return {j: t for j, t in enumerate(tensors) if select(tuple(self.tensors[j].shape))}

    def local(self, j: int, full: torch.Tensor) -> torch.Tensor:
        return full


class TensorwiseOptimizer(torch.optim.Optimizer):
    """A torch optimizer over one param group whose step uses ``self.partition``."""

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(f"{type(self).__name__} takes one param group, got {len(self.param_groups)}")
        self.partition = LocalPartition(self.param_groups[0]["params"])

    def bind_partition(self, partition) -> None:
        """Called by ZeRO with the partition of exactly the tensors of the param group, in order."""
        self.partition = partition
