"""A ModuleList whose members all ran in the first forward, but not one after another: a ZeRO-3 region.

Regions (:mod:`.regions`) are found while the first forward is traced: a module that calls some but not all of
the unit-holding members of one of its ``ModuleList``/``ModuleDict`` children chose them by the data (experts
picked by routing). If the first forward happened to call *every* member on every rank — each expert got a
token — nothing marks the parent, and a later forward that leaves one member out on one rank issues other
all-gathers than its peers: different units paired by order, a hang, or for units of equal size (experts)
parameters silently mixed between them. Comparing the calls of every later forward would cost a collective per
gather; instead the first forward's calls are classified by how the members' inputs relate:

* a **chain** — an input of each member is computed from the previous member's output (``h = layer(h)`` over a
  layer stack, with any ops between): every member runs on every forward whatever the data, since each one's
  input needs the one before;
* a **fan-out** — some member's input does not depend on the previous member's output (``expert(x[idx])`` for
  each expert, heads over one input): which members run may depend on the data, so the parent becomes a region
  (gathered as one, :mod:`.regions`), the same as a partial call.

Decided on the autograd graph of the first forward: some tensor argument of member k+1 is member k's (first)
output, or that output's ``grad_fn`` is reached from the argument's ``grad_fn`` within :data:`LIMIT` nodes. Without a
graph (a first forward under ``no_grad``) only identity counts, so a stack with ops between its layers is then
taken for a fan-out: a region too many (its units resident together: memory), never a silent mix.

Limit: as for partial calls, only modules below the root are classified (the root's own calls end with the
first forward, before the recorder sees the root return); a model whose own forward loops over experts is
covered only by the first forward's lockstep (:mod:`.lockstep`).
"""
from __future__ import annotations

from collections import deque

import torch
from torch.utils._pytree import tree_flatten

__all__ = ["LIMIT", "tensors", "first_tensor", "feeds", "fan_out"]

LIMIT = 512         # autograd nodes searched from one member's input back towards the previous member's output


def tensors(x) -> list:
    """The tensors in a (nested) call's arguments."""
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def first_tensor(x):
    """The first tensor in a (nested) call argument or output, or None."""
    for t in tree_flatten(x)[0]:
        if isinstance(t, torch.Tensor):
            return t
    return None


def feeds(out, inp) -> bool:
    """Whether ``inp`` is ``out`` or was computed from it (within :data:`LIMIT` autograd nodes)."""
    if out is None or inp is None:
        return False
    if inp is out:
        return True
    target, start = out.grad_fn, inp.grad_fn
    if target is None or start is None:
        return False
    seen, todo = {id(start)}, deque([start])
    while todo and len(seen) <= LIMIT:
        f = todo.popleft()
        if f is target:
            return True
        for nxt, _ in f.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                todo.append(nxt)
    return False


def fan_out(calls: list, members: list) -> bool:
    """``calls``: [(member, its input tensors, its first output tensor)] in call order within one call of the
    parent; ``members``: the list's unit-holding members, all of which were called. True when no input of some
    call comes from the previous call's output (module docstring)."""
    mine = [c for c in calls if any(c[0] is m for m in members)]
    return any(not any(feeds(a[2], t) for t in b[1]) for a, b in zip(mine, mine[1:]))
