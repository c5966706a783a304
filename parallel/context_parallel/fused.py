"""Ring-attention blocks through torch's fused attention kernels (the path of torch's own context parallel and of
ring-flash-attention): one kernel launch per block and direction instead of the row-chunked fp32 matmuls of
:mod:`.blocks`, which stay the reference (and the path where no kernel fits).

Forward of a block returns (o_blk, lse_blk) exactly as :func:`.blocks.block_forward` does, merged by the same
online-softmax :func:`.blocks.merge` in fp32. Backward of a block is FlashAttention-2's (Dao, arXiv 2307.08691,
Alg. 2) given the FINAL out and lse of the query rows: the kernels' backward computes D = rowsum(dO ∘ out) and
P = exp(S − lse) itself, so with the final (out, lse) each block's (dQ, dK, dV) is its exact share of the whole
gradient (the same decomposition as :func:`.blocks.block_backward`).

Kernels (torch.ops.aten, present in torch 2.11 … 2.13):
* CPU: ``_scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``): is_causal and a float attn_mask;
  lse (b, h, n_q);
* CUDA, bf16/fp16 without a mask: ``_scaled_dot_product_flash_attention`` (+ ``_backward``), is_causal only;
  lse (b, h, n_q);
* CUDA otherwise (fp32, or a mask): ``_scaled_dot_product_efficient_attention`` (+ ``_backward``), the mask as
  an additive −∞ bias (last dim padded to 16 elements for the kernel's alignment); lse (b, h, ⌈n_q/32⌉·32).

Block kinds (:func:`.ring._selection`): "causal" — the zig-zag diagonal block, q and k the same tokens in the same
order, so the mask is the plain lower triangle (is_causal); "full" — every pair visible; "masked" — documents,
windows or a dense mask: the bias path, run ≤ BIAS_ELEMS bias elements at a time (query-row chunks, dK and dV
summed), and a row with no visible key gets lse = −∞ and o = 0 (the kernels return 0 or NaN there). In the
backward such rows get lse = +∞ (P = 0): the kernel then adds nothing for them.

GQA: k and v are repeated to the h query heads for the kernel (query head i reads kv head ⌊i/g⌋) and dK, dV are
summed back over each group of g.
"""
from __future__ import annotations

import torch

__all__ = ["fused_forward", "fused_backward", "supported", "BIAS_ELEMS"]

aten = torch.ops.aten
BIAS_ELEMS = 1 << 24          # at most this many (b·n_q·n_k) elements of a masked block's bias per kernel call


def supported(q: torch.Tensor) -> str | None:
    """Why the fused kernels cannot run ``q``'s block (None when they can)."""
    if q.device.type not in ("cpu", "cuda"):
        return f"no fused attention kernel on {q.device.type}"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype}"
    if q.device.type == "cuda" and (q.shape[-1] % 8 or q.shape[-1] > 256):
        return f"head dim {q.shape[-1]} (the CUDA kernels need a multiple of 8, at most 256)"
    return None


