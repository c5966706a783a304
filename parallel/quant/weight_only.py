"""Weight-only int8 / int4 quantization with group-wise scales, for streamed inference.

A weight tensor W (any shape with ≥ 2 dims: Linear, Embedding, Conv weights) is read in its flat
(row-major) order and cut into groups of ``g`` consecutive elements — for a Linear weight [out, in]
with ``in % g == 0`` that is ``g`` consecutive input features of one output row, the layout of
GPTQ / AWQ / bitsandbytes' block-wise schemes (Frantar et al., arXiv 2210.17323; Lin et al., arXiv
2306.00978; Dettmers et al., arXiv 2110.02861 for the block-wise absmax). Each group j gets one
symmetric absmax scale

    s_j = max_i |w_ij| / Q,     q_ij = round(w_ij / s_j) ∈ [−Q, Q],     ŵ_ij = s_j · q_ij,

with Q = 127 (int8) or Q = 7 (int4). The round-off error per element is at most s_j / 2, so
|ŵ − w| ≤ max|w_group| / (2Q): 0.39 % of the group's largest magnitude for int8, 7.1 % for int4.
int4 values are stored offset by 8 (1 … 15) two per byte, the even element in the low nibble.
Scales are fp32. Tensors with fewer than 2 dims (biases, norm weights) stay fp32: they are a tiny
share of the bytes and quantizing a norm's gain shifts every activation that passes it.

The payload of a streamed unit: :mod:`parallel.quant.codec`.
"""
from __future__ import annotations

import torch

from parallel.quant.kernels import bf16_ceil

__all__ = ["quantize_groups", "dequantize_groups", "QMAX"]

QMAX = {8: 127, 4: 7}


def quantize_groups(w: torch.Tensor, bits: int, group: int,
                    bf16_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat ``w`` (n elements) → (codes uint8/int8, fp32 scales, one per group of ``group``; the last group
    zero-padded). int8: one int8 per element; int4: ceil(padded/2) uint8 bytes, offset-8 nibbles.
    ``bf16_scale``: each scale rounded up to a bf16 value (exact in the bf16 kernels of :mod:`.kernels`)."""
    q_max = QMAX[bits]
    x = w.detach().reshape(-1).float()
    n = x.numel()
    pad = -n % group
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    x = x.view(-1, group)
    scale = x.abs().amax(1) / q_max
    if bf16_scale:
        scale = bf16_ceil(scale)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe[:, None]).clamp_(-q_max, q_max).to(torch.int8).reshape(-1)
    if bits == 8:
        return q, scale
    u = (q + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_full((1,), 8)])
    return u[0::2] | (u[1::2] << 4), scale


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, bits: int, group: int, n: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`: the first ``n`` values of ŵ = s·q as fp32 (into ``out`` if given)."""
    ng = scale.numel()
    if bits == 8:
        q = codes.view(torch.int8)[:ng * group].view(ng, group)
    else:
        b = codes.view(torch.uint8)
        q = torch.stack([(b & 15), (b >> 4)], 1).reshape(-1)[:ng * group].view(ng, group).to(torch.int8) - 8
    if out is not None and n == ng * group:
        return torch.mul(q, scale[:, None], out=out.view(ng, group)).view(-1)
    full = q.float().mul_(scale[:, None]).reshape(-1)
    if out is None:
        return full[:n]
    out.copy_(full[:n])
    return out
