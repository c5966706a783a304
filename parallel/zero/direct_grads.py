"""Gradients without buckets: ZeRO stage 0 over a dp group of one rank (every tp / pp layout without data
parallelism, and a single process).

With N = 1 there is nothing to reduce, so a flat gradient bucket only costs: after ``zero_grad`` (``p.grad =
None``) autograd's first gradient of a step would be copied into the parameter's view of the bucket (read 4,
write 4 + write-allocate 4: 12 bytes moved per element and step, :data:`parallel.planning.time_terms.GRAD_MOVED`)
and the bucket would stay allocated between steps. Here ``p.grad`` stays the tensor autograd made — its first
gradient kept as is, later micro-batches added in place — exactly what a plain torch loop does, and the
optimizer's 1-D pieces (one whole parameter each at stage 0 over one rank) get ``piece.grad = p.grad.view(-1)``:
the same memory, nothing copied. The update, the norm and clipping read the same numbers as through the bucket.

Where it applies (:func:`can_direct`): stage 0, a group of one rank, parameters and master the same tensor
(fp32, no master copy), no offload, an elementwise optimizer (no ``bind_partition``: LAMB, Muon and 1-bit Adam
read the flat bucket), no expert groups, not simulated (launch.simulate counts the flat buffers on meta: the
same bytes, 4 per element, as the gradients held here after backward).
"""
from __future__ import annotations

import torch

from parallel.data_parallel.reducer import GradReducer
from parallel.zero.grad_norm import piece_kind, sum_over_groups

__all__ = ["can_direct", "DirectReducer", "bind_grads", "direct_norm_sq", "clip_grads"]


class DirectReducer(GradReducer):
    """The reducer over one rank: its hooks count gradients (``b.had``, the missing-gradient warning, the step's
    end) and move nothing — no flat buffer (built with ``keep_full_grads=False``, so none is allocated), no
    collective; ``p.grad`` stays autograd's tensor."""

    def __init__(self, buckets, group, mode, grad_dtype, deferred=None):
        if group.size != 1:
            raise ValueError(f"DirectReducer reduces nothing: it needs a group of one rank, not {group.size}")
        super().__init__(buckets, group, mode, grad_dtype, keep_full_grads=False, deferred=deferred)

    def _absorb(self, b, i, p) -> None:
        pass                                             # the gradient stays in p.grad

    def _launch(self, b, where: str) -> None:
        self.launches[where] += 1                        # one rank: nothing to reduce


def can_direct(z, zero, simulate: bool) -> bool:
    """Whether :class:`~parallel.zero.optimizer.ZeroOptimizer` ``z`` (its optimizer built) keeps no flat
    gradient buckets (module docstring)."""
    return (z.stage == 0 and z.group.size == 1 and not simulate and not z.prec.master
            and zero.offload.optimizer == "none" and zero.offload.params == "none" and not z.expert_groups
            and not hasattr(z.optimizer, "bind_partition")
            and all(b.lo == 0 and b.hi == b.numel == b.padded for b in z._all))


def bind_grads(z) -> None:
    """Each optimizer piece's ``grad``: its parameter's ``p.grad`` flattened (a view: autograd lays it out like p,
    contiguous), None for a parameter that got no gradient this step (``b.unused``: torch skips it); a tied
    parameter's missing one is zeros, as its bucket's zeroed view was."""
    for b, i, _, _, view in z._piece_list:
        g = b.params[i].grad
        if g is None and b.deferred:
            g = b.params[i].grad = torch.zeros_like(b.params[i])
        skip = g is None or i in getattr(b, "unused", ())
        view.grad = None if skip else g.reshape(-1)


def direct_norm_sq(z, count: torch.Tensor) -> torch.Tensor:
    """[Σ tp-split g², Σ replicated g², Σ duplicate g²] (float64) from the bound piece gradients, summed over
    ``z.norm_groups`` as :func:`parallel.zero.grad_norm.grad_norm_sq` sums the buckets' segments."""
    v = torch.zeros(3, dtype=torch.float64, device=count.device)
    kinds: dict = {}
    for b, i, _, _, view in z._piece_list:
        if view.grad is not None:
            kinds.setdefault(piece_kind(b.params[i]), []).append(view.grad)
    for k, gs in kinds.items():                  # fp32 norm per parameter, squared and summed in fp64
        v[k] = torch.stack(torch._foreach_norm(gs)).double().square().sum()    # one call, not ~5 per parameter
    return sum_over_groups(v, z.norm_groups)


@torch.no_grad()
def clip_grads(z, coef: float) -> None:
    """Scale every bound piece gradient by ``coef`` (in place: the parameters' own gradients)."""
    for pc in z._piece_list:
        if pc[4].grad is not None:
            pc[4].grad.mul_(coef)
