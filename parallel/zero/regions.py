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
  (experts chosen by routing).
* (inside a block, see below) reads tensor data into Python — ``.tolist()``, ``.item()``, ``bool(t)``,
  iterating a tensor, ``nonzero`` / one-argument ``where`` / ``unique`` — before calling a unit-holding
  module: its calls may depend on the data even when, in this forward, every expert happened to be hit.

The first forward, which finds them, must not depend on them: it gathers per *block* — each module of a
``ModuleList``/``Sequential`` of at least two modules of one class with its own ``forward`` (the transformer
layers), outermost — with everything inside a block gathered at the block's entry (memory: one block, as
``zero.units: block``). Blocks are assumed to be called the same way on every rank (checked: the traced
module orders of all ranks are compared after each traced forward, and differing ones raise on every rank).

The marks of all dp ranks are combined (an all-reduce, once, at the end of the first forward: a rank
whose routing happened to call every expert still agrees with one that did not). From the next forward on,
a region's pre-hook gathers every unit of its subtree (in unit order), its post-hook frees them, its outputs'
gradient hooks gather them again for backward, and the modules inside it do nothing (no gather, no trace
position, no prefetch); the trace is recorded anew. What runs inside a region may then differ between ranks
freely: it issues no collective. Cost: a region's units are resident together (an MoE layer's experts, as
FSDP's block units), reported once.

Limit: a model without such block lists runs its first forward module by module; data-dependent calls
outside blocks are not looked for (the root and modules containing blocks are exempt from the third rule,
so that a mask check in the model's own forward does not make the whole model one region).
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn as nn

from parallel.comm import all_reduce

__all__ = ["CallRecorder", "agree_regions", "region_units", "find_blocks"]

# torch functions whose result moves tensor *data* into Python control flow or into a shape
DATA = frozenset([torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__iter__,
                  torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__float__, torch.Tensor.nonzero,
                  torch.nonzero, torch.argwhere, torch.Tensor.argwhere, torch.unique, torch.Tensor.unique,
                  torch.unique_consecutive, torch.masked_select, torch.Tensor.masked_select, torch.bincount,
                  torch.Tensor.bincount])


def is_data(func, args) -> bool:
    return func in DATA or (func is torch.where and len(args) == 1)


def find_blocks(root: nn.Module, holds) -> list:
    """The outermost modules of a ModuleList/Sequential of ≥ 2 modules of one class that defines ``forward``
    and holds units (transformer layers)."""
    found = []
    for m in root.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)):
            ch = list(m.children())
            if (len(ch) >= 2 and len({type(c) for c in ch}) == 1 and all(holds(c) for c in ch)
                    and type(ch[0]).forward is not nn.Module.forward):
                found += ch
    inner = {d for b in found for d in b.modules() if d is not b}
    return [b for b in found if b not in inner]


class CallRecorder:
    """Forward hooks on every module of ``root`` during one forward; :attr:`regions` maps each module
    found to call unit-holding modules data-dependently to the reason (see the module docstring).
    ``holds(m)``: whether ``m`` or a descendant has stage-3 units."""

    def __init__(self, root: nn.Module, holds, blocks=()):
        self.holds = holds
        parent = {c: m for m in root.modules() for c in m.children()}
        above = {root}                               # the root and modules containing blocks: rule 3 exempt
        for b in blocks:
            while b in parent and b not in above:
                b = parent[b]
                above.add(b)
        self._exempt = above
        self.regions: dict = {}
        self._stack: list = []                       # [module, [unit-holding modules it called]]
        self.on = True                               # False: finished (hooks removed later, outside forwards)
        self._handles = []
        for m in root.modules():
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post, always_call=True))

    def _pre(self, m, args):
        if not self.on:
            return
        if self._stack and self.holds(m):
            top = self._stack[-1]
            top[1].append(m)
            if top[2] and top[3] is None:
                top[3] = (top[2], m)                 # data read, then a unit-holding module called
        self._stack.append([m, [], None, None])      # module, calls, first data event, (event, module after)

    def data(self, func, args) -> None:
        """A torch call in the traced forward (TouchMode's ``on_call``): note reads of data."""
        if self.on and self._stack and not self._stack[-1][2] and is_data(func, args):
            self._stack[-1][2] = getattr(func, "__name__", str(func))

    def _post(self, m, args, out):
        if not self.on or not self._stack or self._stack[-1][0] is not m:
            return
        _, called, _, after = self._stack.pop()
        if m in self.regions or not called:
            return
        if after is not None and m not in self._exempt:
            self.regions[m] = f"reads tensor data ({after[0]}) before calling {type(after[1]).__name__}"
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
