"""The counted, differentiable all-to-all over the ep axis (token dispatch and combine).

``x`` of shape [ep·n, …] is cut into ep equal chunks along dim 0; chunk j goes to local rank j of the
group and the output's chunk i comes from local rank i (``torch.distributed.all_to_all_single``).
Its gradient is the same exchange applied to the output gradient (the all-to-all permutation is its
own inverse over the ranks). Counted in :class:`parallel.comm.CommStats` as ``("ep", "all_to_all")``:
payload M = bytes of ``x``, wire (ep−1)/ep·M (the chunk kept locally does not travel).

With capacity C slots per expert, E experts and hidden size h, dispatch moves M = E·C·h·b each way;
with C = T·k/E (capacity factor 1, T tokens, top-k) that is T·k·h·b, wire (ep−1)/ep·T·k·h·b — the
DeepSpeed-MoE / GShard figure (Lepikhin et al., arXiv 2006.16668, §2.2).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.comm import Group
from parallel.comm.collectives import _trace

__all__ = ["all_to_all"]


def _exchange(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group.size == 1:
        return x
    x = x.contiguous()
    nbytes = x.numel() * x.element_size()
    _trace(group, "all_to_all", x)
    group.stats.record(group.axis, "all_to_all", nbytes, (group.size - 1) * nbytes / group.size)
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group.pg)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, g):
        return _exchange(g, ctx.group), None


def all_to_all(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Exchange equal chunks of dim 0 of ``x`` over ``group`` (differentiable, counted)."""
    if x.shape[0] % group.size:
        raise ValueError(f"all_to_all on axis {group.axis!r}: dim 0 of size {x.shape[0]} does not split into "
                         f"{group.size} equal chunks")
    return _AllToAll.apply(x, group)
