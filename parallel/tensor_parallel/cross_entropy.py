"""Vocab-parallel cross-entropy (Megatron-LM, Shoeybi et al., arXiv 1909.08053, §3): the logits stay
split by vocabulary over tp, only b·s numbers per reduction cross the wire.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel import comm
from parallel.comm import Group

__all__ = ["vocab_parallel_cross_entropy"]


class _VocabParallelCE(torch.autograd.Function):
    """loss_t = log Σ_v exp(z_tv) − z_t,y_t with z = logits − max: the max, the sum of exponentials and
    the target logit are reduced over tp (2 all-reduces of b·s numbers: max, then [target, sum-exp]).
    ∂loss_t/∂z_tv = softmax_tv − 1[v = y_t], computed on the local V/p slice only."""

    @staticmethod
    def forward(ctx, logits, targets, group, ignore_index):
        v_local = logits.shape[-1]
        start = group.rank * v_local
        z = logits.reshape(-1, v_local).to(torch.float32, copy=True)   # one V/p-wide copy; input untouched
        t = targets.reshape(-1)
        m = z.max(dim=-1).values
        comm.all_reduce(m, group, op="max")
        z.sub_(m.unsqueeze(-1))
        valid = t != ignore_index
        # a target outside [0, V) owned by no rank would score a picked logit of 0: a finite, wrong loss
        # (F.cross_entropy raises "Target 64 is out of bounds"); checked on the device, no host sync
        torch._assert_async((~valid | ((t >= 0) & (t < v_local * group.size))).all(),
                            f"vocab_parallel_cross_entropy: a target id is outside [0, {v_local * group.size}), the "
                            f"vocabulary split over tp = {group.size}, and is not ignore_index={ignore_index} "
                            f"(F.cross_entropy raises 'Target out of bounds'): fix the labels, or raise the model's "
                            f"vocab_size")
        local = t - start
        mine = (local >= 0) & (local < v_local) & valid
        idx = torch.where(mine, local, 0)
        picked = z.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * mine
        z.exp_()
        red = torch.stack([picked, z.sum(-1)])
        comm.all_reduce(red, group)
        picked, sum_exp = red[0], red[1]
        per_token = (sum_exp.log() - picked) * valid
        z.div_(sum_exp.unsqueeze(-1))                # softmax over this rank's slice
        n = valid.sum()
        ctx.save_for_backward(z, idx, mine, valid, n)
        ctx.shape, ctx.dtype, ctx.done = logits.shape, logits.dtype, False
        return per_token.sum() / n.clamp(min=1)

    @staticmethod
    def backward(ctx, g):
        if ctx.done:
            raise RuntimeError("vocab_parallel_cross_entropy: backward ran twice through one graph "
                               "(retain_graph); recompute the loss instead")
        ctx.done = True
        grad, idx, mine, valid, n = ctx.saved_tensors
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, idx] -= mine.to(grad.dtype)       # softmax − one-hot, in place on the saved slice
        grad.mul_((valid.to(grad.dtype) * (g / n.clamp(min=1))).unsqueeze(-1))
        return grad.view(ctx.shape).to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, targets: torch.Tensor, group: Group,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose target is not ``ignore_index``, from logits split along
    the vocabulary (rank i holds classes [i·V/p, (i+1)·V/p)), never gathering the full logits: every
    tensor it allocates has at most b·s·V/p elements (Megatron-LM §3, arXiv 1909.08053).
    Equals ``F.cross_entropy(full_logits.view(-1, V).float(), targets.view(-1))``. A vocabulary padded to a
    multiple of tp arrives with −∞ logits in its padded columns (:mod:`.uneven`): exp(−∞) = 0 adds nothing to
    the sum and their gradient softmax − onehot is exactly 0, so the loss is the one over the V real classes."""
    if tuple(logits_shard.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"vocab_parallel_cross_entropy: logits shard {tuple(logits_shard.shape)} and targets "
                         f"{tuple(targets.shape)} disagree; logits must be targets.shape + (V/tp,)")
    if group.size == 1:
        return F.cross_entropy(logits_shard.reshape(-1, logits_shard.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=ignore_index)
    return _VocabParallelCE.apply(logits_shard, targets, group, ignore_index)
