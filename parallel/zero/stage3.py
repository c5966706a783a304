"""ZeRO stage 3: parameters sharded over dp, gathered per module just in time, freed after use.

Rajbhandari et al., arXiv 1910.02054, §5.3 (P_os+g+p): each rank keeps 1/N of every parameter;
"during forward propagation the parameters of each layer are broadcast/all-gathered just before
use and discarded after"; the same again in backward. Per step and rank, in the ring model:
all-gather Ψ·b in forward + Ψ·b in backward + reduce-scatter of the gradients, 3(N−1)/N·Ψ·b.

Units. The parameters are split into *units*, each one :class:`~parallel.data_parallel.bucket.FlatBucket` sharded
over dp. By default every module that directly owns parameters is a unit (Linear, LayerNorm,
Embedding, …); ``unit_types=(Block,)`` makes each instance of those classes a unit instead (plus
the root for what is left), as FSDP's ``fully_shard`` per block. A module's *needs* are the units
of all parameters it reaches without entering another unit's module — for a tied weight, the head
needs the embedding's unit (it is gathered twice in forward: the tie costs one extra all-gather). ``zero.unit_mb``
merges consecutive units (:func:`.unit_plan.merge_units`; lifetime and kept units: :mod:`.unit_life`).

Lifecycle of a unit, driven by hooks:
  forward pre-hook of a module   gather its needs (wait), prefetch the next module's needs
  forward post-hook              free the needs; hook the outputs' gradients (pre-backward); inside backward
                                 (an activation checkpoint's recompute) keep them: their backward follows,
                                 so a recomputed unit is gathered twice per step, not three times
  output-gradient hook           gather the needs again, prefetch the previous module's needs
  post-accumulate-grad hooks     once every parameter of the unit has its gradient: free it
Module order comes from a trace of the first forward (as DeepSpeed and FSDP record it;
:class:`parallel.zero.trace.TracedOrder`), and the prefetch keeps at most one extra module's units in
flight (``prefetch=False``: none). The root's output-gradient hook (the first of backward) prefetches the
last traced module's needs. Issue order: a hook issues its module's gathers, then the prefetch, and only then
waits, so no wait leaves the link idle behind it (``lone_waits`` counts the waits with no other gather in
flight): at a step's start the first block's gather overlaps the root's instead of following it. With offloaded
shards the prefetch follows the wait (:meth:`Stage3Params._issue`).

Kept units (``keep`` = ``zero.keep_after_forward``, k). The k units freed last in the traced forward (block
units: the root's — embeddings, final norm, tied head — and the last block's) are not freed at the end of
forward: backward starts with them, so each is all-gathered once per micro-batch instead of twice,
(N−1)/N·|u|·b fewer wire bytes per unit and step, and backward does not begin with a blocking gather. As
FSDP2 keeps its root (``reshard_after_forward=False``) and DeepSpeed keeps parameters whose reuse distance is
below ``stage3_max_reuse_distance``. For k ≤ 2 this raises no peak: backward's first hooks gather exactly
these units (plus one prefetched) at the point where the saved activations are largest. A kept unit is freed
by its gradients (as any unit in backward), by ``free_all``, or at the next forward's start if no backward
took it (a forward without backward); under pipeline parallelism (several forwards before their backwards)
the engine sets k = 0.

Freeing. The gathered flat buffer keeps its tensor object but its storage is resized to 0, and each
parameter's ``.data`` is swapped for an empty tensor. Autograd may have saved views of the weight
(``F.linear`` saves ``weight.t()``): they point at the same storage, which is refilled by the
gather before the module's backward runs (FSDP's ``storage.resize_`` technique). A parameter used
outside the forward of the modules that hold it (``F.linear(x, other.weight)``, a Mamba mixer reading
``self.conv1d.weight``) is found on the traced first forward and becomes a need of the module whose
code used it (:mod:`parallel.zero.touch`). A module whose code calls unit-holding modules a data-dependent
number of times (an MoE layer looping over its hit experts) becomes one *region* after the first forward,
gathered as a whole, so every rank issues the same gathers (:mod:`parallel.zero.regions`); the first forward,
before any region is known, compares every gather across dp ranks first (:mod:`parallel.zero.lockstep`).

Parameter offload (``shards=`` a :class:`~parallel.offload.shards.ParamOffload`; ZeRO-Infinity, arXiv 2104.07857,
§5.2): the gather fetches a unit's shard from its store and releases it once complete; each prefetch also starts
the store reads of the units ``depth`` modules further along the trace.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from parallel.comm import Group, all_gather_into
from parallel.data_parallel.bucket import FlatBucket
from parallel.zero.lockstep import Lockstep, first_forward
from parallel.zero.own_views import bind, fill_straddlers
from parallel.zero.regions import CallRecorder, agree_regions, apply_regions, holders_of, refuse_merged_regions
from parallel.zero.touch import TouchMode
from parallel.zero.trace import OFF, TracedOrder
from parallel.zero.unit_life import init_owners, last_frees, may_free, owner_done, reuse_keep, trace_owners
from parallel.zero.unit_plan import plan_units  # noqa: F401  (re-exported: parallel.zero.stage3.plan_units)
from parallel.zero.view_hooks import hook_output_grad

__all__ = ["plan_units", "Stage3Params"]

SHARDED, GATHERING, FULL = 0, 1, 2


class Stage3Params:
    """Gathers and frees the units of ``module`` around each module's forward and backward; ``own_views`` (False:
    the plain gather, for A/B): parameters inside the own shard are views of it (:mod:`parallel.zero.own_views`)."""

    own_views = True

    def __init__(self, module: nn.Module, units: list, needs: dict, group: Group, prefetch: bool = True,
                 shards=None, depth: int = 0, keep: int = 0, reuse=None):
        if keep < 0:
            raise ValueError(f"stage 3: keep={keep} must be >= 0 (zero.keep_after_forward: units kept gathered "
                             f"from forward to backward; 0 frees every unit after its forward)")
        self.module, self.units, self.group, self.prefetch = module, units, group, prefetch
        self._keep, self.reuse = keep, reuse   # units freed last in forward kept into backward (.unit_life)
        self.shards, self.depth = shards, depth
        self.needs = {m: [units[i] for i in idx] for m, idx in needs.items()}
        self.needs.setdefault(module, [])      # the root is hooked too: code in its forward may touch a unit
        self.merged = init_owners(units, self.needs)       # some unit holds several modules' units (zero.unit_mb)
        self.unit_of = {p: u for u in units for p in u.params}
        for u in units:
            u.state, u.users, u.bwd, u.fired, u.work, u.kept = SHARDED, 0, False, 0, None, False
        self.gathered_bytes = self.peak_gathered_bytes = self.gathers = 0
        self.lone_waits = 0                    # waits on a gather with no other gather in flight (issue order)
        self._flying = 0                       # units in state GATHERING
        self.order = TracedOrder()
        self._freed: list = []                 # (unit, module that freed it) in the traced forward's order
        self._last_free: dict = {}             # (unit, module) ids of each unit's last free -> rank from the end
        self._departed = False                 # this forward left the trace: keep nothing
        self._pos_of: dict = {}                # module -> its position in this forward (OFF: off trace)
        self._stack: list = []                 # hooked modules running (while tracing), innermost last
        self._quiet = 0                        # > 0 inside our own hooks: their reads are not uses
        self._touch = None                     # the TouchMode of the traced forward
        self._calls = None                     # the CallRecorder of the traced forward (regions)
        self._done_calls = None                # a finished one, its hooks removed before the next forward
        self._pending: list = []               # regions agreed at the end of the first forward, applied next
        self._inert: set = set()               # hooked modules inside a region: their hooks do nothing
        self.regions: dict = {}                # region module -> why (parallel.zero.regions)
        self._handles = []
        self._hooked: set = set()
        for m in self.needs:
            self._hook(m)
        self._lock = Lockstep(module, group) if group.size > 1 else None     # the first forward: see .lockstep
        self._retried: set = set()              # regions made by a first-forward restart (.lockstep)
        self.restarts = 0
        if self._lock is not None:
            self._own_forward = module.__dict__.get("forward")
            module.forward = self._first_forward
        self._handles.append(module.register_forward_pre_hook(self._root_pre, prepend=True))
        self._handles.append(module.register_forward_hook(self._root_post))
        self._handles.append(module.register_forward_hook(self._end_touch, always_call=True))   # also on errors

    @property
    def keep(self) -> int:
        return self._keep

    @keep.setter
    def keep(self, k: int) -> None:         # a count set later (the engine under pp: 0) replaces the reuse rule
        self._keep, self.reuse = k, None

    def _hook(self, m: nn.Module) -> None:
        # first of the pre-hooks: others may read the parameters (sequence parallel's LayerNorm hook wraps them)
        self._hooked.add(m)
        self._handles.append(m.register_forward_pre_hook(self._pre_forward, prepend=True))
        self._handles.append(m.register_forward_hook(self._post_forward))

    def _apply_regions(self) -> None:
        apply_regions(self)                 # parallel/zero/regions.py
        init_owners(self.units, self.needs)  # merged units wait for all their owners again until the new trace

    def _lock_on(self) -> bool:
        return self._lock is not None and self.module.__dict__.get("forward") == self._first_forward

    def _first_forward(self, *args, **kwargs):
        """The first forward, in lockstep over dp (:func:`.lockstep.first_forward`)."""
        return first_forward(self, args, kwargs)

    # --- gather / free ----------------------------------------------------------------------------
    def _nbytes(self, u: FlatBucket) -> int:
        return u.padded * u.flat_param.element_size()

    def _gather(self, u: FlatBucket, wait: bool = True) -> None:
        if u.state == SHARDED and self._lock is not None and self._calls is not None and self._calls.on:
            self._lock.check(u.index, [e[0] for e in self._calls._stack], f"unit {u.index} ({u.names[0]}, …)")
        views = self.own_views and self.shards is None              # own part: views of the shard (.own_views)
        if u.state == SHARDED:
            src = self.shards.fetch(u) if self.shards is not None else u.shard_param
            u.flat_param.untyped_storage().resize_(self._nbytes(u))
            if views:
                fill_straddlers(u, u.flat_param, src)
            u.work = all_gather_into(u.flat_param, src, u.group or self.group, async_op=True, fill_own=not views)
            u.state = GATHERING
            self._flying += 1
            self.gathers += 1
            self.gathered_bytes += self._nbytes(u)
            self.peak_gathered_bytes = max(self.peak_gathered_bytes, self.gathered_bytes)
        if wait and u.state == GATHERING:
            self._landed(u)
            bind(u, u.flat_param, u.shard_param if views else None)
            u.state = FULL

    def _landed(self, u: FlatBucket) -> None:
        """The unit's gather has completed; its offloaded shard's buffer can be reused."""
        self._flying -= 1                      # called once per gather, in state GATHERING
        if u.work is not None:
            self.lone_waits += self._flying == 0
            u.work.wait()
            u.work = None
        if self.shards is not None:
            self.shards.release(u)

    def _free(self, u: FlatBucket) -> None:
        if u.state == SHARDED:
            return
        if u.state == GATHERING:
            self._landed(u)
        for p in u.params:
            p.data = torch.empty(0, dtype=u.flat_param.dtype, device=u.flat_param.device)
        u.flat_param.untyped_storage().resize_(0)
        u.state, u.bwd, u.fired, u.kept = SHARDED, False, 0, False
        self.gathered_bytes -= self._nbytes(u)

    def _issue(self, units: list, prefetch) -> None:
        """Gather ``units`` (waiting) and call ``prefetch``: before the wait (module docstring: issue order), but
        after it with offloaded shards, whose release at the wait returns an IO buffer to the store's pool that
        the prefetch's fetch takes (``buffer_count`` = 1 holds one unit at a time)."""
        early = self.shards is None
        if early:
            for u in units:
                self._gather(u, wait=False)
            prefetch()
        for u in units:
            self._gather(u)
        if not early:
            prefetch()

    def _prefetch_at(self, pos: int, step: int = 1) -> None:
        order = self.order
        if order.tracing or self._pending or not 0 <= pos < len(order):
            return
        while self.merged and 0 <= pos + step < len(order) and all(   # merged units: past modules whose units
                u.state != SHARDED for u in self.needs[order.modules[pos]]):   # are in already, to the next ones
            pos += step
        if self.shards is not None and self.depth:                  # store read-ahead
            self.shards.prefetch([u for m in order.ahead(pos, self.depth, step)
                                  for u in self.needs[m] if u.state == SHARDED])
        if self.prefetch:
            for u in self.needs[order.modules[pos]]:
                self._gather(u, wait=False)

    # --- hooks ------------------------------------------------------------------------------------
    def _root_pre(self, module, args):
        if self._done_calls is not None:    # not inside the root's own hook loop (that would mutate it)
            self._done_calls.remove()
            self._done_calls = None
        if self._pending:
            self._apply_regions()
        for u in self.units:                # kept by a forward that no backward followed
            if u.kept and not u.bwd and u.users == 0:
                self._free(u)
        for u in self.units:                # merged units: no owner has finished this forward yet
            if u.done:
                u.done.clear()
        self.order.start()
        self._stack = []
        self._departed = False
        if self.order.tracing:
            self._freed = []
        if self.order.tracing and self._touch is None and (self._lock_on() or not self._inert):
            self._touch = TouchMode(self.unit_of, lambda u: u.state == FULL, self._adopt, lambda: self._quiet)
            self._touch.__enter__()
            holders = holders_of(self.module, self.needs)
            self._calls = CallRecorder(self.module, holders.__contains__)

    def _adopt(self, u: FlatBucket) -> None:
        """The traced forward's code used a parameter of ``u`` while ``u`` was not gathered: gather it now,
        and make it a need of the innermost running hooked module (see :mod:`parallel.zero.touch`)."""
        m = self._stack[-1] if self._stack else self.module
        self._gather(u)
        u.users += 1
        if not any(x is u for x in self.needs[m]):
            self.needs[m].append(u)

    def _end_touch(self, module=None, args=None, out=None):
        if self._calls is not None:         # the first forward raised: stop recording
            self._calls.on, self._done_calls, self._calls = False, self._calls, None
        if self._touch is not None:
            self._touch, touch = None, self._touch
            touch.__exit__(None, None, None)

    def _root_post(self, module, args, out):
        if self._calls is not None:         # the first forward: every dp rank agrees on the regions
            self._calls, calls = None, self._calls
            calls.on, self._done_calls = False, calls
            names = {m: n for n, m in self.module.named_modules()}
            self._pending, same = agree_regions(self.module, calls.regions, self.order.modules, self.group)
            refuse_merged_regions(self)     # zero.unit_mb: before this backward, whose hooks differ by rank
            self.regions.update({names[r]: calls.regions.get(r, "found on another dp rank") for r in self._pending})
            if not same:                    # every rank sees the same answer: all raise, none hangs
                raise RuntimeError(
                    "ZeRO-3: the dp ranks called their modules in different orders in the first forward (outside "
                    "any loop over a module or partly called ModuleList, which are gathered as one region): the "
                    "model's control flow depends on the data, and per-module gathers would pair different "
                    "parameters across ranks. Use zero.units: block, or zero.stage ≤ 2")
        self._end_touch()
        if self.order.tracing:              # the units freed last in the traced forward are the ones to keep
            self._last_free = last_frees(self._freed)
            self._keep = self._keep if self.reuse is None else reuse_keep(self._freed, self.reuse)   # .unit_life
            trace_owners(self.units, self.needs, self.order.modules)
        self.order.finish()
        for u in self.units:                # stale prefetches (a forward that took another path)
            if u.users == 0 and not u.bwd and not u.kept:
                self._free(u)
        if self.shards is not None:
            self.shards.drop_stale()

    def _pre_forward(self, m, args):
        if m in self._inert:
            return
        self._quiet += 1
        try:
            pos = self.order.visit(m)       # OFF when this forward departs from the trace: no prefetch
            self._departed |= pos == OFF
            outside = torch._C._current_graph_task_id() == -1          # not a recompute inside backward
            for u in self.needs[m]:
                if outside and u.bwd:       # a finished backward left it (a parameter got no gradient, XLNet's
                    u.fired, u.bwd = 0, False     # r_s_bias): count the next backward's gradients afresh
            self._issue(self.needs[m], lambda: self._prefetch_at(pos + 1))
            for u in self.needs[m]:
                u.users += 1
            self._pos_of[m] = pos
            if self._touch is not None:
                self._stack.append(m)
        finally:
            self._quiet -= 1

    def _post_forward(self, m, args, out):
        if m in self._inert:
            return out
        self._quiet += 1
        try:
            return self._post_forward_quiet(m, args, out)
        finally:
            self._quiet -= 1

    def _post_forward_quiet(self, m, args, out):
        if self._stack and self._stack[-1] is m:
            self._stack.pop()
        grad = torch.is_grad_enabled()
        recompute = torch._C._current_graph_task_id() != -1    # a forward inside backward: a checkpoint's recompute
        for u in self.needs[m]:
            u.users -= 1
            if not recompute:
                owner_done(u, m)
            if recompute:
                u.bwd = True                # its backward follows: stays gathered until its gradients free it
            elif u.users == 0 and not u.bwd and may_free(u, self._inert):
                if self.order.tracing:
                    self._freed.append((u, m))
                if grad and self._last_free.get((id(u), id(m)), self.keep) < self.keep and not self._departed:
                    u.kept = True           # gathered until its backward (module docstring: kept units)
                else:
                    self._free(u)
        if grad:
            pos = self._pos_of.get(m, OFF)
            if m is self.module and pos == 0:       # backward starts here: prefetch the last traced module
                pos = len(self.order)
            tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            for t in tensors:
                hook_output_grad(t, lambda m=m, pos=pos: self._pre_backward(m, pos))
        return out

    def _pre_backward(self, m, pos: int) -> None:
        self._issue(self.needs[m], lambda: self._prefetch_at(pos - 1, -1))
        for u in self.needs[m]:
            u.bwd = True

    def kept_units(self) -> list:
        """The units this forward keeps gathered into backward (their last frees among the ``keep`` last)."""
        ids = {k[0] for k, i in self._last_free.items() if i < self.keep}
        return [u for u in self.units if id(u) in ids]

    def on_grad(self, p) -> None:
        """A parameter's gradient was accumulated: free its unit once all of the unit's have been."""
        u = self.unit_of.get(p)
        if u is None:
            return
        u.fired += 1
        if u.fired == len(u.params):
            u.fired, u.bwd = 0, False
            if u.users == 0:
                self._free(u)

    def free_all(self) -> None:
        """End of backward: free whatever is still gathered (units whose parameters got no grad)."""
        for u in self.units:
            if u.users == 0:
                self._free(u)
        if self.shards is not None:
            self.shards.drop_stale()

    @contextlib.contextmanager
    def gathered(self):
        """All parameters full inside the block (evaluation, export); freed again after."""
        for u in self.units:                # offloaded: one at a time, each buffer back before the next
            self._gather(u, wait=self.shards is not None)
        for u in self.units:
            self._gather(u)
            u.users += 1
        try:
            yield
        finally:
            for u in self.units:
                u.users -= 1
                if u.users == 0:
                    self._free(u)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
