"""ZeRO-3's first forward in lockstep: the dp ranks compare every gather before issuing it.

Stage 3 pairs the all-gathers of the dp ranks by their order. Before the first forward has been traced, a
module that one rank calls and another does not (an expert of a ``ModuleList`` that got no token on one rank)
makes the ranks' gathers differ at once: all-gathers of different units are paired (a hang, or for units of
equal size parameters silently mixed). So while the first forward is traced, every gather is preceded by one
small all-reduce over the dp group's control channel comparing the unit each rank is about to gather
(:meth:`Lockstep.check`; ``END`` when a rank's forward ended). At the first difference every rank raises
:class:`Diverged` at the same call — none waits on another — carrying the deepest module on the call stack
common to all ranks (found with two more all-reduces of the ranks' stacks): the module whose own code chose
different children on different ranks. Stage 3 then makes that module a region (:mod:`.regions`: gathered as a
whole, its inner modules silent), restores the RNG state and buffers, and runs the forward again
(:meth:`.stage3.Stage3Params._first_forward`). Cost: one 16-byte all-reduce per gather of the first forward only.
When the common module is the root (the model's own forward calls different modules per rank) the error is
raised on every rank instead, naming the modules.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from parallel.comm import all_reduce
from parallel.zero.trace import TracedOrder

__all__ = ["Lockstep", "Diverged", "END", "DEPTH", "first_forward"]

END = -1            # the code of "this rank's forward ended"
DEPTH = 64          # call-stack entries compared (deeper stacks are cut: the common module is then shallower)


class Diverged(RuntimeError):
    """The dp ranks' first forwards called different modules; ``common`` is the deepest module on every
    rank's call stack at that point (None when there is none but the root)."""

    def __init__(self, message: str, common: nn.Module | None):
        super().__init__(message)
        self.common = common


class Lockstep:
    """Compares, over ``group``'s control channel, what every dp rank is about to gather (see the module doc)."""

    def __init__(self, root: nn.Module, group):
        self.root, self.group = root, group
        self.mods = list(root.modules())
        self.index = {m: i for i, m in enumerate(self.mods)}
        self.names = {m: n or "<root>" for n, m in root.named_modules()}
        self.checks = 0

    def check(self, code: int, stack: list, what: str) -> None:
        """All ranks call this at the same point of their first forward with the unit index they are about to
        gather (or :data:`END`) and their call stack (outermost first); raises :class:`Diverged` on every rank
        when the codes differ."""
        self.checks += 1
        both = torch.tensor([code, -code], dtype=torch.int64)
        all_reduce(both, self.group.control(), op="max")
        if int(both[0]) == -int(both[1]):
            return
        ids = [self.index[m] for m in stack if m in self.index][:DEPTH]
        vec = torch.full((2, DEPTH), -2, dtype=torch.int64)
        vec[1] = 1 << 40                              # row 1 holds −id: its max is −(the smallest id)
        vec[0, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        vec[1, :len(ids)] = -torch.tensor(ids, dtype=torch.int64)
        all_reduce(vec, self.group.control(), op="max")
        common = None
        for hi, lo in zip(vec[0].tolist(), (-vec[1]).tolist()):
            if hi != lo or hi < 0:
                break
            common = self.mods[hi]
        where = self.names.get(common, "<none>") if common is not None else "<none>"
        raise Diverged(f"ZeRO-3: in the first forward the dp ranks called different modules (this rank: {what}) "
                       f"inside {where}", None if common is None or common is self.root else common)


def first_forward(s3, args, kwargs):
    """Stage 3's first forward (``s3``: its :class:`~.stage3.Stage3Params`), in lockstep over dp: when the ranks'
    gathers differ, the module whose code chose different children becomes a region and the forward runs again
    from the same RNG state and buffers. Afterwards the model's own forward is restored."""
    rng = torch.get_rng_state()
    bufs = [(b, b.detach().clone()) for b in s3.module.buffers()]
    fwd = s3._own_forward or (lambda *a, **k: type(s3.module).forward(s3.module, *a, **k))
    try:
        for _ in range(len(s3._lock.mods) + 1):
            try:
                out = fwd(*args, **kwargs)
                s3._lock.check(END, [], "its forward ended")
                return out
            except Diverged as d:
                if d.common is None or d.common in s3._retried:
                    s3._end_touch()
                    raise RuntimeError(f"{d}: the model's own code calls different parameter-holding modules "
                                       "on different dp ranks, so per-module gathers cannot be paired. Use "
                                       "zero.units: block, or zero.stage ≤ 2") from None
                _restart(s3, d.common, rng, bufs)
                s3._root_pre(s3.module, args)
        raise RuntimeError("ZeRO-3: the first forward kept diverging across dp ranks")
    finally:
        if s3._own_forward is None:
            s3.module.__dict__.pop("forward", None)
        else:
            s3.module.forward = s3._own_forward


def _restart(s3, region: nn.Module, rng, bufs) -> None:
    """Undo an interrupted first forward (every rank does the same): free every unit, forget the trace,
    the recorded calls and touches, restore RNG and buffers; ``region`` is gathered as one from now on."""
    s3._end_touch()
    if s3._done_calls is not None:
        s3._done_calls.remove()
        s3._done_calls = None
    for u in s3.units:
        u.users, u.bwd = 0, False
        s3._free(u)
    s3._stack, s3._pos_of = [], {}
    s3._pending, s3._retried = [region], s3._retried | {region}
    s3.restarts += 1
    torch.set_rng_state(rng)
    with torch.no_grad():
        for b, v in bufs:
            b.copy_(v)
    name = next(n for n, m in s3.module.named_modules() if m is region)
    s3.regions[name] = "calls different modules on different dp ranks (first forward)"
    s3.order = TracedOrder()
