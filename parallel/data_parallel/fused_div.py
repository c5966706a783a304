"""The data-parallel mean taken while each gradient is copied into its bucket (issue 18).

Data parallelism averages, g = (1/N) Σ_r g_r (:mod:`parallel.data_parallel.reducer`); an all-reduce of fp32 or
low-precision gradients divides before it. With ``zero_grad`` setting ``p.grad = None``, autograd hands each
parameter a fresh gradient that the hook copies into the bucket view (read 4, write 4 bytes per element), and the
bucket was then divided in place (read 4, write 4 more). ``torch.div(grad, N, out=view)`` does both in one pass, as
torch DDP's ``gradient_as_bucket_view`` copies with ``mul_out`` (Li et al., arXiv 2006.15704, §3.2), 8 bytes per
element less. It rounds exactly as the copy followed by ``div_`` (the same IEEE division of the same fp32 value:
bitwise equal for any N, tests/test_reducer_fused_div.py). It applies to a parameter's first gradient of a step of
one micro-batch only; an accumulated gradient (m > 1, ``no_sync``, a gradient already living in its view) is summed
first and divided once at launch, as before. A bucket whose parameters were divided on the way in is not divided
again at launch; a mixed bucket divides only the rest.

ZeRO-1/2 (reduce-scatter of fp32 gradients) divide the reduced shard after the collective, Ψ/N elements
(:mod:`parallel.data_parallel.reducer`); for N a power of two the division is exact (a change of exponent), so
Σ_r (g_r/N) = (Σ_r g_r)/N bit for bit unless an element is subnormal, and they too divide on the way in: one pass
over the shard less. For other N they keep the division after the reduction (it would round differently).
ZeRO-3 is left out: fused into its region buckets (reduced in finish, ``b.at_finish``) the losses of
tests/test_zero_lockstep.py and tests/test_zero_fanout.py moved by 2e-4 relative — a cause not found yet — and its
default path reduces straight from ``p.grad`` without a copy anyway.
"""
from __future__ import annotations

import torch

__all__ = ["copy_in", "divide_rest", "fused_div"]


def fused_div(r, b, i: int, grad: torch.Tensor) -> int:
    """N when reducer ``r`` may divide parameter ``i`` of bucket ``b``'s first gradient ``grad`` as it copies it
    (module docstring), else 0. ``r.fuse_div = False`` restores the copy-then-divide path (benchmarks/proto_pair.py's
    ``:unfused`` row)."""
    if (not r.fuse_div or r.expected != 1 or not r._sync or r.local or b.deferred or b._count[i]
            or grad.layout != torch.strided or grad.dtype != r.dtype):
        return 0
    if r.on_grad is not None or getattr(b, "at_finish", False):
        return 0                        # ZeRO-3 (its default path copies nothing: grad_parts.py); see below
    div = b.grad_div or (b.group or r.group).size
    if div <= 1 or (r.mode != "all_reduce" and r.dtype == torch.float32 and div & (div - 1)):
        return 0                        # fp32 reduce-scatter, N not a power of two: the shard is divided after
    return div


def divide_rest(b, g: torch.Tensor, div: int) -> None:
    """Divide bucket ``b``'s flat gradient ``g`` by ``div`` where its parameters were not divided on the way in
    (``b.divided``): every element is divided exactly once (padding is zeros, divided or not)."""
    done = getattr(b, "divided", b"")
    if not any(done):
        g.div_(div)
    elif not all(done):
        for i in (i for i, d in enumerate(done) if not d):
            g[b.offsets[i]:b.offsets[i] + b.sizes[i]].div_(div)


def copy_in(r, b, i: int, grad: torch.Tensor, view: torch.Tensor) -> None:
    """Put parameter ``i``'s fresh gradient ``grad`` into its bucket view: divided by N in the same pass where
    :func:`fused_div` allows (``b.divided[i]`` set), else copied."""
    div = fused_div(r, b, i, grad)
    if div:
        torch.div(grad, div, out=view)
        b.divided[i] = 1
    else:
        view.copy_(grad)
