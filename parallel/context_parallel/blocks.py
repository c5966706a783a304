"""One block of attention — local queries against one rank's keys — forward with its log-sum-exp, the
online-softmax merge, and the block's backward. Shared by the ring (:mod:`.ring`).

Shapes: q (b, h, n_q, d); k, v (b, h_kv, n_k, d) with h = g·h_kv (grouped-query attention, Ainslie et
al., arXiv 2305.13245: query head i reads kv head ⌊i/g⌋), computed as (b, h_kv, g, n_q, ·) so K and V are
never repeated. ``mask`` (b or 1, n_q, n_k) is True where a query may attend a key. All arithmetic is fp32.

Forward of a block (S = q·kᵀ·scale, masked entries −∞):
    lse_blk = log Σ_k exp S_qk,   o_blk = softmax(S)·v  (0 and −∞ for a row with no visible key).
Merge (Milakov & Gimelshein, arXiv 1805.02867; Liu et al., ring attention, arXiv 2310.01889):
    lse = log(e^lse_a + e^lse_b),   o = e^(lse_a − lse)·o_a + e^(lse_b − lse)·o_b.
Backward of a block, given the final o, lse and dO, with D = rowsum(dO ∘ o) (Dao, FlashAttention-2,
arXiv 2307.08691, Alg. 2):
    P = exp(S − lse),  dV = Pᵀ·dO,  dS = P ∘ (dO·vᵀ − D),  dQ = dS·k·scale,  dK = dSᵀ·q·scale.

Rows are independent in all of it, so :func:`rows_forward` / :func:`rows_backward` run a block r query
rows at a time (dK, dV summed over the row chunks), r = min(ROWS, SCORE_ELEMS / (b·h·n_k)): each
score-sized temporary (S, P, dP, dS) then holds at most SCORE_ELEMS elements instead of b·h·n_q·n_k —
what a flash kernel's tiling bounds on a GPU — so the memory of a long block stays linear in the shard
(measured: benchmarks/bench_cp.py; 256 rows at n_k = 2048 cost the ring more than cp saved).
"""
from __future__ import annotations

import torch

__all__ = ["block_forward", "merge", "block_backward", "rows_forward", "rows_backward", "ROWS"]

ROWS = 256                   # at most this many query rows per chunk of a block's computation
SCORE_ELEMS = 1 << 18        # and at most this many elements (1 MiB fp32) per score-sized temporary


def _grouped(q: torch.Tensor, hk: int) -> torch.Tensor:
    b, h, n, d = q.shape
    if h % hk:
        raise ValueError(f"context parallel: {h} query heads are not a multiple of the {hk} key/value heads")
    return q.float().reshape(b, hk, h // hk, n, d)


def _scores(qg, k, mask, scale):
    s = torch.matmul(qg, k.float()[:, :, None].transpose(-1, -2)) * scale       # (b, hk, g, nq, nk)
    return s.masked_fill(~mask[:, None, None], float("-inf"))


def block_forward(q, k, v, mask, scale):
    """(o_blk (b, hk, g, n_q, d), lse_blk (b, hk, g, n_q)) of q against one key block, fp32."""
    qg = _grouped(q, k.shape[1])
    s = _scores(qg, k, mask, scale)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    lsum = p.sum(-1, keepdim=True)
    o = torch.matmul(p, v.float()[:, :, None]) / torch.where(lsum > 0, lsum, torch.ones_like(lsum))
    return o, (m + torch.log(lsum)).squeeze(-1)


def merge(o, lse, o_b, lse_b):
    """Online-softmax merge of two partial results over disjoint key sets."""
    new = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    return torch.exp(lse - safe)[..., None] * o + torch.exp(lse_b - safe)[..., None] * o_b, new


def block_backward(q, k, v, mask, scale, do_g, lse, delta):
    """(dq (b, h, n_q, d), dk, dv (b, hk, n_k, d)) of one block, fp32; ``do_g`` (b, hk, g, n_q, d),
    ``lse`` and ``delta`` (b, hk, g, n_q) are the final ones of these query rows."""
    qg = _grouped(q, k.shape[1])
    s = _scores(qg, k, mask, scale)
    p = torch.exp(s - lse[..., None])                                             # masked: exp(−∞) = 0
    dv = torch.matmul(p.transpose(-1, -2), do_g).sum(2)
    dp = torch.matmul(do_g, v.float()[:, :, None].transpose(-1, -2))
    ds = p * (dp - delta[..., None])
    dq = torch.matmul(ds, k.float()[:, :, None]) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qg).sum(2) * scale
    return dq.reshape(q.shape), dk, dv


def _rows_mask(mask, r: slice):
    """Rows ``r`` of ``mask``: a (b or 1, n_q, n_k) tensor, or a function of the row slice building them (so
    a long block's n_q × n_k mask never exists whole)."""
    return mask(r) if callable(mask) else mask[:, r]


def _chunks(q, k):
    n = q.shape[2]
    rows = max(1, min(ROWS, SCORE_ELEMS // max(1, q.shape[0] * q.shape[1] * k.shape[2])))
    return [slice(a, min(a + rows, n)) for a in range(0, n, rows)]


def rows_forward(q, k, v, mask, scale):
    """:func:`block_forward` a few query rows at a time (same result, bounded temporaries); ``mask``: a
    tensor or a function of the row slice (:func:`_rows_mask`)."""
    chunks = _chunks(q, k)
    if len(chunks) == 1:
        return block_forward(q, k, v, _rows_mask(mask, chunks[0]), scale)
    parts = [block_forward(q[:, :, r], k, v, _rows_mask(mask, r), scale) for r in chunks]
    return torch.cat([o for o, _ in parts], dim=-2), torch.cat([lse for _, lse in parts], dim=-1)


def rows_backward(q, k, v, mask, scale, do_g, lse, delta):
    """:func:`block_backward` a few query rows at a time: dq by rows, dk and dv summed."""
    chunks = _chunks(q, k)
    if len(chunks) == 1:
        return block_backward(q, k, v, _rows_mask(mask, chunks[0]), scale, do_g, lse, delta)
    dq, dk, dv = [], 0, 0
    for r in chunks:
        a, b, c = block_backward(q[:, :, r], k, v, _rows_mask(mask, r), scale, do_g[..., r, :], lse[..., r],
                                 delta[..., r])
        dq.append(a)
        dk, dv = dk + b, dv + c
    return torch.cat(dq, dim=2), dk, dv
