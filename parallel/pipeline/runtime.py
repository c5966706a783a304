"""The pipeline executor: runs one rank's action list from :mod:`.schedules`.

For every action (in schedule order) it posts the receives :func:`.schedules.comm_ops` lists,
computes, then sends — activations forward, their gradients backward, over the pp axis with
:func:`parallel.comm.isend` / :func:`parallel.comm.recv` (non-blocking sends, so two neighbours
sending to each other cannot deadlock; every send is waited for before :meth:`PipelineExecutor.run`
returns). Matching does not rely on tags: from each peer the executor receives in the order that
peer sends (:mod:`.p2p_order`; earlier messages are kept until their action runs), so per rank
pair the j-th send is the j-th receive, as NCCL requires; ``tags=False`` sends every message with
tag 0 (gloo then matches by order alone, like NCCL). The first activation message of each (src
stage, dst stage) for a given micro-batch input shape carries a header (dtype, shape); after that
both ends know the shape and the payload travels alone (no host sync to read a header; evaluation's
forward-only runs share what training learned, so after the first step no message carries one —
tests/test_pipeline_headers.py counts them; with ``act_shapes`` declared none does, not even the
first). A gradient never carries one: ∂ℓ/∂y has the shape and
dtype of the activation y both ends exchanged earlier in the step. The sends
of one action go out together with the receives of the next in ``batch_isend_irecv`` groups, one
per process group (``batch=False``: one at a time). On NCCL a send blocks its stream until the
receive runs. With the pp group alone, gpipe, 1f1b and zero_bubble cannot deadlock even then, but
interleaved, zb_v and dualpipe_v can; with ``p2p_groups`` — four process groups over the pp ranks,
by direction and sender parity, so each rank's stream on each carries one neighbour one way
(:meth:`parallel.mesh.Mesh.pp_p2p_groups`, what the engine passes) — no schedule can
(:mod:`.p2p_streams` proves it in NCCL's no-buffering model for p ≤ 8, m ≤ 16, v ≤ 2); the
executor warns on NCCL when its setting is not proven free.
None of this has run on GPUs yet.
``comm_log`` lists the ("send" | "recv", peer, key) issued in the last run, in order.

Actions (micro-batch i on stage s; m micro-batches; L_i the micro-batch mean loss):

* ``F``: y = stage(x); on the last stage the loss L_i = loss_fn(y, target_i) is kept, scaled
  as ℓ_i = L_i · loss_scale / m, so that summing the gradients of the m micro-batches gives the
  gradient of the mean over the global batch (the parity contract, DESIGN.md);
* ``B``: backward of y with the received ∂ℓ/∂y (of ℓ_i on the last stage); parameter
  gradients accumulate in ``.grad``; ∂ℓ/∂x is sent to stage s−1;
* ``I`` / ``W`` (ZB-H1, ZB-V; Qi et al., arXiv 2401.10241): ``I`` computes only ∂ℓ/∂x and
  sends it, capturing the gradients that flow into the nodes where weights enter the activation
  path; ``W`` later computes the weight gradients from those alone
  (:mod:`.backward_split`), so FLOPs(I) + FLOPs(W) = FLOPs(B) and each weight gradient is
  accumulated exactly once. ``captured_bytes_peak`` is the most bytes of captured gradients
  held at once between I's and W's (the activations are held as for B until W).
  ``split_backward=False`` (the engine's choice under ZeRO-3, whose hooks free a unit once its
  gradients of the latest I/W are in and do not gather it again for a W that starts below the
  module outputs) makes W re-run the backward restricted to the weights: same numbers and order,
  FLOPs of W those of a full B.

``add_action_callback(fn)`` calls ``fn(action)`` before each action, ahead of its receives (the
watchdog reports the action a rank waits in).

:meth:`forward` runs a forward-only schedule (:func:`.schedules.forward_only`: every F of every
stage, no backward, no graph kept) over the same stages and groups: evaluation.

A stage holds a micro-batch's activations (its graph) from F until B, or until W. The executor
counts them: ``peak_held`` is the most (micro-batch, stage) pairs held at once, which the
schedule bounds (GPipe m; 1F1B p − rank; see :func:`.schedules.max_in_flight`). ``records``
lists the actions run, with the time spent waiting for input and computing (perf_counter);
``span`` is the last run's (start, end) on the same clock.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel import comm
from parallel.data import microbatches
from parallel.loss import cross_entropy
from parallel.pipeline.backward_split import SplitCache, WeightPass, backward_input, backward_weight
from parallel.pipeline.messages import Messages
from parallel.pipeline.p2p_order import send_order
from parallel.pipeline.p2p_streams import CHANNELS, PAIRS, stream_problems
from parallel.pipeline.schedules import Schedule, comm_ops, forward_only
from parallel.pipeline.shapes import declared_shapes
from parallel.pipeline.validate import validate

__all__ = ["PipelineExecutor", "Record", "microbatches"]


@dataclass(frozen=True)
class Record:
    """One executed action: seconds in the exchange before it (issuing the previous action's sends and
    this one's receives, then waiting for them), then computing. ``start``: the exchange's start
    (perf_counter, the same clock in every process on a machine); ``issue_s``: the part of ``wait_s``
    spent issuing, before any wait (what :mod:`.simulate` calls the action's overhead)."""
    action: object
    wait_s: float
    compute_s: float
    start: float = 0.0
    issue_s: float = 0.0


class PipelineExecutor(Messages):
    """Runs ``schedule``'s actions for this pp rank on its ``stages``.

    ``stages[j]`` is the j-th of ``schedule.stages_of(rank)``: stage ``pp_group.rank + j·p`` for the
    loop placement (what :func:`.split.split_model` returns), stages r and 2p−1−r for the V
    placement (:func:`.schedules_v.split_model_v`).
    ``loss_fn(output, target)`` returns the micro-batch mean (default: cross entropy, which takes
    logits or a transformers ModelOutput). Gradients accumulate into ``.grad``: zero them before
    :meth:`run` when a step starts. ``p2p_groups``: {"up0", "up1", "down0", "down1": Group} over
    the same ranks as ``pp_group`` (a message from pp rank s to a higher rank goes on "up{s mod 2}",
    to a lower one on "down{s mod 2}": NCCL-safe for every schedule, :mod:`.p2p_streams`); None:
    everything on ``pp_group``. ``act_shapes(src stage, dst stage, (input shape, dtype))`` → (shape,
    dtype) of the activation stage src sends stage dst for a micro-batch input of that shape (or None
    when unknown): what both ends then preallocate, so not even the first step's first activation
    carries a header; True: :func:`.shapes.declared_shapes` of these stages (from the split's probe;
    None where it cannot tell). The sender raises if its tensor differs from a declaration. None (the
    default): the first activation of each stage pair carries a header.
    """

    def __init__(self, stages: list, schedule: Schedule, pp_group: comm.Group, loss_fn=cross_entropy,
                 loss_scale: float = 1.0, tags: bool = True, batch: bool = True, split_backward: bool = True,
                 p2p_groups: dict | None = None, act_shapes=None):
        p, rank = pp_group.size, pp_group.rank
        if schedule.p != p:
            raise ValueError(f"pipeline: the {schedule.name} schedule is for p={schedule.p} ranks but the pp "
                             f"group has {p}; build it with get_schedule(name, {p}, m, v)")
        if len(stages) != schedule.v:
            raise ValueError(f"pipeline: pp rank {rank} got {len(stages)} stage modules but the schedule runs "
                             f"v={schedule.v} virtual stages per rank; split with virtual_stages={schedule.v}")
        self.stages = {}
        for s, mod in zip(schedule.stages_of(rank), stages):
            j = len(self.stages)
            info = getattr(mod, "stage_info", None)
            if info is not None and (info.index != s or info.n_stages != schedule.n_stages):
                raise ValueError(f"pipeline: stage module {j} of pp rank {rank} is stage {info.index} of "
                                 f"{info.n_stages}, but the schedule expects stage {s} of {schedule.n_stages}")
            self.stages[s] = mod
        self.schedule, self.group, self.rank = validate(schedule, fifo=False), pp_group, rank
        self.tags, self.batch, self.batched, self.split_backward = tags, batch, 0, split_backward
        self.p2p_groups, self.channels = p2p_groups, (PAIRS if p2p_groups else None)
        if p2p_groups and (set(p2p_groups) != set(CHANNELS)
                           or any(tuple(g.ranks) != tuple(pp_group.ranks) for g in p2p_groups.values())):
            raise ValueError(f"pipeline: p2p_groups must map {CHANNELS} to groups over the pp group's ranks "
                             "(parallel.mesh.Mesh.pp_p2p_groups())")
        self._eval: dict = {}
        self._warn_nccl(schedule)
        self._expect = {q: send_order(schedule, q, rank) for q in range(p) if q != rank}
        self._shapes: dict = {}
        self.act_shapes = declared_shapes(self.stages) if act_shapes is True else (act_shapes or None)
        self.comm_log: list = []
        self.loss_fn, self.loss_scale = loss_fn, loss_scale
        self.steps = comm_ops(schedule, rank)
        self.last = schedule.n_stages - 1
        self.params = {s: [q for q in mod.parameters() if q.requires_grad] for s, mod in self.stages.items()}
        self.split_cache = {s: SplitCache() for s in self.stages}   # I/W graph analysis, once per structure
        self.device = next((q.device for q in stages[0].parameters()), torch.device("cpu"))
        self.records: list[Record] = []
        self.peak_held = 0
        self.peak_held_per_stage: dict = {}
        self.captured_bytes_peak = 0
        self._action_callbacks: list = []

    def add_action_callback(self, fn):
        """Call ``fn(action)`` (an :class:`.actions.Action`) before each F/B/I/W action this rank runs,
        in schedule order; returns a function that removes it."""
        self._action_callbacks.append(fn)

        def remove():
            if fn in self._action_callbacks:
                self._action_callbacks.remove(fn)
        return remove

    def _warn_nccl(self, schedule) -> None:
        pg = self.group.pg
        if pg is None or not dist.is_initialized() or dist.get_backend(pg) != "nccl":
            return
        stuck = stream_problems(schedule, self.channels, grouped=self.batch) + \
            stream_problems(schedule, self.channels, grouped=False)
        if stuck:
            fix = "" if self.p2p_groups else "; pass p2p_groups=mesh.pp_p2p_groups() (the engine does)"
            warnings.warn(f"pipeline: the {schedule.name} schedule (p={schedule.p}, m={schedule.m}) may deadlock on "
                          f"NCCL, where a send blocks its stream until the peer's receive runs ({stuck[0]}){fix}. "
                          "p2p_streams.stream_problems checks it. Not yet run on GPUs.", stacklevel=3)

    # -------------------------------------------------------------------------------- running
    def run(self, micro_batches: list):
        """Run one step over ``micro_batches`` = [(input, target)] × m. Returns the mean
        micro-batch loss on the rank holding the last stage (a float), None elsewhere."""
        m = self.schedule.m
        if len(micro_batches) != m:
            raise ValueError(f"pipeline: the schedule was built for m={m} micro-batches, run() got "
                             f"{len(micro_batches)}; use microbatches(x, y, {m})")
        self.records, self._pending, self._mailbox, self.comm_log = [], [], {}, []
        self._next, self._stash, self._acts = dict.fromkeys(self._expect, 0), {}, {}
        self._sigs = [(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else None for x, _ in micro_batches]
        self._saved, self._losses = {}, {}
        self.peak_held, self.peak_held_per_stage = 0, {s: 0 for s in self.stages}
        self._captured = self.captured_bytes_peak = 0
        sends: list = []
        self.span = (time.perf_counter(), None)
        try:
            for step in self.steps:
                for fn in self._action_callbacks:
                    fn(step.action)
                t0 = self._issued = time.perf_counter()
                got = self._exchange(sends, step.recv)
                t1 = time.perf_counter()
                out = getattr(self, "_" + step.action.kind)(step.action, got[0] if got else None, micro_batches)
                sends = [(op, out) for op in step.send]
                self.records.append(Record(step.action, t1 - t0, time.perf_counter() - t1, t0, self._issued - t0))
                self._count_held()
                self._reap()
            self._exchange(sends, ())
        finally:
            for w in self._pending:
                w.wait()
            self._pending = []
            self.span = (self.span[0], time.perf_counter())
        if self._saved:
            raise RuntimeError(f"pipeline: activations of {sorted(self._saved)} were never released; "
                               "the schedule lacks their backward")
        if self.last not in self.stages:
            return None
        return float(sum(self._losses[i] for i in range(m)) / m)

    def forward(self, micro_batches: list):
        """Evaluation: the mean micro-batch loss over ``micro_batches`` through a forward-only
        schedule on the same stages and groups (no graph kept); a float on the rank holding the
        last stage, None elsewhere."""
        m = len(micro_batches)
        if m not in self._eval:
            sc = self.schedule
            self._eval[m] = PipelineExecutor(
                [self.stages[s] for s in sc.stages_of(self.rank)], forward_only(sc.p, m, sc.v, sc.placement),
                self.group, self.loss_fn, tags=self.tags, batch=self.batch, p2p_groups=self.p2p_groups,
                act_shapes=self.act_shapes)
            self._eval[m]._shapes = self._shapes    # what training learned: both ends know it, no header
        ex = self._eval[m]
        ex._action_callbacks = self._action_callbacks
        with torch.no_grad():
            return ex.run(micro_batches)

    def _reap(self) -> None:
        """Release the buffers of sends that have completed (a sent activation must not outlive
        its graph until the end of the step)."""
        done = [w for w in self._pending if all(x.is_completed() for x in w.works)]
        for w in done:
            w.wait()
        self._pending = [w for w in self._pending if w.works]

    def _count_held(self) -> None:
        self.peak_held = max(self.peak_held, len(self._saved))
        for s in self.stages:
            n = sum(1 for (_, st) in self._saved if st == s)
            self.peak_held_per_stage[s] = max(self.peak_held_per_stage[s], n)

    def _F(self, a, x, micro_batches):
        i, s = a.microbatch, a.stage
        if s == 0:
            x = micro_batches[i][0]
            x = x.to(self.device) if isinstance(x, torch.Tensor) else x
        elif x.is_floating_point():
            x.requires_grad_(True)
        y = self.stages[s](x)
        if s == self.last:
            target = micro_batches[i][1]
            loss = self.loss_fn(y, target.to(self.device) if isinstance(target, torch.Tensor) else target)
            self._losses[i] = loss.detach()
            if not self.schedule.forward_only:
                self._saved[(i, s)] = (x, loss * (self.loss_scale / self.schedule.m), None)
            return None
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"pipeline: stage {s} returned {type(y).__name__}; a non-last stage must return "
                            "one activation tensor")
        if not self.schedule.forward_only:
            self._saved[(i, s)] = (x, y, None)
        return y

    def _input_grad(self, x):
        return isinstance(x, torch.Tensor) and x.requires_grad

    def _B(self, a, dy, micro_batches):
        x, y, _ = self._saved.pop((a.microbatch, a.stage))
        if y.requires_grad:
            torch.autograd.backward(y, dy)
        if a.stage > 0:
            return x.grad if x.grad is not None else torch.zeros_like(x)
        return None

    def _I(self, a, dy, micro_batches):
        key = (a.microbatch, a.stage)
        if not self.split_backward and a.stage == self.last:
            # Without the split W re-walks the graph; the loss's own backward (vocab-parallel cross
            # entropy under tp) runs once only, so on the stage holding the loss I is the full B and
            # W is empty: the same gradients.
            dx = self._B(a, dy, micro_batches)
            self._saved[key] = (None, None, WeightPass([]))
            return dx
        x, y, _ = self._saved[key]
        dx, wp = backward_input(y, dy, x if self._input_grad(x) else None, self.params[a.stage],
                                split=self.split_backward, cache=self.split_cache[a.stage])
        self._saved[key] = (x, None, wp)
        self._captured += wp.captured_bytes
        self.captured_bytes_peak = max(self.captured_bytes_peak, self._captured)
        if a.stage == 0:
            return None
        return dx if dx is not None else torch.zeros_like(x)

    def _W(self, a, _none, micro_batches):
        _, _, wp = self._saved.pop((a.microbatch, a.stage))
        self._captured -= wp.captured_bytes
        backward_weight(wp, self.params[a.stage])
        return None

    # ------------------------------------------------------------------------------- reporting
    @property
    def executed(self) -> list:
        """The actions of the last :meth:`run`, in the order they ran."""
        return [r.action for r in self.records]
