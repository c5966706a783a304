"""ZeRO-3 regions: a module whose forward calls parameter-holding modules a data-dependent number of
times is gathered as one, so that every dp rank issues the same all-gathers in the same order.

Why. Stage 3 (:mod:`.stage3`) gathers a unit in the forward pre-hook of each module that needs it and
prefetches the units of the next module of the traced first forward. The all-gathers of the dp ranks are
matched by their order only (gloo and NCCL pair the k-th collective of every rank). A mixture-of-experts
layer that calls an expert *module* once per expert its tokens were routed to runs a different sequence of
modules on each rank: transformers' DBRX runs ``self.mlp(x[token_idx], w1, v1, w2)`` once per hit expert
(``for expert_idx in expert_hit``), 8 calls per forward on one rank and 7 on the other when an expert got
no token there. The rank whose forward departed from its trace stops prefetching, and its gathers come in
another order than its peer's: all-gathers of different units are paired — a hang (different sizes; gloo:
``Timed out waiting … for send operation``) or, for units of equal size, parameters silently mixed
between units. DeepSpeed's answer is a user-declared "leaf module" (``deepspeed.utils.set_z3_leaf_modules``
for Mixtral's sparse block), FSDP's to wrap whole blocks.

What. While the first forward is traced, :class:`CallRecorder` follows the calls of every module and marks
a module P as a *region* when, within one call of P, P's own code

* calls a module that holds (or contains) stage-3 units more than once (a loop over a module: DBRX), or
* calls some but not all of the unit-holding modules of one of its ``ModuleList``/``ModuleDict`` children
  (experts chosen by routing), or all of them but not as a chain (:mod:`.fanout`).

The marks of all dp ranks are combined (an all-reduce, once, at the end of the first forward: a rank
whose routing happened to call every expert still agrees with one that did not). From the next forward on,
a region's pre-hook gathers every unit of its subtree (in unit order), its post-hook frees them, its outputs'
gradient hooks gather them again for backward, and the modules inside it do nothing (no gather, no trace
position, no prefetch); the trace is recorded anew. What runs inside a region then issues no gather. The same
all-reduce compares the ranks' traced module orders outside regions; a difference raises on every rank (no
hang, no mixed parameters). Cost: a region's units are resident together (an MoE layer's experts, as FSDP's
block units); ``Stage3Params.regions`` names them and why.

The first forward itself runs module by module, in lockstep (:mod:`.lockstep`): every gather is compared
across dp ranks first; where the ranks' calls differ (an expert without tokens on one rank, in a ModuleList of
experts) the deepest common module becomes a region at once and the forward runs again from the same RNG state
and buffers. A region's gradients are reduced at the end of backward, in bucket order, with zeros for
parameters that got none on this rank (``FlatBucket.at_finish``, :mod:`parallel.data_parallel.reducer`), so
every rank issues the same reduce-scatters at the same point; a parameter that got no gradient on *any* rank is
skipped by the optimizer, as torch skips a ``grad=None`` parameter (one process never updates an expert no
token reached: no moment decay, no weight decay).

A ModuleList whose members were all called in the first forward becomes a region too when they were not called
as a chain (each one's input computed from the previous one's output, as a layer stack): experts that all got
tokens in the first forward may not in a later one (:mod:`.fanout`).
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn as nn

from parallel.comm import all_reduce
from parallel.config import ConfigError
from parallel.zero.fanout import fan_out, first_tensor, tensors
from parallel.zero.trace import TracedOrder

__all__ = ["CallRecorder", "agree_regions", "region_units", "apply_regions", "holders_of",
           "refuse_merged_regions", "MERGED_REGIONS"]

MERGED_REGIONS = "zero.unit_mb: the region(s)"     # how the refusal begins (launch/unmerged.py retries on it)


class CallRecorder:
    """Forward hooks on every module of ``root`` during one forward; :attr:`regions` maps each module
    found to call unit-holding modules data-dependently to the reason (see the module docstring).
    ``holds(m)``: whether ``m`` or a descendant has stage-3 units."""

    def __init__(self, root: nn.Module, holds):
        self.holds = holds
        self.regions: dict = {}
        self._stack: list = []                       # [module, [unit-holding modules it called]]
        self.on = True                               # False: finished (hooks removed later, outside forwards)
        self._handles = []
        for m in root.modules():
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post, always_call=True))

    def _pre(self, m, args, kwargs=None):     # None: removed while its module's hook loop ran (torch then omits it)
        if not self.on:
            return
        if self._stack and self.holds(m):
            self._stack[-1][1].append(m)
            self._stack[-1][2].append([m, tensors((args, kwargs)), None])    # (.fanout)
        self._stack.append([m, [], []])

    def _post(self, m, args, out):
        if not self.on or not self._stack or self._stack[-1][0] is not m:
            return
        _, called, calls = self._stack.pop()
        if self._stack and self._stack[-1][2] and self._stack[-1][2][-1][0] is m:
            self._stack[-1][2][-1][2] = first_tensor(out)
        if m in self.regions or not called:
            return
        counts = Counter(called)
        again = [c for c, n in counts.items() if n > 1]
        if again:
            self.regions[m] = f"calls {type(again[0]).__name__} {counts[again[0]]} times in one forward"
            return
        for name, child in m.named_children():
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                members = [c for c in child.children() if self.holds(c)]
                hit = [c for c in members if c in counts]
                if hit and len(hit) < len(members):
                    self.regions[m] = f"calls {len(hit)} of the {len(members)} modules of .{name}"
                    return
                if len(members) > 1 and len(hit) == len(members) and fan_out(calls, members):
                    self.regions[m] = (f"calls all {len(members)} modules of .{name}, not as a chain (which run "
                                       f"may depend on the data: parallel/zero/fanout.py)")
                    return

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def agree_regions(root: nn.Module, regions: dict, trace: list, group) -> tuple[list, bool]:
    """(the regions any dp rank found, whether every rank's traced module order outside them is the same).
    Every rank calls this once, at the same point (one all-reduce). Regions in ``root.modules()`` order,
    the outermost kept when one contains another."""
    mods = list(root.modules())
    index = {m: i for i, m in enumerate(mods)}
    flags = torch.tensor([int(m in regions) for m in mods] + [0, 0], dtype=torch.int64)
    if group.size > 1:
        all_reduce(flags[:-2], group.control(), op="max")
    chosen = [m for m, f in zip(mods, flags[:-2].tolist()) if f]
    inner = {d for m in chosen for d in m.modules() if d is not m}
    chosen = [m for m in chosen if m not in inner]
    h = hash(tuple(index[m] for m in trace if m not in inner)) & ((1 << 62) - 1)
    both = torch.tensor([h, -h], dtype=torch.int64)
    if group.size > 1:
        all_reduce(both, group.control(), op="max")
    return chosen, int(both[0]) == -int(both[1])


def region_units(region: nn.Module, needs: dict) -> list:
    """The units of every hooked module inside ``region`` (itself included), each once, in unit order."""
    units = {id(u): u for m in region.modules() for u in needs.get(m, ())}
    return sorted(units.values(), key=lambda u: u.index)


def holders_of(root: nn.Module, needs: dict) -> set:
    """Modules that have stage-3 units or contain one that has."""
    return {m for m in root.modules() if any(needs.get(d) for d in m.modules())}


def apply_regions(s3) -> None:
    """Make each agreed region of ``s3`` (a :class:`~parallel.zero.stage3.Stage3Params`) gather its subtree's units
    as one; re-trace the order (next forward). A region's gradients are reduced at the end of backward, in bucket
    order, zeros for parameters that got none (an expert without tokens on one rank), so every rank reduces the same
    buckets at the same point."""
    refuse_merged_regions(s3)
    for r in s3._pending:
        if r not in s3._hooked:
            s3._hook(r)
        s3.needs[r] = region_units(r, s3.needs)
        for u in s3.needs[r]:
            u.at_finish = True
        s3._inert.update(d for d in r.modules() if d is not r and d in s3._hooked)
    s3._pending = []
    s3.order = TracedOrder()
    s3._last_free = {}


def refuse_merged_regions(s3) -> None:
    """Raise on every dp rank when a region about to be applied holds a merged unit (``zero.unit_mb``;
    :mod:`parallel.zero.unit_life` says why). Growing the region to every module needing its merged units instead
    was tried (session 13): merges span block edges (the embedding with block 0), the region grows to the root, and
    the ModuleList-experts case still hangs. A bucket set by a DeepSpeed file is retried unmerged by the launcher
    (launch/unmerged.py), which finds this refusal by the message's start, :data:`MERGED_REGIONS`."""
    names = {m: n for n, m in s3.module.named_modules()}
    bad = [names.get(r, type(r).__name__) for r in s3._pending
           if any(u.waits is not None for u in region_units(r, s3.needs))]
    if bad:
        raise ConfigError(f"{MERGED_REGIONS} {bad} call their modules a data-dependent number of times "
                          f"(parallel/zero/regions.py) and hold merged stage-3 units, which could make the dp ranks "
                          f"issue different gathers: set zero.unit_mb: 0 for this model (with a DeepSpeed JSON whose "
                          f"zero_optimization sets stage3_prefetch_bucket_size: set it to 0, which also turns "
                          f"prefetching off, or pass the override zero.unit_mb=0; absent, DeepSpeed's default 5e7 "
                          f"applies unless the YAML sets zero.unit_mb)")
