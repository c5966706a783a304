"""Ring attention over the cp group (Liu, Zaharia & Abbeel, "Ring attention with blockwise transformers
for near-infinite context", arXiv 2310.01889), with the zig-zag split of :mod:`.layout`.

Each of the cp ranks holds n = s/cp queries and the keys/values of the same tokens. Forward, step
i = 0 … cp−1: rank r holds the K/V block of rank (r − i) mod cp, posts the send of that block to
r+1 and the receive of the next from r−1 (one batched isend/irecv on an explicit group, so the next
block's transfer overlaps this block's compute), computes its queries against the block
(:func:`.blocks.block_forward`) and folds the result into (o, lse) by the online-softmax merge.

Causal load balance: with the zig-zag split, a block from a rank src < r is seen by both of r's chunks
and only through its first chunk; from src > r only r's second chunk sees it, but wholly; src = r is
the causal diagonal. Each step therefore computes half a block's worth (one chunk pair of c = s/2cp
keys per query chunk) — the same on every rank — and skips the rest without computing it.

Backward is its own ring (a custom autograd.Function, no autograd through sends): K/V travel the ring
again, and the accumulator (dK, dV) of each block travels with it, visiting ranks r+1, …, r+cp−1 and
returning to its owner r, which adds its own diagonal share. Per rank per call, with M the bytes of
this rank's K (= of its V) — M = b·h_kv·(s/cp)·d·bytes:

    forward   K and V: (cp − 1)·M each                → 2(cp − 1)·M
    backward  K and V again, dK and dV: (cp − 1)·M each → 4(cp − 1)·M

(dK and dV are fp32 accumulators: with bf16 K/V they are 2M each, not M.)

counted as "send" on the cp axis (:class:`parallel.comm.CommStats`). Queries never move.

NCCL matches point-to-point messages by issue order per pair of ranks and ignores tags. Here every rank
runs the same loop, so per pair (r → r+1) the sends are issued K‖V(0), K‖V(1), acc(1), K‖V(2), acc(2), …
and r+1 posts its receives from r in that same order; the K‖V and dK‖dV messages have the same size in fp32,
so a mismatch would be silent. :func:`order_matched` sends every message with tag 0 (gloo then matches by
order alone, like NCCL) and records the issue order (tests/test_context_parallel_order.py: bitwise equal to
the tagged run at cp 2 and 4, and the j-th send r → p is the j-th receive of p from r). Nothing here reads a
tensor on the host: a CUDA ring runs without a host sync per block (benchmarks/gpu_check_cp.py checks it).

Blocks run on torch's fused attention kernels (:mod:`.fused`; flash / memory-efficient on CUDA, flash on CPU) or on
the fp32 row-chunked reference (:mod:`.blocks`), by :data:`FUSED` per device type (:func:`fused_blocks`); the
merge, the ring and the FlashAttention-2 backward given the final (out, lse) are the same for both.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from parallel.context_parallel.blocks import merge, rows_backward, rows_forward
from parallel.context_parallel.fused import fused_backward, fused_forward, supported
from parallel.context_parallel.layout import check_seq, zigzag_index
from parallel.context_parallel.masks import Visibility

__all__ = ["ring_attention", "ring_wire_bytes", "order_matched", "fused_blocks", "FUSED"]

_KV_TAG, _ACC_TAG = 71, 72
_ORDER: dict = {"tags": True, "log": None}
# Which block path the ring takes, by device type: True = torch's fused attention kernels (:mod:`.fused`, where
# :func:`.fused.supported`; the reference otherwise), False = the fp32 row-chunked reference (:mod:`.blocks`). Both
# default to fused: on CPU, torch's flash kernel measured 3–44× faster than the reference blocks (forward +
# backward at cp = 1, loaded, benchmarks/bench_cp_blocks.py; docs/context_parallel.md), equal within 6.2e-6 (fp32).
FUSED: dict = {"cuda": True, "cpu": True}


@contextlib.contextmanager
def fused_blocks(on: bool = True, device_type: str | None = None):
    """While inside: the ring's blocks take the fused kernels (``on``) or the reference path, on ``device_type``
    (default: every device type)."""
    old = dict(FUSED)
    FUSED.update({t: on for t in ([device_type] if device_type else ["cuda", "cpu"])})
    try:
        yield
    finally:
        FUSED.clear()
        FUSED.update(old)


def _fused(q: torch.Tensor) -> bool:
    return bool(FUSED.get(q.device.type, False)) and supported(q) is None


@contextlib.contextmanager
def order_matched(log: list | None = None):
    """While inside: every ring message goes with tag 0, so gloo matches them by issue order per pair of ranks
    alone, as NCCL does; ``log`` (a list) gets ("send" | "recv", peer's global rank, "kv" | "acc", bytes) of each
    message in issue order."""
    old = dict(_ORDER)
    _ORDER.update(tags=False, log=log)
    try:
        yield log
    finally:
        _ORDER.update(old)


def ring_wire_bytes(b: int, s: int, h_kv: int, d: int, cp: int, elem: int = 4) -> dict:
    """Theory: bytes this rank sends per ring-attention call (one layer), forward and backward
    (``elem`` bytes per K/V element; the dK, dV accumulators always travel in fp32)."""
    m = b * h_kv * (s // cp) * d
    return {"forward": 2 * (cp - 1) * m * elem, "backward": 2 * (cp - 1) * m * (elem + 4)}


class _Pass:
    """Send ``t`` to the next rank of the ring and receive a tensor like it from the previous one."""

    def __init__(self, t: torch.Tensor, group, tag: int):
        r, n = group.rank, group.size
        t = t.contiguous()
        self.out = torch.empty_like(t)
        nbytes, nxt, prv = t.numel() * t.element_size(), group.ranks[(r + 1) % n], group.ranks[(r - 1) % n]
        group.stats.record(group.axis, "send", nbytes, nbytes)
        if _ORDER["log"] is not None:
            kind = "kv" if tag == _KV_TAG else "acc"
            _ORDER["log"] += [("send", nxt, kind, nbytes), ("recv", prv, kind, nbytes)]
        tag = tag if _ORDER["tags"] else 0
        ops = [dist.P2POp(dist.isend, t, nxt, group.pg, tag), dist.P2POp(dist.irecv, self.out, prv, group.pg, tag)]
        self.works, self.keep = dist.batch_isend_irecv(ops), t

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        self.keep = None
        return self.out


def _selection(s, cp, r, src, causal, docs, device):
    """(query slice, key slice, mask, kind) of the visible part of block ``src`` for rank ``r``'s queries,
    or None when none of it is visible. Slices are over the two chunks (c tokens each) of each side; the
    mask is a function of a slice of the query rows (built a few rows at a time, :mod:`.blocks`). ``docs``:
    a :class:`.masks.Visibility` or None; a chunk pair wholly outside its sliding window is skipped. ``kind`` (for
    the fused kernels, :mod:`.fused`): "causal" on the diagonal block without ``docs`` (q and k are the same
    tokens in the same order: the mask is the lower triangle), "full" when every pair is visible (the other
    blocks of a causal zig-zag ring without ``docs``, all of a non-causal one), "masked" otherwise."""
    n = s // cp
    c = n // 2
    gq, gk = zigzag_index(s, cp, r, device), zigzag_index(s, cp, src, device)
    qc, kc = (r, 2 * cp - 1 - r), (src, 2 * cp - 1 - src)          # global chunk numbers, zig-zag
    W = docs.window if docs is not None else None
    vis = [[(not causal or qc[qi] >= kc[ki]) and (W is None or qc[qi] * c - (kc[ki] * c + c - 1) < W)
            for ki in (0, 1)] for qi in (0, 1)]
    rows = [qi for qi in (0, 1) if any(vis[qi])]
    cols = [ki for ki in (0, 1) if any(vis[qi][ki] for qi in (0, 1))]
    if not rows:
        return None
    qs, ks = slice(rows[0] * c, (rows[-1] + 1) * c), slice(cols[0] * c, (cols[-1] + 1) * c)
    gq, gk = gq[qs], gk[ks]

    def mask(rs: slice):
        q = gq[rs]
        m = (q[:, None] >= gk[None, :])[None] if causal else torch.ones(1, len(q), len(gk), dtype=torch.bool,
                                                                         device=device)
        extra = docs.block(q, gk) if docs is not None else None
        return m & extra if extra is not None else m
    kind = "masked" if docs is not None else ("causal" if causal and src == r else "full")
    return qs, ks, mask, kind


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, s, causal, docs, scale):
        b, h, n, d = q.shape
        hk, cp, r = k.shape[1], group.size, group.rank
        o = torch.zeros(b, hk, h // hk, n, d, dtype=torch.float32, device=q.device)
        lse = torch.full((b, hk, h // hk, n), float("-inf"), dtype=torch.float32, device=q.device)
        kv, fused = torch.stack([k, v]), _fused(q)
        for i in range(cp):
            nxt = _Pass(kv, group, _KV_TAG) if i < cp - 1 else None
            sel = _selection(s, cp, r, (r - i) % cp, causal, docs, q.device)
            if sel is not None:
                qs, ks, mask, kind = sel
                if fused:
                    ob, lb = fused_forward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], kind, mask, scale)
                else:
                    ob, lb = rows_forward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], mask, scale)
                if i == 0 and qs == slice(0, n):      # the diagonal block first: merging into the empty (0, −∞)
                    o, lse = ob, lb                    # accumulator is the identity, bitwise (e^0 = 1, e^−∞·0 = 0)
                else:
                    o[:, :, :, qs], lse[:, :, :, qs] = merge(o[:, :, :, qs], lse[:, :, :, qs], ob, lb)
            if nxt is not None:
                kv = nxt.wait()
        # (b, n, h, d) in memory, returned as its (b, h, n, d) transpose, as torch's flash attention does: the
        # model's usual out.transpose(1, 2).reshape(b, n, h·d) is then a view, and saving it keeps no copy
        out = o.permute(0, 3, 1, 2, 4).contiguous().view(b, n, h, d).to(q.dtype).transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.s, ctx.causal, ctx.docs, ctx.scale, ctx.fused = group, s, causal, docs, scale, fused
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, s, causal, docs, scale = ctx.group, ctx.s, ctx.causal, ctx.docs, ctx.scale
        cp, r, hk = group.size, group.rank, k.shape[1]
        b, h, n, d = q.shape
        if ctx.fused:
            dout, lse_h = dout.to(q.dtype), lse.reshape(b, h, n)
        else:
            do_g = dout.float().reshape(b, hk, h // hk, n, d)
            delta = (do_g * out.float().reshape(b, hk, h // hk, n, d)).sum(-1)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        own = torch.zeros((2,) + tuple(k.shape), dtype=torch.float32, device=q.device)   # own dK, dV
        kv, acc, acc_pass = torch.stack([k, v]), None, None
        for i in range(cp):
            nxt = _Pass(kv, group, _KV_TAG) if i < cp - 1 else None
            if i == 0:
                acc = own
            elif acc_pass is not None:
                acc = acc_pass.wait()
            else:
                acc = torch.zeros_like(own)
            sel = _selection(s, cp, r, (r - i) % cp, causal, docs, q.device)
            if sel is not None:
                qs, ks, mask, kind = sel
                if ctx.fused:
                    dqb, dkb, dvb = fused_backward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], kind, mask, scale,
                                                   dout[:, :, qs], out[:, :, qs], lse_h[:, :, qs])
                else:
                    dqb, dkb, dvb = rows_backward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], mask, scale,
                                                   do_g[:, :, :, qs], lse[:, :, :, qs], delta[:, :, :, qs])
                dq[:, :, qs] += dqb
                acc[0][:, :, ks] += dkb
                acc[1][:, :, ks] += dvb
            if i > 0:
                acc_pass = _Pass(acc, group, _ACC_TAG)    # on to the next rank; after step cp−1: to the owner
            if nxt is not None:
                kv = nxt.wait()
        if acc_pass is not None:
            own = own + acc_pass.wait()
        hk_shape = (q.shape[0], hk) + tuple(k.shape[2:])
        return (dq.to(q.dtype), own[0].reshape(hk_shape).to(k.dtype), own[1].reshape(hk_shape).to(v.dtype),
                None, None, None, None, None)


def ring_attention(q, k, v, group, causal: bool = True, docs: torch.Tensor | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """Attention of this rank's zig-zag shard ``q`` (b, h, s/cp, d) against the whole sequence, whose
    K/V shards (b, h_kv, s/cp, d) the cp ``group`` holds; ``docs`` (b, s): global document ids (packed
    sequences), or a :class:`.masks.Visibility` (documents, sliding window, dense mask), or None. Returns
    (b, h, s/cp, d)."""
    n = q.shape[2]
    if k.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"ring attention: queries ({n}) and keys/values ({k.shape[2]}, {v.shape[2]}) must be the "
                         f"same tokens (self-attention over the sequence shard)")
    s = n * group.size
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_seq(s, group.size)
    vis = Visibility.of(docs)
    return _RingAttention.apply(q, k, v, group, s, causal, vis.expand(q.shape[0]) if vis else None, scale)
