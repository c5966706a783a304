"""Buffers the training forward writes, which dp replicas do not share: found after the first step.

A registered buffer that a module updates in its forward from the batch it sees (a running mean, an
EMA of the inputs, a custom normaliser's statistics) is, under data parallelism, updated on each dp
(and cp) rank from that rank's samples only. Nothing reduces buffers: the replicas drift apart, the
numbers differ from one process with the global batch, and a checkpoint keeps the value of dp rank 0
alone (``checkpoint/engine_state.py`` writes each buffer from one rank). DDP hides the drift by
broadcasting rank 0's buffers before each forward, which is no closer to one process either.

BatchNorm is the known case: ``parallel.sync_batchnorm`` reduces its statistics, and
:func:`parallel.data_parallel.sync_batchnorm.prepare` warns when it is off. For every other module the
engine looks once, without communication: :class:`BufferWatch` copies the floating-point buffers of
this rank's stages at construction and, after the first optimizer step, names those that changed
(a warning on the ranks of dp·cp rank 0, one per pipeline stage and tp rank). A buffer every rank
updates identically (a float step counter) is named too; the warning says when it is harmless.
"""
from __future__ import annotations

import warnings

import torch
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BufferWatch", "forward_buffers"]


def forward_buffers(stages) -> dict:
    """{name: buffer} of the floating-point buffers of ``stages`` outside BatchNorm layers (those are
    parallel.sync_batchnorm's), by their names in the stage modules."""
    out = {}
    for st in stages:
        for mn, m in st.named_modules():
            if isinstance(m, _BatchNorm):
                continue
            for bn, b in m.named_buffers(recurse=False):
                if b is not None and b.is_floating_point() and b.device.type != "meta":
                    out[f"{mn}.{bn}" if mn else bn] = b
    return out


class BufferWatch:
    """Snapshot at construction, compare after the first step (:meth:`check`), then nothing."""

    def __init__(self, stages, group_size: int, group_rank: int, axis: str = "dp"):
        self.group_size, self.group_rank, self.axis = group_size, group_rank, axis
        self.before, self.done = None, False
        if group_size > 1:
            self.snapshot(stages)

    def snapshot(self, stages) -> None:
        """(Re)take the copies, e.g. after a checkpoint load replaced the buffers; no-op once checked."""
        if self.group_size > 1 and not self.done:
            self.before = {n: b.detach().clone() for n, b in forward_buffers(stages).items()}

    def check(self, stages) -> list:
        """Names of the buffers the first step changed (warned about on group rank 0); [] afterwards."""
        self.done = True
        if not self.before:
            self.before = None
            return []
        now = forward_buffers(stages)
        changed = [n for n, b in self.before.items() if n in now and not torch.equal(now[n], b)]
        self.before = None
        if changed and self.group_rank == 0:
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            warnings.warn(
                f"the first training step changed the model's buffer(s) {shown}: the forward updates them. With "
                f"{self.group_size} {self.axis} ranks each rank updates its copy from its own samples only, so the "
                f"replicas drift apart, the numbers differ from one process with the global batch, and checkpoints "
                f"keep dp rank 0's value. Nothing synchronises buffers (only BatchNorm's, with "
                f"parallel.sync_batchnorm): make the statistic a function of the global batch (all-reduce it over the "
                f"dp group in your module), or train it with parallel.dp=1. Harmless if every rank updates the "
                f"buffer identically (e.g. a step counter)", UserWarning, stacklevel=3)
        return changed
