"""The host snapshot of an asynchronous checkpoint, planned once and copied lazily (issue 25, item 4).

A save's snapshot is, per owned piece (:class:`parallel.checkpoint.sharded.Piece`), the copy of its runs of
consecutive logical positions to host memory. Everything but the copy is a function of the layout alone — the
positions (the layout probe), their sorting into runs, the ranks' exchange of runs, the DCP ShardedTensors —
so :class:`SnapshotPlan` computes it once and keeps, per run, a host buffer (pinned when the source is on a
CUDA device) that every later save refills in place; the ShardedTensor state dict handed to DCP wraps those
buffers and is reused too.

Copy-on-write at the step boundary: model values and optimizer state change only in the optimizer's update
(the engine's ``optimizer`` phase, :meth:`parallel.engine.Engine.step`), so the copy runs on the writer
thread after the save returns, and the next update first waits for it (:meth:`SnapshotPlan.guard`): the
training loop stalls for the copy only when the next forward and backward are shorter than the copy. Buffers
(BatchNorm statistics), which a forward changes, are copied at once ("eager"). Counted in :attr:`stats`: bytes
copied in the step-boundary stall (eager), bytes copied on the writer thread, the time an update waited.

Validity: a plan holds the storage of each source tensor; a save whose sources (data pointer, size, dtype:
:func:`parallel.checkpoint.engine_state.state_sources`) are not the plan's — an optimizer's state created or
replaced, a load, a new layout — rebuilds it, and ranks agree
on that (one all-reduce of a flag) since the rebuild exchanges runs collectively. Optimizer offload and 8-bit
moments hand out temporary tensors for the duration of a save (``ZeroOptimizer.materialized``): no plan then
(the caller copies eagerly, as a synchronous save does).
"""
from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from parallel.checkpoint.sharded import _all_runs, _runs, _sharded

__all__ = ["SnapshotPlan"]


def _positions(p) -> tuple[torch.Tensor, list]:
    """(the flat source tensor, [(start, n, positions in the source or None for a slice [a, a+n))])."""
    if p.scatter is not None:                      # local = t[mask]: positions of the kept elements in t
        t, mask = p.scatter
        src, keep = t.detach().reshape(-1), torch.nonzero(mask.reshape(-1)).flatten()
    else:
        if not p.local.is_contiguous():
            raise ValueError(f"snapshot: piece {p.key} is not contiguous")
        src, keep = p.local.detach().reshape(-1), None
    order, runs = _runs(p.index)
    out = []
    for st, n, a in runs:
        pos = order[a:a + n] if order is not None else None
        if keep is not None:
            pos = keep[a:a + n] if pos is None else keep[pos]
        if pos is not None and n > 0 and int(pos[-1] - pos[0]) == n - 1 and bool((pos[1:] > pos[:-1]).all()):
            a, pos = int(pos[0]), None                 # consecutive after all: a slice
        out.append((st, n, pos if pos is not None else a))
    return src, out


class SnapshotPlan:
    """Runs, host buffers and the DCP state of one layout's owned pieces (collective to build: the default group)."""

    def __init__(self, pieces, key: tuple, eager=lambda key: key.startswith("buffer/")):
        self.key = key                             # parallel.checkpoint.engine_state.state_sources at the build
        self.copies, local = [], {}
        for p in pieces:
            if not p.owner:
                continue
            src, runs = _positions(p)
            pin = src.is_cuda
            e = local.setdefault(p.key, [int(torch.Size(p.full_shape).numel()), src.dtype, list(p.full_shape), [], []])
            for st, n, where in runs:
                buf = torch.empty(n, dtype=src.dtype, pin_memory=pin) if pin else torch.empty(n, dtype=src.dtype)
                e[3].append((st, n, buf))
                e[4].append((st, n, None))
                self.copies.append((src, where, n, buf, eager(p.key)))
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        key_runs_all, self.shapes = _all_runs(local, world)
        self.state = {k: _sharded(key_runs_all, k, e[3], rank) for k, e in local.items()}
        self.bytes = sum(buf.numel() * buf.element_size() for *_, buf, _ in self.copies)
        self.done = threading.Event()
        self.done.set()
        self.stats = {"plans": 1, "stall_bytes": 0, "background_bytes": 0, "waited_s": 0.0}

    def _copy(self, eager: bool) -> int:
        moved, cuda = 0, False
        for src, where, n, buf, e in self.copies:
            if e != eager:
                continue
            cuda |= src.is_cuda
            part = src[where:where + n] if isinstance(where, int) else src.index_select(0, where.to(src.device))
            buf.copy_(part, non_blocking=src.is_cuda)
            moved += n * buf.element_size()
        if cuda:
            torch.cuda.synchronize()
        return moved

    def copy_eager(self) -> None:
        """On the training thread, at the step boundary: the pieces a forward changes (buffers); begins a snapshot."""
        self.done.clear()
        self.stats["stall_bytes"] += self._copy(True)

    def copy_rest(self) -> None:
        """On the writer thread: everything else; then the next update may proceed."""
        try:
            self.stats["background_bytes"] += self._copy(False)
        finally:
            self.done.set()

    def guard(self) -> None:
        """Before an update: wait until the snapshot holds the values it must not see change."""
        if not self.done.is_set():
            t0 = time.perf_counter()
            self.done.wait()
            self.stats["waited_s"] += time.perf_counter() - t0