def _heads(k: torch.Tensor, h: int) -> torch.Tensor:
    b, hk, n, d = k.shape
    return k if hk == h else k[:, :, None].expand(b, hk, h // hk, n, d).reshape(b, h, n, d)


def _fold(t: torch.Tensor, hk: int) -> torch.Tensor:
    """(b, h, n, d) gradient of repeated heads → (b, hk, n, d), summed over each group, fp32."""
    b, h, n, d = t.shape
    return t.float() if h == hk else t.float().reshape(b, hk, h // hk, n, d).sum(2)


def _bias(allow: torch.Tensor, q: torch.Tensor, cuda: bool) -> torch.Tensor:
    """Additive bias (b, h, n_q, n_k) in q's dtype (a stride-0 view over heads) from (b or 1, n_q, n_k) bool."""
    bb, nq, nk = allow.shape
    pad = -(-nk // 16) * 16 if cuda else nk
    z = torch.zeros(bb, 1, nq, pad, dtype=q.dtype, device=q.device)[..., :nk]
    z.masked_fill_(~allow[:, None], float("-inf"))
    return z.expand(q.shape[0], q.shape[1], nq, nk)


def _chunks(q, nk, masked):
    n = q.shape[2]
    rows = max(1, BIAS_ELEMS // max(1, q.shape[0] * nk)) if masked else n
    return [slice(a, min(a + rows, n)) for a in range(0, n, rows)]


def _fwd(q, k, v, kind, bias, scale):
    """(out (b, h, n_q, d) in q's dtype, lse (b, h, n_q) fp32) of one kernel call."""
    causal = kind == "causal"
    if q.device.type == "cpu":
        o, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return o, lse
    if bias is None and q.dtype != torch.float32:
        o, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        return o, lse
    o, lse = aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scale)[:2]
    return o, lse[..., :q.shape[2]]


def fused_forward(q, k, v, kind: str, mask, scale: float):
    """(o_blk (b, hk, g, n_q, d), lse_blk (b, hk, g, n_q)), fp32, as :func:`.blocks.block_forward`; ``kind``
    "causal" | "full" | "masked"; ``mask``: for "masked", a function of a query-row slice giving the (b or 1,
    rows, n_k) bool visibility (:func:`.ring._selection`)."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    k, v = _heads(k, h), _heads(v, h)
    masked = kind == "masked"
    outs, lses = [], []
    for r in _chunks(q, k.shape[2], masked):
        qr = q[:, :, r]
        allow = mask(r) if masked else None
        bias = _bias(allow, qr, q.device.type == "cuda") if masked else None
        o, lse = _fwd(qr, k, v, kind, bias, scale)
        o, lse = o.float(), lse.float()
        if masked:                                            # rows that see no key: lse −∞, o 0
            seen = allow.any(-1)[:, None].expand(b, h, -1)
            lse = torch.where(seen, lse, float("-inf"))
            o = torch.where(seen[..., None], o, 0.0)
        outs.append(o)
        lses.append(lse)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, 2)
    return o.reshape(b, hk, h // hk, n, d), lse.reshape(b, hk, h // hk, n)


def _bwd(dout, q, k, v, out, lse, kind, bias, scale):
    causal = kind == "causal"
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal,
                                                                         attn_mask=bias, scale=scale)
    flash = bias is None and q.dtype != torch.float32
    cq, ck, seed, off = _extras(q, k, v, flash)
    if flash:
        return aten._scaled_dot_product_flash_attention_backward(dout, q, k, v, out, lse, cq, ck, q.shape[2],
                                                                 k.shape[2], 0.0, causal, seed, off, scale=scale)
    n = q.shape[2]
    pad = -(-n // 32) * 32                                     # the forward's lse rows, padded to 32
    lse_p = torch.zeros(lse.shape[:-1] + (pad,), dtype=torch.float32, device=q.device)
    lse_p[..., :n] = lse
    g = aten._scaled_dot_product_efficient_attention_backward(dout, q, k, v, bias, out, lse_p, seed, off, 0.0,
                                                              [True, True, True, False], causal, scale=scale)
    return g[0], g[1], g[2]


_EXTRAS: dict = {}


def _extras(q, k, v, flash: bool):
    """The forward's bookkeeping outputs that the CUDA backward ops take as arguments — sequence offsets (none:
    not varlen) and the RNG state (unused at dropout 0) — from one call on one query row, once per device, kernel
    and dtype."""
    key = (q.device, flash, q.dtype)
    if key not in _EXTRAS:
        q1, k1, v1 = q[:1, :1, :1], k[:1, :1], v[:1, :1]
        if flash:
            r = aten._scaled_dot_product_flash_attention(q1, k1, v1, 0.0, False, False)
            _EXTRAS[key] = (r[2], r[3], r[6], r[7])
        else:
            r = aten._scaled_dot_product_efficient_attention(q1, k1, v1, None, False, 0.0, False)
            _EXTRAS[key] = (None, None, r[2], r[3])
    return _EXTRAS[key]


def fused_backward(q, k, v, kind: str, mask, scale: float, dout, out, lse):
    """(dq (b, h, n_q, d), dk, dv (b, hk, n_k, d)), fp32, of one block given the FINAL ``out`` (b, h, n_q, d)
    in q's dtype, ``lse`` (b, h, n_q) fp32 of these query rows and ``dout`` (b, h, n_q, d) in q's dtype."""
    h, hk = q.shape[1], k.shape[1]
    kx, vx = _heads(k, h), _heads(v, h)
    masked = kind == "masked"
    lse = torch.where(torch.isfinite(lse), lse, float("inf")).contiguous()  # a row that saw nothing: P = 0
    dqs, dk, dv = [], 0, 0
    for r in _chunks(q, k.shape[2], masked):
        qr = q[:, :, r]
        bias = _bias(mask(r), qr, q.device.type == "cuda") if masked else None
        do_r = dout[:, :, r] if dout.stride(-1) == 1 else dout[:, :, r].contiguous()
        a, bk, bv = _bwd(do_r, qr, kx, vx, out[:, :, r], lse[:, :, r].contiguous(), kind, bias, scale)
        dqs.append(a.float())
        dk, dv = dk + _fold(bk, hk), dv + _fold(bv, hk)
    return (dqs[0] if len(dqs) == 1 else torch.cat(dqs, 2)), dk, dv
