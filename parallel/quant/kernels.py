"""Linear layers computed on the quantized weights (no fp32 copy of the weight is ever made).

torch's CPU weight-only kernels (torch 2.13; the ops torchao's int8/int4 weight-only layouts call):

* ``torch._weight_int8pack_mm(x, W_q, s)``: x [M, K], W_q int8 [N, K], s [N] (one scale per output
  channel), y = x · (s ⊙ W_q)ᵀ;  K % 16 = 0 (other K crash the process on this CPU: refused here).
* ``torch._weight_int4pack_mm_for_cpu(x, P, g, sz)``: P = ``torch._convert_weight_to_int4pack_for_cpu(U,
  2)`` of U int32 [N, K] with values 0 … 15 ([N, K/2] uint8, the CPU's blocked layout), sz [K/g, N, 2]
  holding (scale, zero) per group of g input features, ŵ = (U − 8)·scale + zero;  N % 16 = 0, K % g = 0,
  g ∈ {32, 64, 128, 256}.

With fp32 activations both kernels take a scalar path here: 19× (int8) and 54× (int4) slower than the
fp32 matmul at M=16, K=1024, N=4096 on one thread; with bf16 activations (AMX / AVX-512-BF16) they run
at 0.86× (int8) and 0.81× of its time. So a quantized Linear computes

    y = fp32( kernel( bf16(x), W_q, bf16(s) ) ) + b          (bias b fp32)

The weights are exactly those of :mod:`parallel.quant.weight_only` — symmetric, ŵ = s·q (int4: zero =
0, U = q + 8) — with each scale rounded UP to a bf16 value (so the kernel's bf16 scale is exact, q stays
in [−Q, Q], and |ŵ − w| ≤ s/2 ≤ (1 + 2⁻⁷)·max|w_group| / (2Q)). int8 Linear weights take one scale per
output channel (the int8 kernel has no groups: group = K), int4 Linear weights g-wide groups along K. The
only difference from F.linear(x, ŵ) is the bf16 rounding of x and of y (relative 2⁻⁹ each) and the
kernel's summation order; ``tests/test_quant_infer.py`` states the tolerances.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["bf16_ceil", "linear_fits", "pack_int4", "int4_scales_zeros", "QuantLinear", "INT4_GROUPS"]

INT4_GROUPS = (32, 64, 128, 256)


def bf16_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest bf16-representable value ≥ s (s ≥ 0, finite fp32), as fp32."""
    bits = s.float().contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


def linear_fits(mod: nn.Module, bits: int, group: int) -> bool:
    """Can ``mod``'s weight be computed by the kernel (CPU, nn.Linear, shapes the kernel takes)?"""
    if type(mod) is not nn.Linear or mod.weight.dim() != 2:
        return False
    n, k = mod.weight.shape
    if bits == 8:
        return n > 0 and k > 0 and k % 16 == 0
    return n % 16 == 0 and n > 0 and group in INT4_GROUPS and k % group == 0


def pack_int4(codes: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Our int4 codes of an [n, k] weight (offset-8 nibbles, two per byte, even element low) → the CPU
    kernel's packed [n, k/2] uint8."""
    b = codes.view(torch.uint8)[:n * k // 2]
    u = torch.stack([(b & 15), (b >> 4)], 1).reshape(n, k).to(torch.int32)
    return torch._convert_weight_to_int4pack_for_cpu(u, 2)


def int4_scales_zeros(scale: torch.Tensor, n: int, k: int, group: int) -> torch.Tensor:
    """Row-major group scales [n · k/g] → the kernel's (scale, zero = 0) [k/g, n, 2] in bf16."""
    s = scale.view(n, k // group).t()
    return torch.stack([s, torch.zeros_like(s)], 2).to(torch.bfloat16).contiguous()


class QuantLinear:
    """Replaces an nn.Linear's forward while installed; :meth:`bind` hands it the packed weight (views of
    the unit's payload) before the forward and :meth:`unbind` after."""

    def __init__(self, mod: nn.Linear, bits: int, group: int):
        self.mod, self.bits, self.group = mod, bits, group
        self.n, self.k = mod.weight.shape
        self.w = self.s = None
        mod.forward = self.forward                  # an instance attribute: hooks still run around it

    def bind(self, w: torch.Tensor, s: torch.Tensor) -> None:
        self.w, self.s = w, s

    def unbind(self) -> None:
        self.w = self.s = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w is None:
            raise RuntimeError(f"quantized Linear [{self.n}, {self.k}] called outside its unit's fetch: the "
                               f"streamed model's forward must run through StreamedInference")
        xb = x.reshape(-1, self.k).to(torch.bfloat16).contiguous()
        if self.bits == 8:
            y = torch._weight_int8pack_mm(xb, self.w, self.s)
        else:
            y = torch._weight_int4pack_mm_for_cpu(xb, self.w, self.group, self.s)
        y = y.float().view(*x.shape[:-1], self.n)
        b = self.mod.bias
        return y if b is None or b.numel() == 0 else y + b

    def remove(self) -> None:
        self.mod.__dict__.pop("forward", None)


def reference_linear(x: torch.Tensor, w_hat: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """What :class:`QuantLinear` computes, in fp32 arithmetic: bf16-rounded input and output."""
    y = F.linear(x.to(torch.bfloat16).float(), w_hat).to(torch.bfloat16).float()
    return y if b is None else y + b


def install_kernels(model: nn.Module, bits: int, group: int) -> dict:
    """{weight parameter: :class:`QuantLinear`} for every nn.Linear of ``model`` the kernels take whose weight
    no other module holds (a weight tied to an embedding is read whole by that module: group form)."""
    users: dict = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                users[p] = users.get(p, 0) + 1
    return {mod.weight: QuantLinear(mod, bits, group) for mod in model.modules()
            if linear_fits(mod, bits, group) and users[mod.weight] == 1}
