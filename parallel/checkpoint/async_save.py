"""Asynchronous checkpoints (``train.checkpoint.async: true``): a host snapshot now, the files later.

A save has two halves. Staging runs on the training thread, at the step boundary, on every rank: the
snapshot of the owned elements in host memory (training may change the parameters afterwards). By default
it is lazy (:mod:`parallel.checkpoint.snapshot`): the runs, their host buffers and the DCP state are planned
at the first save (the ranks exchange their runs then) and reused; the step boundary copies only buffers a
forward changes, the writer thread copies the rest while the next forward and backward run, and the next
optimizer update waits for that copy (an ``optimizer`` phase callback), so the checkpoint holds the values
of the step it names. ``lazy=False``, optimizer offload and 8-bit moments: the whole copy at the boundary
(:func:`parallel.checkpoint.sharded.stage_pieces`). Writing —
DCP's files, the rank file, the digests, ``meta.json`` and the atomic rename — runs in a background
thread of each rank while training continues, its collectives on a process group of its own (gloo,
created once, by every rank at the first save), never on the training's groups.

Guarantees, as a synchronous save:

* complete or absent: the files go to ``.tmp-step_N``; rank 0 renames it to ``step_N`` only after every
  rank reported success (an all-gather of each rank's status, so a rank whose write fails makes every rank
  fail the save instead of leaving them waiting); a failed save leaves the previous checkpoint the newest;
* one save at a time: the next save — and the end of training — first waits for the previous one, whose
  thread on each rank ends only after the commit and a barrier of every rank (so when any rank has waited,
  the checkpoint is committed everywhere); a failed background save raises :class:`CheckpointError` there;
* the same bytes: the snapshot is taken where a synchronous save would read the state, so a resume from
  an asynchronous checkpoint is the resume from a synchronous one.

``FAULT`` is a test hook: a callable run in the background thread after this rank's shards are written and
before the commit (an exception there fails the save on every rank; ``os._exit`` kills the process mid-save).
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import threading
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from parallel.checkpoint.engine_state import optim_meta, save_meta, save_parts, state_sources
from parallel.checkpoint.integrity import CheckpointError, digest_own
from parallel.checkpoint.sharded import stage_pieces, tmp_dir
from parallel.checkpoint.snapshot import SnapshotPlan
from parallel.reliability.watchdog import is_peer_failure

__all__ = ["AsyncSaver", "FAULT"]

FAULT = None


def _write(st: dict, meta: dict, rank_meta: dict, group, on_written=None, before=None) -> str:
    rank, world, tmp = st["rank"], st["world"], st["tmp"]
    status, mine = None, {}
    try:
        if before is not None:                     # the lazy snapshot's copy (parallel.checkpoint.snapshot)
            before()
            if world > 1:                          # rank 0 made the folder before its save returned
                dist.barrier(group=group)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(st["state"], checkpoint_id=tmp, process_group=group, no_dist=world == 1)
        with open(os.path.join(tmp, f"rank_{rank}.pt"), "wb") as f:
            torch.save(rank_meta, f)
        mine = digest_own(tmp, rank)
        if FAULT is not None:
            FAULT()
        if on_written is not None:
            on_written()
    except BaseException as e:                     # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        status = f"rank {rank}: {type(e).__name__}: {str(e).strip()[:300]}"
    every = [(status, mine)]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, (status, mine), group=group)
    bad = [s for s, _ in every if s]
    if bad:
        if rank == 0:                              # every rank is done with the folder: free its space
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing checkpoint {st['final']} in the background failed ({bad[0]}"
                              f"{f'; and {len(bad) - 1} more ranks' if len(bad) > 1 else ''}); it was not committed")
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "shapes": st["shapes"], "world_size": world,
                       "files": {n: d for _, part in every for n, d in sorted(part.items())}}, f, indent=1)
        final = st["final"]
        if os.path.exists(final):
            os.replace(final, f"{final}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(tmp, final)
    if world > 1:
        dist.barrier(group=group)
    return st["final"]


class AsyncSaver:
    """One background save at a time for ``engine``; :meth:`save` is collective (every rank, same steps).

    ``lazy`` (default): the snapshot is a :class:`parallel.checkpoint.snapshot.SnapshotPlan` — planned at the
    first save, reused while the state's storage is the same, copied on the writer thread with the next optimizer
    update waiting for it. ``lazy=False`` (and always with optimizer offload or 8-bit moments): the whole snapshot
    is copied at the step boundary, as before. ``stats``: the plan's counters (bytes copied in the stall, in the
    background, the time an update waited, plans built)."""

    def __init__(self, engine, timeout_s: float = 600.0, lazy: bool = True):
        self.engine, self.timeout_s, self.lazy = engine, timeout_s, lazy
        self.group, self.thread, self.plan, self._unguard = None, None, None, None
        self.error: BaseException | None = None
        self.path: str | None = None
        self.done_path: str | None = None
        self.plans = 0

    @property
    def stats(self) -> dict:
        return {**(self.plan.stats if self.plan is not None else {}), "plans": self.plans}

    def _agree(self, ok: bool) -> bool:
        """Every rank's plan still serves (a rebuild is collective, so all rebuild or none)."""
        if self.group is None:
            return ok
        t = torch.tensor([int(ok)])
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def _snapshot(self, engine, path: str, extra: dict) -> tuple:
        """(staged, meta, rank_meta, copy_rest or None) — inside ``materialized()``."""
        z = engine.zero
        if not self.lazy or z._opt_off is not None or hasattr(z.optimizer, "dequantized"):
            pieces, meta, rank_meta = save_parts(engine, extra)
            return stage_pieces(pieces, path), meta, rank_meta, None
        key = state_sources(engine)
        if not self._agree(self.plan is not None and self.plan.key == key):
            pieces, meta, rank_meta = save_parts(engine, extra)
            self.plan, self.plans = SnapshotPlan(pieces, key), self.plans + 1
        else:
            meta, rank_meta = save_meta(engine, extra, optim_meta(engine))
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        tmp = tmp_dir(path)
        if rank == 0:                            # the writers start after a barrier on the saver's group
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        self.plan.copy_eager()
        plan = self.plan

        def guard(phase, step):                  # the first update after the save: wait for the copy, then leave
            if phase == "optimizer" and self._unguard is not None:
                plan.guard()
                self._unguard()
                self._unguard = None
        self._unguard = engine.add_callback(guard)
        st = {"state": self.plan.state, "shapes": self.plan.shapes, "tmp": tmp, "final": os.path.abspath(path),
              "rank": rank, "world": world}
        return st, meta, rank_meta, self.plan.copy_rest

    def save(self, path: str, extra: dict, on_done=None) -> None:
        """Wait for the previous save, snapshot the state, and write it in the background. ``on_done(path)``
        runs in the background thread after the commit (rank 0 removes old checkpoints there)."""
        self.wait()
        engine = self.engine
        if self.group is None and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))
        s = engine.step_count - 1
        engine._emit("checkpoint", s)
        with engine.zero.materialized():
            st, meta, rank_meta, copy_rest = self._snapshot(engine, path, extra)

        def run():
            try:
                done = _write(st, meta, rank_meta, self.group, lambda: engine._emit("checkpoint_written", s),
                              before=copy_rest)
                self.done_path = done
                if on_done is not None:
                    on_done(done)
            except BaseException as e:               # reported by wait() on the training thread
                self.error = e

        self.path, self.error = path, None
        self.thread = threading.Thread(target=run, name=f"p3d-checkpoint-{os.path.basename(path)}", daemon=True)
        self.thread.start()

    def wait(self) -> str | None:
        """Block until the background save (if any) is committed on every rank; returns its folder.
        Raises :class:`CheckpointError` when it failed (the previous checkpoint is still the newest)."""
        if self.thread is None:
            return None
        self.thread.join()
        self.thread = None
        if self._unguard is not None:             # the copy is done: no update needs to wait any more
            self._unguard()
            self._unguard = None
        if self.error is not None:
            e, self.error = self.error, None
            if isinstance(e, CheckpointError):
                raise e
            if is_peer_failure(e):                # another rank died mid-save: reported as the peer failure it is
                raise e                           # (the dead rank names the cause), not as this rank's own error
            raise CheckpointError(f"writing checkpoint {self.path} in the background failed: {type(e).__name__}: "
                                  f"{str(e)[:300]}; it was not committed") from e
        return self.done_path

    @property
    def pending(self) -> bool:
        return self.thread is not None
