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

:class:`UnitCodec` packs the parameters of one streaming unit (a flat fp32 vector holding each
parameter at its offset, :class:`parallel.data_parallel.bucket.FlatBucket`) into one uint8 payload

    [ quantized bytes of every ≥2-D parameter | their fp32 scales | the < 2-D parameters, fp32 ]

(each part padded to 16 bytes) and decodes a payload back into a flat fp32 vector. Bytes per
element of a quantized weight: 1 + 4/g (int8) and 0.5 + 4/g (int4) instead of 4.
"""
from __future__ import annotations

import math

import torch

__all__ = ["UnitCodec", "quantize_groups", "dequantize_groups", "QMAX"]

QMAX = {8: 127, 4: 7}


def _align(n: int, a: int = 16) -> int:
    return -(-n // a) * a


def quantize_groups(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat ``w`` (n elements) → (codes uint8/int8, fp32 scales, one per group of ``group``; the last group
    zero-padded). int8: one int8 per element; int4: ceil(padded/2) uint8 bytes, offset-8 nibbles."""
    q_max = QMAX[bits]
    x = w.detach().reshape(-1).float()
    n = x.numel()
    pad = -n % group
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    x = x.view(-1, group)
    scale = x.abs().amax(1) / q_max
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


class UnitCodec:
    """Encode / decode one unit's flat fp32 vector. ``shapes`` and ``offsets``: its parameters' shapes and
    flat offsets (a FlatBucket's); ``bits`` ∈ {8, 4}; ``group`` elements per scale (even for int4)."""

    def __init__(self, shapes, offsets, numel: int, bits: int = 8, group: int = 64):
        if bits not in QMAX:
            raise ValueError(f"weight-only quantization supports 8 or 4 bits, got {bits}: "
                             f"use quantize='int8' or 'int4'")
        if group < 2 or group % 2:
            raise ValueError(f"quantization group size must be an even number ≥ 2, got {group}")
        self.bits, self.group, self.numel = bits, group, numel
        self.parts = []                        # (offset, n, quantized?, code byte offset, scale offset, raw offset)
        code_b = scale_n = raw_n = 0
        for shape, off in zip(shapes, offsets):
            n = math.prod(shape)
            if len(shape) >= 2 and n > 0:
                ng = -(-n // group)
                self.parts.append((off, n, True, code_b, scale_n, ng))
                code_b += ng * group * bits // 8
                scale_n += ng
            else:
                self.parts.append((off, n, False, raw_n, 0, 0))
                raw_n += n
        self.code_bytes, self.scale_count, self.raw_count = code_b, scale_n, raw_n
        self.scale_at = _align(code_b)
        self.raw_at = _align(self.scale_at + 4 * scale_n)
        self.nbytes = _align(self.raw_at + 4 * raw_n)
        self.quantized_elements = sum(p[1] for p in self.parts if p[2])

    def encode(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat fp32 unit → uint8 payload of ``self.nbytes``."""
        out = torch.zeros(self.nbytes, dtype=torch.uint8)
        codes = out[:self.code_bytes]
        scales = out[self.scale_at:self.scale_at + 4 * self.scale_count].view(torch.float32)
        raw = out[self.raw_at:self.raw_at + 4 * self.raw_count].view(torch.float32)
        for off, n, quant, a, b, ng in self.parts:
            w = flat[off:off + n].float()
            if quant:
                c, s = quantize_groups(w, self.bits, self.group)
                codes[a:a + c.numel()] = c.view(torch.uint8)
                scales[b:b + ng] = s
            else:
                raw[a:a + n] = w
        return out

    def decode(self, payload: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """uint8 payload → ``out`` (fp32, ≥ numel elements; its first numel are written)."""
        codes = payload[:self.code_bytes]
        scales = payload[self.scale_at:self.scale_at + 4 * self.scale_count].view(torch.float32)
        raw = payload[self.raw_at:self.raw_at + 4 * self.raw_count].view(torch.float32)
        per_byte = 8 // self.bits
        for off, n, quant, a, b, ng in self.parts:
            dst = out[off:off + n]
            if quant:
                nb = ng * self.group // per_byte
                dequantize_groups(codes[a:a + nb], scales[b:b + ng], self.bits, self.group, n, out=dst)
            else:
                dst.copy_(raw[a:a + n])
        return out[:self.numel]
