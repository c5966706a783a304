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

ZeRO-1/2/3 (reduce-scatter of fp32 gradients) divide the reduced shard after the collective, Ψ/N elements
(:mod:`parallel.data_parallel.reducer`); for N a power of two the division is exact (a change of exponent), so
Σ_r (g_r/N) = (Σ_r g_r)/N bit for bit unless an element is subnormal, and they too divide on the way in: one pass
over the shard less. For other N they keep the division after the reduction (it would round differently).
ZeRO-3's usual bucket (dp2 on the ring: :mod:`parallel.data_parallel.grad_parts`) copies nothing and divides the
shard after; its other buckets (regions' units, N = 4, …) take the flat path and divide on the way in as ZeRO-1/2.

Where the division is taken must be the same on every rank of the group. A reduce-scatter sums the ranks'
buckets: if rank A divided its gradients on the way in and rank B, which got no gradient for any parameter of the
bucket (a branch only A's rows took, an expert only A routed to, a ZeRO-3 region's expert), divided nothing and so
divided its reduced shard after, B's shard is (g_A/N + 0)/N — divided twice, silently (Adam hides a factor of 2
almost entirely: it moved the losses of tests/test_zero_lockstep.py by 2e-4). So :func:`fuses` decides from what
every rank shares — mode, dtype, N, m, ``no_sync`` used, the bucket's kind — never from which gradients arrived:
where it holds, every rank divides before the reduction (what the hooks did not divide, :func:`divide_rest`: a
rank without gradients divides its zeros) and none after (tests/test_fused_div_agree.py).
"""
from __future__ import annotations

import torch

__all__ = ["copy_in", "divide_rest", "fused_div", "fuses"]


def fuses(r, b) -> int:
    """The divisor N when reducer ``r`` divides bucket ``b`` before its reduction this step, on every rank alike
    (module docstring: decided only from what all ranks of the group share), else 0. ``r.fuse_div = False``
    restores the copy-then-divide path (benchmarks/proto_pair.py's ``:unfused`` row)."""
    if not r.fuse_div or r.expected != 1 or r.local or r.accumulated or b.deferred:
        return 0
    div = b.grad_div or (b.group or r.group).size
    return div if div > 1 and not (r.mode != "all_reduce" and r.dtype == torch.float32 and div & (div - 1)) else 0


def fused_div(r, b, i: int, grad: torch.Tensor) -> int:
    """N when reducer ``r`` may divide parameter ``i`` of bucket ``b``'s first gradient ``grad`` as it copies it
    (module docstring), else 0: the bucket :func:`fuses`, and this is a synced first gradient of the step."""
    div = fuses(r, b)                                          # (first: a deferred bucket has no _count)
    if not div or not r._sync or b._count[i] or grad.layout != torch.strided or grad.dtype != r.dtype:
        return 0
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
