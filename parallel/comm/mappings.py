"""Megatron's conjugate operators as autograd functions.

f (identity forward, all-reduce backward) and g (all-reduce forward, identity backward) from
Megatron-LM (Shoeybi et al., arXiv 1909.08053, §3), and their sequence-parallel counterparts
(Korthikanti et al., arXiv 2205.05198, §4.2): g becomes reduce-scatter along the sequence dim,
its conjugate all-gather, moving the same bytes as the all-reduce they replace.

Every forward output that carries data (g, the sequence scatter) is a fresh tensor, never the
input or a view of it: a model's own in-place update of a block output (Falcon's
``mlp_output += attention_output``, Gemma's ``hidden *= normalizer``) is then legal under autograd,
and the input is never modified behind autograd's back. f returns its input unchanged (its output
only feeds the column-parallel matmul).
"""
from __future__ import annotations

import torch

from parallel.comm.collectives import Group, all_gather, all_reduce, reduce_scatter

__all__ = ["copy_to_group", "reduce_from_group", "scatter_to_seq", "gather_from_seq", "reduce_scatter_to_seq",
           "all_gather_to_seq"]


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that shares no storage with ``t`` (one copy either way)."""
    return t.clone(memory_format=torch.contiguous_format)


class _CopyToGroup(torch.autograd.Function):
    """f: identity forward, all-reduce of the gradient backward."""
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g.contiguous(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(_fresh(x), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToSeq(torch.autograd.Function):
    """Keep this rank's chunk of ``dim`` forward; all-gather the gradient backward."""
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _fresh(x.chunk(group.size, dim)[group.rank])

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, ctx.dim), None, None


class _GatherFromSeq(torch.autograd.Function):
    """All-gather along ``dim`` forward; keep this rank's chunk of the gradient backward."""
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(ctx.group.size, ctx.dim)[ctx.group.rank].contiguous(), None, None


class _ReduceScatterToSeq(torch.autograd.Function):
    """ḡ (sequence parallel): reduce-scatter along ``dim`` forward, all-gather backward."""
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, ctx.dim), None, None


class _AllGatherToSeq(torch.autograd.Function):
    """f̄ (sequence parallel): all-gather along ``dim`` forward, reduce-scatter backward."""
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter(g, ctx.group, ctx.dim), None, None


def copy_to_group(x, group: Group):
    return x if group.size == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x, group: Group):
    return x if group.size == 1 else _ReduceFromGroup.apply(x, group)


def scatter_to_seq(x, group: Group, dim: int = 1):
    return x if group.size == 1 else _ScatterToSeq.apply(x, group, dim)


def gather_from_seq(x, group: Group, dim: int = 1):
    return x if group.size == 1 else _GatherFromSeq.apply(x, group, dim)


def reduce_scatter_to_seq(x, group: Group, dim: int = 1):
    return x if group.size == 1 else _ReduceScatterToSeq.apply(x, group, dim)


def all_gather_to_seq(x, group: Group, dim: int = 1):
    return x if group.size == 1 else _AllGatherToSeq.apply(x, group, dim)
