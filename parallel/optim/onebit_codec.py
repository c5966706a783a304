"""The 1-bit codec's primitives (Tang et al., arXiv 2102.02888): sign bits packed 8 per byte, unpacked by table,
the per-row compression ±‖row‖/√c and the decompressed mean, and the Adam-form update. Shared by the eager path of
:mod:`parallel.optim.onebit_adam` and the eager twins of :mod:`parallel.optim.onebit_kernels`."""
from __future__ import annotations

import math
import sys

import torch

__all__ = ["apply_step"]

_GATHER = 0x0102040810204080
"""Eight 0/1 bytes read as one little-endian int64 x = Σ_j b_j·2^(8j); x·_GATHER carries b_j to bit 56 + j
(the cross terms land below bit 56 or overflow past bit 63), so (x·_GATHER) >> 56 is the packed byte Σ b_j·2^j:
one multiply per 8 signs instead of a multiply and a reduction per sign."""
_SIGNS = torch.tensor([[-1.0 if b >> j & 1 else 1.0 for j in range(8)] for b in range(256)])
"""Row b: the ±1.0 of the 8 sign bits packed in byte b (bit j set: element j negative); one table lookup."""


def _pack(signs: torch.Tensor) -> torch.Tensor:
    """bool [..., 8k] → uint8 [..., k] (bit j of byte i = element 8i + j; the compressor packs sign bits)."""
    s = signs.contiguous().reshape(*signs.shape[:-1], -1, 8)
    if sys.byteorder != "little":                      # the int64 view below reads bytes little-endian
        return (s.to(torch.uint8) << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    x = s.view(torch.int64).squeeze(-1)
    return ((x * _GATHER) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., k] → ±1.0 float [..., 8k]."""
    return _SIGNS.index_select(0, packed.reshape(-1).long()).reshape(*packed.shape[:-1], -1)


def _compress(x: torch.Tensor):
    """Per row: (packed sign bits, scale ‖row‖/√c, the decompressed value ±scale). The sign is the float's
    sign bit (−0.0 counts as negative), the same in the packed bits and in ``copysign`` — so the worker's
    error e = x − C(x) is the error of exactly what travels. (``torch.where`` with a broadcast scale took
    8× the time of ``copysign`` here.)"""
    c = x.shape[-1]
    scale = (torch.linalg.vector_norm(x, dim=-1) / math.sqrt(c)).unsqueeze(-1)
    return _pack(torch.signbit(x)), scale.squeeze(-1), torch.copysign(scale, x)


def _decompressed_mean(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1/N)·Σ_i scale_i·signs_i over the N rows of ``packed``: the rows added in order (``mean(0)`` over a
    leading dim of 2 took 3× the time of the adds). Every stage uses this one function, so the sums agree."""
    u = _unpack(packed).mul_(scale.unsqueeze(-1))
    out = u[0].clone()
    for row in u[1:]:
        out.add_(row)
    return out.div_(u.shape[0])


def apply_step(p: torch.Tensor, m: torch.Tensor, denom: torch.Tensor, lr: float, c1: float,
               bound: float | None) -> None:
    """p ← p − η·clamp((m/c1)/denom, ±bound); bound None: p ← p − (η/c1)·m/denom (Adam's addcdiv, bit for bit)."""
    if bound is None:
        p.addcdiv_(m, denom, value=-lr / c1)
    else:
        p.add_(m.div(denom).div_(c1).clamp_(-bound, bound), alpha=-lr)
