"""Ulysses attention over the cp group (Jacobs et al., "DeepSpeed Ulysses", arXiv 2309.14509).

Each cp rank holds the zig-zag shard (:mod:`.layout`) of the sequence for all heads. An all-to-all
re-partitions q, k and v from sequence-sharded (b, h, s/cp, d) to head-sharded (b, h/cp, s, d): rank j
gets heads [j·h/cp, (j+1)·h/cp) of every token. Ordinary attention then runs on whole sequences
(torch's scaled_dot_product_attention: causal, or with the document mask of packed sequences), and a
fourth all-to-all brings the output back to sequence shards. The backward is the same four
all-to-alls in reverse (each all-to-all's gradient is the inverse all-to-all).

Grouped-query attention: the kv heads split over cp as they are when h_kv is a multiple of cp (rank j's
query heads read exactly rank j's kv heads, since query head i reads kv head ⌊i·h_kv/h⌋); otherwise each
kv head is repeated f = cp/gcd(h_kv, cp) times first (h_kv·f = lcm(h_kv, cp), which divides h).

Wire bytes per rank per layer (ring model, all-to-all of a local tensor of M bytes: (cp−1)/cp·M),
M_q = b·(s/cp)·h·d·bytes and M_kv = b·(s/cp)·h_kv'·d·bytes (h_kv' after the repeat):
    forward  (M_q + 2·M_kv + M_q)·(cp−1)/cp,   backward the same;
with h_kv' = h that is 4 all-to-alls of b·s·h·d/cp·(cp−1)/cp each way. Counted as "all_to_all" on cp.

Saved activations per rank: those of one process at s/cp tokens, plus one attention output
(b·(s/cp)·h·d elements: the head-sharded output attention keeps is not the tensor the output
projection keeps, unlike a flash kernel's) and the two (s,) int64 index orders.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.context_parallel.layout import check_seq, zigzag_index
from parallel.context_parallel.masks import Visibility

__all__ = ["ulysses_attention", "ulysses_wire_bytes", "seq_to_head", "head_to_seq"]

_SDPA = F.scaled_dot_product_attention          # the original, even while the cp dispatch replaces it


def ulysses_wire_bytes(b: int, s: int, h: int, h_kv: int, d: int, cp: int, elem: int = 4) -> dict:
    """Theory: bytes this rank sends per Ulysses call (one layer), forward and backward."""
    h_kv = h_kv * (cp // math.gcd(h_kv, cp))
    m = b * (s // cp) * d * elem * (2 * h + 2 * h_kv) * (cp - 1) / cp
    return {"forward": m, "backward": m}


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Chunk j of dim 0 to rank j; chunk j of the result from rank j. Counted on the group's axis."""
    x = x.contiguous()
    out = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    group.stats.record(group.axis, "all_to_all", nbytes, nbytes * (group.size - 1) / group.size)
    dist.all_to_all_single(out, x, group=group.pg)
    return out


def _s2h(x, group):
    b, h, n, d = x.shape
    cp = group.size
    y = _all_to_all(x.reshape(b, cp, h // cp, n, d).transpose(0, 1), group)          # (cp, b, h/cp, n, d)
    return y.permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * n, d)


def _h2s(y, group):
    b, hl, sn, d = y.shape
    cp = group.size
    x = _all_to_all(y.reshape(b, hl, cp, sn // cp, d).permute(2, 0, 1, 3, 4), group)  # (cp, b, h/cp, n, d)
    return x.transpose(0, 1).reshape(b, cp * hl, sn // cp, d)


class _Relayout(torch.autograd.Function):
    """``there(x)`` forward, its inverse ``back`` on the gradient: the two all-to-all re-layouts are each
    other's adjoint (a permutation of elements across ranks)."""

    @staticmethod
    def forward(ctx, x, group, there, back):
        ctx.group, ctx.back = group, back
        return there(x, group)

    @staticmethod
    def backward(ctx, g):
        return ctx.back(g, ctx.group), None, None, None


def seq_to_head(x, group):
    """(b, h, s/cp, d) sequence shard → (b, h/cp, s, d) head shard (tokens in rank order), differentiable."""
    return _Relayout.apply(x, group, _s2h, _h2s)


def head_to_seq(y, group):
    """The inverse of :func:`seq_to_head`, differentiable."""
    return _Relayout.apply(y, group, _h2s, _s2h)


def ulysses_attention(q, k, v, group, causal: bool = True, docs: torch.Tensor | None = None,
                      scale: float | None = None) -> torch.Tensor:
    """Attention of this rank's zig-zag shard ``q`` (b, h, s/cp, d) against the whole sequence, with K/V
    shards (b, h_kv, s/cp, d); ``docs`` (b, s) global document ids, a :class:`.masks.Visibility` or None.
    Returns (b, h, s/cp, d)."""
    cp = group.size
    b, h, n, d = q.shape
    hk = k.shape[1]
    if h % cp:
        raise ValueError(f"Ulysses attention: {h} attention heads (per tensor-parallel rank) are not divisible by "
                         f"parallel.cp={cp}: choose cp dividing the head count, or parallel.cp_algorithm=ring")
    if h % hk:
        raise ValueError(f"Ulysses attention: {h} query heads are not a multiple of the {hk} key/value heads")
    s = n * cp
    check_seq(s, cp)
    f = cp // math.gcd(hk, cp)
    if f > 1:
        k, v = k.repeat_interleave(f, dim=1), v.repeat_interleave(f, dim=1)
    order = torch.cat([zigzag_index(s, cp, j, q.device) for j in range(cp)])      # global index of each row
    nat = torch.argsort(order)
    qh, kh, vh = (seq_to_head(t, group).index_select(2, nat) for t in (q, k, v))
    mask, vis = None, Visibility.of(docs)
    if vis is not None:
        every = torch.arange(s, device=q.device)
        mask = vis.expand(b).block(every, every)
        if causal:
            mask = mask & torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        mask = mask[:, None]
    kw = {"enable_gqa": True} if kh.shape[1] != qh.shape[1] else {}
    o = _SDPA(qh, kh, vh, attn_mask=mask, is_causal=causal and mask is None, scale=scale, **kw)
    return head_to_seq(o.index_select(2, order), group)
