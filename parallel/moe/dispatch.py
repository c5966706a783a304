"""Token → expert-slot bookkeeping shared by our MoE layer and the transformers adaptor.

For T tokens routed to experts ``idx`` [T, k] with weights ``w`` [T, k], the T·k assignments are
ranked choice-major and then by token (every token's first choice before any second choice:
GShard's priority, Lepikhin et al., arXiv 2006.16668, Algorithm 1); ``pos`` is an assignment's
position among those of its expert, and with C slots per expert the assignment is kept iff pos < C
(Switch's capacity, Fedus et al., arXiv 2101.03961, §2.2). The kept tokens are written to a
[E, C, h] buffer at (expert, pos) (:func:`dispatch`), the experts' outputs read back from the same
places and summed per token with their weights (:func:`combine`). :func:`run_experts` sends expert
block r of the buffer to ep rank r by all-to-all, runs the local experts on the ep·C slots each
received, and returns the outputs by the reverse all-to-all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parallel import comm
from parallel.comm import Group
from parallel.moe.all_to_all import all_to_all

__all__ = ["Slots", "plan_slots", "dispatch", "combine", "run_experts", "dropless_capacity"]


@dataclass
class Slots:
    tok: torch.Tensor       # kept assignments: token index
    expert: torch.Tensor    # … expert index
    pos: torch.Tensor       # … slot within the expert
    weight: torch.Tensor    # … routing weight
    load: torch.Tensor      # [E] assignments per expert before dropping
    capacity: int
    dropped: int


def dropless_capacity(load: torch.Tensor, group: Group | None) -> int:
    """The largest load of any expert on any rank of ``group`` (one all-reduce max, control traffic)."""
    c = load.max().reshape(1).clone()
    if group is not None and group.size > 1:
        comm.all_reduce(c, group.control(), op="max")
    return max(1, int(c.item()))


def plan_slots(idx: torch.Tensor, w: torch.Tensor, num_experts: int, capacity) -> Slots:
    """``capacity``: an int C, or a function load → C."""
    T, k = idx.shape
    e = idx.t().reshape(-1)                                    # choice-major
    tok = torch.arange(T, device=idx.device).repeat(k)
    wt = w.t().reshape(-1)
    onehot = F.one_hot(e, num_experts)
    pos = (onehot.cumsum(0) * onehot).sum(1) - 1
    load = onehot.sum(0)
    C = capacity(load) if callable(capacity) else int(capacity)
    kept = pos < C
    return Slots(tok[kept], e[kept], pos[kept], wt[kept], load, C, int(T * k - int(kept.sum())))


def dispatch(x: torch.Tensor, s: Slots, num_experts: int) -> torch.Tensor:
    """[T, h] tokens → [E, C, h] slots (empty slots zero)."""
    return x.new_zeros(num_experts, s.capacity, x.shape[-1]).index_put((s.expert, s.pos), x[s.tok])


def combine(out: torch.Tensor, s: Slots, tokens: int) -> torch.Tensor:
    """[E, C, h] expert outputs → [T, h]: y_t = Σ over t's kept assignments of weight · output."""
    vals = out[s.expert, s.pos] * s.weight.unsqueeze(1).to(out.dtype)
    return out.new_zeros(tokens, out.shape[-1]).index_add(0, s.tok, vals)


def run_experts(buf: torch.Tensor, local_fn, group: Group | None) -> torch.Tensor:
    """[E, C, h] slots of this rank's tokens → the experts' outputs, same layout. ``local_fn`` maps the
    [E/ep, n, h] slots of this rank's experts to their outputs."""
    ep = 1 if group is None else group.size
    if ep == 1:
        return local_fn(buf)
    E, C, h = buf.shape
    n = E // ep
    recv = all_to_all(buf, group)                              # [ep (source rank), n local experts, C, h]
    ye = local_fn(recv.view(ep, n, C, h).transpose(0, 1).reshape(n, ep * C, h))
    return all_to_all(ye.view(n, ep, C, h).transpose(0, 1).reshape(E, C, h), group)
