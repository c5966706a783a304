"""Bucketed gradient reduction over the dp axis, launched from gradient hooks during backward.

Data parallelism: every dp rank holds the model, runs its share of the global batch and the
gradients are averaged, g = (1/N) Σ_r g_r, so that the update equals the single-process one on
the whole batch (the loss is a mean over samples). As in torch DDP (Li et al., "PyTorch
Distributed", arXiv 2006.15704, §3.2), gradients are grouped into buckets of about
``bucket_mb`` (:func:`parallel.data_parallel.bucket.make_buckets`, reverse parameter order) and a
bucket's collective starts as soon as its last gradient has been accumulated — from a
``register_post_accumulate_grad_hook`` while backward is still running — so communication
overlaps the backward computation of earlier layers.

Two reductions share this machinery:
  * ``all_reduce`` (plain DP, ZeRO stage 0): the flat gradient is all-reduced in place;
  * ``reduce_scatter`` (ZeRO stages 1–3): each rank receives the reduced shard it owns.
The sum becomes the mean by a division by N: before an all-reduce (fused with each fresh gradient's copy into its
bucket view, :mod:`parallel.data_parallel.fused_div`), after a reduce-scatter of fp32 gradients (only this rank's
shard, Ψ/N elements divided instead of Ψ; for N a power of two fused on the way in as well, bit-identical, on every
rank alike: ``fuses``); low-precision gradients are divided first, against overflow. Stage 1
with the ring (:mod:`parallel.comm.ring`) reduces this rank's chunk of the flat gradient in place — the ring only
reads that chunk at its last step — instead of into a fresh shard that is then copied back (Ψ/N · 8 bytes).

Gradient accumulation needs no ``no_sync``: ``prepare_step(m)`` announces m micro-batches; each
parameter's hook counts its accumulations and a bucket is reduced once all its parameters have
received their m-th gradient — whatever order a pipeline schedule runs the backwards in.
``no_sync()`` is offered too (hooks inside it accumulate without counting). Buckets are launched
strictly in bucket order, so every rank issues the same collectives in the same order; after the
first step that order becomes the order in which gradients actually completed (as DDP rebuilds its
buckets), agreed over the group by one broadcast and one all-reduce of a few bytes.

Parameters flagged ``param_info(p).defer_reduce`` (tied weights shared across pipeline stages,
whose gradient the engine first all-reduces over pp) are never reduced from hooks: they live in a
separate bucket reduced by :meth:`GradReducer.finish` after everything else.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref

import torch

from parallel import comm
from parallel.comm import Group
from parallel.comm.ring import release_scratch, use_ring
from parallel.data_parallel.bucket import FlatBucket
from parallel.data_parallel.fused_div import copy_in, divide_rest, fuses
from parallel.data_parallel.unused_flag import place_carriers, with_flag

__all__ = ["GradReducer", "KEEP_BUFFERS"]

KEEP_BUFFERS = 2       # stage 2/3 full-gradient buffers kept from one step to the next (one micro-batch)


class GradReducer:
    """Reduces the gradients of ``buckets`` (and ``deferred``) over ``group``.

    keep_full_grads=True (stage 0/1): each bucket's ``flat_grad`` is persistent and ``p.grad`` is a
    view into it (gradients accumulate in place). False (stage 2/3): a hook moves ``p.grad`` into the
    bucket's ``flat_grad`` (taken, not zeroed, at the first gradient of a step: the buffer of a bucket already
    reduced this step, else a new one sized for the largest bucket — ``buffers`` counts both; a parameter's
    first gradient is copied, later ones added, and a parameter with none is zeroed at launch) and sets
    ``p.grad = None``; after the reduce-scatter only ``shard_grad`` (this rank's 1/N) remains, and it stays
    allocated across steps as the next reduce-scatter's output (ZeRO's gradient partition, 2Ψ/N in the
    paper's count). With one micro-batch :meth:`finish` keeps ``KEEP_BUFFERS`` full-gradient buffers for the
    next step, as DeepSpeed keeps its reduction buckets (fresh multi-MiB blocks are faulted in page by page).
    ``on_grad(p)`` is called after every accumulation (stage 3 frees the gathered parameters).
    A gradient after ``finish()`` raises (call ``zero_grad()`` first) unless ``auto_reset`` (DDP-like:
    it starts a new round, accumulating onto the reduced gradients, which are equal on every rank).
    """

    def __init__(self, buckets: list, group: Group, mode: str, grad_dtype: torch.dtype,
                 keep_full_grads: bool, deferred: FlatBucket | None = None, on_grad=None,
                 max_inflight: int = 2, auto_reset: bool = False, on_reduced=None):
        if mode not in ("all_reduce", "reduce_scatter"):
            raise ValueError(f"GradReducer mode {mode!r}: use 'all_reduce' or 'reduce_scatter'")
        self.buckets, self.deferred, self.group, self.mode = list(buckets), deferred, group, mode
        self.dtype, self.keep_full, self.on_grad = grad_dtype, keep_full_grads, on_grad
        self.on_reduced = on_reduced                     # on_reduced(b) once b's reduced shard is in place
        self.max_inflight, self.auto_reset, self.expected = max_inflight, auto_reset, 1
        self.local, self.fuse_div = False, True          # 1-bit Adam (set by ZeRO): hooks reduce nothing; fused_div.py
        self._sync = True
        self._where = {}
        self._pos = {id(b): i for i, b in enumerate(self.buckets)}
        self._handles = []
        # The hook lives in the parameter's C++ autograd metadata, which the garbage collector cannot see:
        # a strong reference to self there would keep the reducer, its group and gloo's threads alive
        # after the engine is dropped (launch/lifecycle.py). The hook holds a weak one instead.
        ref = weakref.WeakMethod(self._hook)

        def hook(p, ref=ref):
            fn = ref()
            if fn is not None:
                fn(p)
        for b in self.buckets + ([deferred] if deferred else []):
            for i, p in enumerate(b.params):
                if p in self._where:
                    raise ValueError(f"parameter {b.names[i]!r} is in two buckets")
                self._where[p] = (b, i)
                self._handles.append(p.register_post_accumulate_grad_hook(hook))
            if keep_full_grads:
                b.flat_grad = torch.zeros(b.padded, dtype=grad_dtype, device=b.params[0].device)
                for p, v in zip(b.params, b.views(b.flat_grad)):
                    p.grad = v
        self.launches = {"hooks": 0, "finish": 0}
        self.buffers = {"allocated": 0, "reused": 0}    # stage 2/3 full-gradient buffers, since construction
        self._spare: list = []           # stage 2/3: full-gradient buffers of reduced buckets, for the next ones
        self._observed: list = []
        self._reordered = False
        self.reset()

    # --- per step ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget this step's counts (called by zero_grad)."""
        self._observed = []
        for b in self.buckets:
            b._count = [0] * len(b.params)
            b._pending = len(b.params)
            b.unused = ()
            # had: got a gradient this step (no_sync ones too): parallel/zero/unused.py; divided: fused_div.py
            b.had, b.divided = bytearray(len(b.params)), bytearray(len(b.params))
        self._next = 0
        self._ready_pos: set = set()
        self._inflight: list = []
        self._late: list = []            # buckets passed in launch order that finish() reduces (at_finish)
        self._reduced = self.accumulated = False   # accumulated: no_sync() used this step (fused_div.py)
        self._queued = False
        self.launches = {"hooks": 0, "finish": 0}
        self.max_waiting = 0             # most buckets ready but held back by launch order, this step

    def _adopt_observed_order(self) -> None:
        """From the second step on, launch buckets in the order their gradients completed (torch
        DDP's bucket rebuild). Every rank must agree, so rank 0's order is broadcast and adopted only
        if all ranks observed the same one."""
        self._reordered = True
        n = len(self.buckets)
        order = torch.tensor((self._observed + [-1] * n)[:n], dtype=torch.int64)
        ok = torch.tensor([int(len(self._observed) == n)], dtype=torch.int64)
        if self.group.size > 1:                  # every rank takes part, whatever it observed
            ctl = self.group.control()           # bookkeeping, not gradient traffic
            theirs = comm.broadcast(order.clone(), ctl, src=0)
            ok[0] = ok[0] * int(torch.equal(theirs, order))
            comm.all_reduce(ok, ctl, op="min")
        if not ok.item():
            return
        self.buckets = [self.buckets[i] for i in self._observed]
        self._pos = {id(b): i for i, b in enumerate(self.buckets)}
        place_carriers(self)                     # stage 0's unused-parameter flag moves to the new last bucket

    def prepare_step(self, num_micro_batches: int = 1) -> None:
        if not isinstance(num_micro_batches, int) or num_micro_batches < 1:
            raise ValueError(f"prepare_step: num_micro_batches={num_micro_batches!r} must be a positive int")
        if self._reduced and self.auto_reset:
            self.reset()
        if any(c for b in self.buckets for c in b._count):
            raise RuntimeError("prepare_step() called after some gradients of this step arrived: "
                               "call it before the first micro-batch's backward")
        self.expected = num_micro_batches

    @contextlib.contextmanager
    def no_sync(self):
        """Backwards inside accumulate gradients locally; the first backward outside reduces."""
        old, self._sync, self.accumulated = self._sync, False, True
        try:
            yield
        finally:
            self._sync = old

    # --- hooks ------------------------------------------------------------------------------------
    def _absorb(self, b: FlatBucket, i: int, p) -> None:
        o, n = b.offsets[i], b.sizes[i]
        if self.keep_full:
            view = b.flat_grad[o:o + n].view(b.shapes[i])
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():  # p.grad was reset (None) and re-created by autograd
                copy_in(self, b, i, p.grad, view)        # stage 0: divided by N on the way (fused_div.py)
            p.grad = view
        elif p.grad is not None:
            if b.flat_grad is None:                     # stage 2/3: the first gradient is copied, not added to
                b.flat_grad = self._flat_buffer(b, p.device)                             # zeros (8 B/element)
                b.flat_grad[b.numel:].zero_()
                b._written = [False] * len(b.params)
            if b._written[i]:
                b.flat_grad[o:o + n].add_(p.grad.reshape(-1))
            else:
                copy_in(self, b, i, p.grad.reshape(-1), b.flat_grad[o:o + n])      # (fused_div.py)
                b._written[i] = True
            p.grad = None

    def _hook(self, p) -> None:
        b, i = self._where[p]
        if self._reduced and self.auto_reset:
            self.reset()                                 # DataParallel: every synced backward is a new round
        elif self._reduced:
            raise RuntimeError(f"gradient for {b.names[i]!r} arrived after this step's gradients were reduced: "
                               f"call zero.zero_grad() before the next step's backward, and prepare_step(m) "
                               f"with the number of micro-batches (got more than m={self.expected})")
        if b.deferred:
            if self.keep_full:
                self._absorb(b, i, p)
            return                                       # stays in p.grad until finish() (stage 2/3)
        self._absorb(b, i, p)
        b.had[i] = 1
        if self.on_grad is not None:
            self.on_grad(p)
        if not self._sync:
            return
        b._count[i] += 1
        if b._count[i] > self.expected:
            raise RuntimeError(f"parameter {b.names[i]!r} received gradient {b._count[i]} but prepare_step() "
                               f"announced {self.expected} micro-batch(es): call zero.prepare_step(m) with the "
                               f"right m, or wrap the accumulating backwards in zero.no_sync()")
        if b._count[i] == self.expected:
            b._pending -= 1
            if b._pending == 0:
                self._ready(b)

    def _ready(self, b: FlatBucket) -> None:
        self._ready_pos.add(self._pos[id(b)])
        self._observed.append(self._pos[id(b)])
        while self._next < len(self.buckets) and (self._next in self._ready_pos or self._late_at(self._next)):
            if self._late_at(self._next):                # ZeRO-3 regions: reduced in finish(), on every rank alike
                self._late.append(self.buckets[self._next])
            else:
                self._launch(self.buckets[self._next], "hooks")
            self._next += 1
        self.max_waiting = max(self.max_waiting, len(self._ready_pos) - self._next)
        if self._next == len(self.buckets) and self.deferred is None and not self._queued:
            # Every bucket is on its way: wait for them when this backward ends (as DDP does), so a
            # plain "loss.backward(); optimizer.step()" loop needs no explicit finish call.
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)

    def _launch_late(self) -> None:
        """Reduce the ``at_finish`` buckets passed during backward. A parameter that got no gradient on any
        rank (an expert no rank routed a token to) is listed in ``b.unused`` — the optimizer skips it, as torch's
        skip a ``grad=None`` parameter; one all-reduce of a flag per parameter agrees on it. A bucket none of
        whose parameters got a gradient anywhere is not reduced (its shard gradient is zeros)."""
        late, self._late = self._late, []
        if not late:
            return
        flags = torch.tensor([int(c > 0) for b in late for c in b._count], dtype=torch.int64)
        if self.group.size > 1:
            comm.all_reduce(flags, self.group.control(), op="max")
        k = 0
        for b in late:
            n = len(b.params)
            b.unused = tuple(i for i in range(n) if not flags[k + i])
            k += n
            if len(b.unused) < n or self.keep_full:
                self._launch(b, "finish")
            else:
                b.flat_grad, b.shard_grad = None, torch.zeros(b.shard, dtype=self.dtype, device=b.params[0].device)

    def _late_at(self, pos: int) -> bool:
        """Bucket ``pos`` is reduced only in finish() (``b.at_finish``: a ZeRO-3 region's unit, whose parameters
        may get gradients on some dp ranks only — :mod:`parallel.zero.regions`)."""
        return getattr(self.buckets[pos], "at_finish", False)

    def _launch(self, b: FlatBucket, where: str) -> None:
        if b.flat_grad is None:
            b.flat_grad = self._flat_buffer(b, b.params[0].device).zero_()
        elif not self.keep_full:                         # parameters that got no gradient this step count as 0
            for i, done in enumerate(b._written):
                if not done:
                    b.flat_grad[b.offsets[i]:b.offsets[i] + b.sizes[i]].zero_()
        g = b.flat_grad
        if self.local:                                   # the optimizer communicates (1-bit Adam): keep g_i
            self._inflight.append((b, None, None))
            self.launches[where] += 1
            return
        group = b.group or self.group                    # expert buckets: the expert-data-parallel group
        div = b.grad_div or group.size
        if div > 1 and (not self._divides_after(g) or fuses(self, b)):   # on every rank alike (fused_div.py)
            divide_rest(b, g, div)                       # what the hooks did not divide
        if self.mode == "all_reduce":
            work, out = comm.all_reduce(with_flag(self, b, group, g), group, async_op=True), None   # unused_flag
        else:
            if self.keep_full and use_ring(group, g):   # stage 1: the ring reduces its own chunk in place
                out = g[b.lo:b.hi]
            else:                                        # stage 2/3: last step's shard buffer (module docstring)
                out = b.shard_grad
                if out is None or out.shape != (b.shard,) or out.dtype != g.dtype or out.device != g.device:
                    out = torch.empty(b.shard, dtype=g.dtype, device=g.device)
            work = comm.reduce_scatter_into(out, g, group, async_op=True)
        self._inflight.append((b, work, out))
        self.launches[where] += 1
        self._poll()

    def _finalize(self, b: FlatBucket, work, out) -> None:
        if work is not None:
            work.wait()
        if self.mode == "all_reduce" or (work is None and out is None):    # local (1-bit Adam): g_i stays whole
            return
        div = b.grad_div or (b.group or self.group).size
        if div > 1 and self._divides_after(out) and not fuses(self, b):
            out.div_(div)                                # the mean, on the shard only (module docstring)
        if self.keep_full:
            mine = b.flat_grad[b.lo:b.hi]
            if out.data_ptr() != mine.data_ptr():
                mine.copy_(out)                          # stage 1: only the owned shard is reduced
        else:                                            # stage 2/3: the full gradient's buffer goes to the
            g = b.flat_grad                              # next bucket of this step (dropped in finish())
            self._spare.append(g if g._base is None else g._base)
            b.shard_grad, b.flat_grad = out, None
            if self.on_reduced is not None and not b.deferred:
                self.on_reduced(b)

    def _flat_buffer(self, b: FlatBucket, device) -> torch.Tensor:
        """Stage 2/3: ``b.padded`` elements (uninitialised) for ``b``'s full gradient — the smallest spare
        buffer of this step that fits (a bucket already reduced), else a new one. Before allocating, the oldest
        reduction is retired while another is in flight behind it, so a step allocates about two buffers
        instead of one per bucket (fresh pages, faulted in one by one: tests/test_reducer_buffers.py)."""
        fits = [t for t in self._spare if t.numel() >= b.padded and t.device == device]
        while not fits and len(self._inflight) > 1:     # retire the reduction launched before the latest one
            self._finalize(*self._inflight.pop(0))      # (a bucket of backward ago: done, or nearly) and take
            fits = [t for t in self._spare if t.numel() >= b.padded and t.device == device]   # its buffer
        if not fits:                                    # sized for any bucket (the planner counts the largest)
            self.buffers["allocated"] += 1
            cap = max([b.padded] + [x.padded for x in self.buckets] * (self.expected == 1))   # m > 1: all alive
            return torch.empty(cap, dtype=self.dtype, device=device)[:b.padded]
        t = min(fits, key=torch.Tensor.numel)
        self._spare = [x for x in self._spare if x is not t]
        self.buffers["reused"] += 1
        return t[:b.padded]

    @property
    def held_buffers(self) -> list:
        """Stage 2/3: the full-gradient buffers kept for the next bucket or step (counted by LiveBytes)."""
        return list(self._spare)

    def _divides_after(self, g: torch.Tensor) -> bool:
        """Divide by N after the reduction: reduce-scatter of fp32 gradients (module docstring)."""
        return self.mode != "all_reduce" and g.dtype == torch.float32

    def _poll(self) -> None:
        """Retire finished reductions from the front; never keep more than max_inflight running."""
        cap = self.max_inflight if not self.keep_full else len(self.buckets) + 1   # caps memory: stage 2/3
        while self._inflight and (self._inflight[0][1] is None or self._inflight[0][1].is_completed()
                                  or len(self._inflight) > cap):
            self._finalize(*self._inflight.pop(0))

    def finish(self) -> None:
        """Launch what hooks did not (incomplete buckets, then the deferred bucket), wait for all."""
        if self._reduced:
            return
        if not self._sync:
            raise RuntimeError("finish_grad_sync() inside no_sync(): leave the no_sync() block first")
        missing = [b.names[i] for b in self.buckets[self._next:] for i, c in enumerate(b._count)
                   if c < self.expected]
        if missing:
            warnings.warn(f"{len(missing)} parameter(s) got fewer than {self.expected} gradient(s) this step "
                          f"(e.g. {missing[:3]}); their missing gradients count as zero", stacklevel=2)
        self._launch_late()
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if self.keep_full:                           # no gradient this step: zero, not last step's values
                for i, v in enumerate(b.views(b.flat_grad)):
                    if b._count[i] == 0 and b.params[i].grad is not v:
                        v.zero_()
                        b.params[i].grad = v
            self._launch(b, "finish")
            self._next += 1
        if self.deferred is not None:
            d = self.deferred
            for i, p in enumerate(d.params):
                self._absorb(d, i, p)
            self._launch(d, "finish")
        while self._inflight:
            self._finalize(*self._inflight.pop(0))
        # stage 2/3, one micro-batch: the step's first two buffers (each sized for the largest bucket) wait for
        # the next step's first two buckets; the planner's peak counts them. m > 1 (exact sizes): none kept.
        cap = max((b.padded for b in self.buckets), default=0)         # not a larger deferred bucket's
        keep = sorted((t for t in self._spare if t.numel() <= cap), key=torch.Tensor.numel, reverse=True)
        self._spare = keep[:KEEP_BUFFERS] if self.expected == 1 else []
        self._reduced = True
        if not self._reordered:
            self._adopt_observed_order()

    def zero_grad(self) -> None:
        """Forget the gradients. Stage 0/1 (persistent flat gradients): ``p.grad = None`` without zeroing the flat
        buffer: the next backward's first gradient is copied into its view (read 4, write 4 bytes; stage 0 divides
        it by N on the way, as torch DDP's gradient_as_bucket_view: fused_div.py) instead of zeroing the buffer and
        accumulating (write 4, then read 8 and write 4); one without gradient is zeroed in :meth:`finish`."""
        for b in self.buckets + ([self.deferred] if self.deferred else []):
            for p in b.params:
                p.grad = None
            if not self.keep_full:
                b.flat_grad = None                       # shard_grad stays: the next reduction's output
                if self.local:                           # (none while 1-bit Adam reduces nothing here)
                    b.shard_grad = None
        self.reset()

    def remove(self) -> None:
        """Remove the hooks; drop the kept buffers (and the ring's free receive buffers: the engine is done)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._spare = []
        release_scratch()
