"""The two tensor-parallel layouts where a size does not divide tp: vocabulary padding and kv-head replication.

**Vocabulary padding** (V not divisible by tp). The vocab-parallel embedding (style ``vocab``) and the
vocab-split output layer (``colwise_vocab``, ``colwise_gather``) pad V to V' = ⌈V/tp⌉·tp with zero rows:
rank i holds rows [i·V'/tp, (i+1)·V'/tp) of [E; 0], so the padding (V' − V < tp rows) sits at the end of the
last rank(s). A tied embedding and head share the one padded Parameter. The padded rows

* are never looked up (token ids are < V);
* give logits that the output layer sets to −∞ (``pad_logits``), so softmax gives them probability exactly 0:
  vocab_parallel_cross_entropy — or any softmax loss — over the padded shards equals the loss over the V
  real classes, and ∂L/∂z = softmax − onehot is exactly 0 there (the −∞ fill passes no gradient either);
* therefore get exactly zero gradient, and stay zero under the optimizers: Adam/AdamW's update
  m/(√v + ε) is 0 for m = v = 0, decoupled weight decay multiplies 0 by (1 − lr·λ), L2 decay adds λ·0,
  so no special case keeps decay off them; ZeRO partitions them like any other element;
* are never saved: the checkpoint layout probe (:mod:`parallel.checkpoint.layout`) maps every element to
  its position in the unmodified model, and padding maps to none (index −1), so a checkpoint and its
  consolidation hold the V×H tensor a one-process run has, and loading leaves the padding at zero.

Gathered logits (``colwise_gather``, :func:`gather_vocab_logits`) drop the padding: the user sees [..., V].

**kv-head replication** (grouped-query / multi-query attention with n_kv < tp, tp % n_kv = 0). The query
heads split as usual, q_r = nq/tp per rank; rank r's query heads all read kv head ⌊r / R⌋, R = tp/n_kv, so
rank r holds a copy of that head's rows of k_proj and v_proj (piece ⌊r/R⌋ of n_kv) and its attention
runs with 1 kv head and q_r query heads per kv head (``num_key_value_groups`` = q_r). A replica's gradient
covers only its own query heads; the head's gradient is the sum over its R replicas. It is summed
inside autograd (:class:`_SumOverReplicas`): each rank writes its gradient into slot ⌊r/R⌋ of a zeroed
[n_kv, …] buffer, one all-reduce over tp sums every slot, and each rank keeps its own slot — so replicas
receive identical gradients and stay identical under any optimizer. Cost per replicated projection per
forward (weight, plus bias if any, of w = hd·H elements per head, b bytes each): an all-reduce of
n_kv·w·b bytes over tp, 2(tp−1)/tp · n_kv·w·b on the wire (ring model). Reducing over the R ranks of
each head instead would need a process group per head, 2(R−1)/R · w·b: the same bytes for MQA (n_kv = 1),
n_kv(tp−1)/(tp−n_kv) times fewer otherwise (3× at n_kv = 2, tp = 4); the tp group needs no new groups.
Replicas other than the first (r mod R ≠ 0) are marked ``param_info(p).tp_duplicate``: not counted in the
gradient norm, not written by checkpoints (one copy is), loaded like every piece.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from parallel import comm
from parallel.comm import Group
from parallel.parameters import param_info

__all__ = ["padded_size", "vocab_error", "pad_logits", "gather_vocab_logits", "sum_over_replicas", "kv_replication",
           "set_replicated_kv_attrs", "piece_of", "KV_GROUP_ATTRS"]

# Attention attributes holding the number of query heads per kv head (repeat_kv's n_rep).
KV_GROUP_ATTRS = ("num_key_value_groups", "num_kv_groups", "n_rep")


def padded_size(n: int, tp: int) -> int:
    """⌈n/tp⌉·tp: the vocabulary size after padding to a multiple of tp."""
    return -(-n // tp) * tp


def vocab_error(name: str, v: int, tp: int) -> str | None:
    """Why a vocabulary of ``v`` cannot be padded over ``tp`` (a rank would hold padding only), or None."""
    local = padded_size(v, tp) // tp
    if (tp - 1) * local >= v:
        return (f"{name}: vocabulary size {v} is too small for tp = {tp}: padded to {local * tp}, rank {tp - 1} "
                f"would hold only padding; use a smaller tp")
    return None


def pad_logits(y: torch.Tensor, valid: int) -> torch.Tensor:
    """Set the columns ≥ ``valid`` of this rank's logits (its padded classes) to −∞ (no gradient flows there)."""
    if valid >= y.shape[-1]:
        return y
    pad = torch.arange(y.shape[-1], device=y.device) >= valid
    return y.masked_fill(pad, float("-inf"))


def gather_vocab_logits(logits_shard: torch.Tensor, group: Group, vocab_size: int) -> torch.Tensor:
    """The full [..., V] logits from vocab-split shards (all-gather along the last dim; the padding of a
    V not divisible by tp dropped), e.g. for generation. Differentiable (backward keeps this rank's slice)."""
    full = comm.gather_from_seq(logits_shard, group, -1)
    return full if full.shape[-1] == vocab_size else full[..., :vocab_size]


class _SumOverReplicas(torch.autograd.Function):
    """Identity forward; backward: the gradient summed over the tp ranks holding the same piece."""

    @staticmethod
    def forward(ctx, w, group, replicas):
        ctx.group, ctx.replicas = group, replicas
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        group, r = ctx.group, ctx.replicas
        buf = g.new_zeros((group.size // r,) + tuple(g.shape))
        buf[group.rank // r] = g
        comm.all_reduce(buf, group)
        return buf[group.rank // r], None, None


def sum_over_replicas(w: torch.Tensor, group: Group, replicas: int) -> torch.Tensor:
    """``w`` for this forward, its gradient summed over the ``replicas`` consecutive tp ranks that hold it."""
    if replicas == 1 or not torch.is_grad_enabled() or not w.requires_grad:
        return w
    return _SumOverReplicas.apply(w, group, replicas)


def piece_of(full: torch.Tensor, p: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """What rank ``rank`` of ``tp`` holds of the unmodified ``full`` tensor for the local parameter ``p``
    (padding, sections and replication as ``param_info(p)`` records them) — e.g. to compare gradients."""
    info = param_info(p)
    if not info.tp_split:
        return full
    full = full.detach()
    if info.tp_pad:
        shape = list(full.shape)
        shape[info.tp_dim] = info.tp_pad
        full = torch.cat([full, full.new_zeros(shape)], info.tp_dim)
    r = info.tp_replicas
    parts, index = tp // r, rank // r
    if info.sections is None:
        return full.chunk(parts, info.tp_dim)[index]
    return torch.cat([s.chunk(parts, info.tp_dim)[index] for s in full.split(list(info.sections), info.tp_dim)],
                     info.tp_dim)


def kv_replication(matches, mods: dict, tp: int, heads_of, errors: list) -> dict:
    """{name of a colwise k/v projection: its kv head count n_kv} for the attention modules whose kv heads are
    fewer than tp. Per attention module (the parent of its ``colwise`` projections), the projection with the
    most heads is the query (nq heads) and those with fewer are k/v (n_kv). Replicated when n_kv < tp,
    tp % n_kv = 0 and nq % tp = 0; otherwise an error naming the counts. ``heads_of(name, module, parent)``
    gives a projection's head count (None when the parent has no head_dim). Values: (n_kv, nq)."""
    by_parent: dict = {}
    for name, style, m in matches:
        parent_name = name.rpartition(".")[0]
        if style == "colwise":
            h = heads_of(name, m, mods[parent_name])
            if h is not None:
                by_parent.setdefault(parent_name, []).append((name, h))
    out = {}
    for projs in by_parent.values():
        nq = max(h for _, h in projs)
        for name, h in projs:
            if h == nq or h % tp == 0:
                continue
            if tp % h or nq % tp or nq % h:
                errors.append(f"{name}: {h} key/value heads with {nq} query heads cannot be split over tp = {tp}: "
                              f"kv heads are replicated when tp is a multiple of them and tp divides the query "
                              f"heads; use a tp that divides {h} or a multiple of {h} that divides {nq}")
                continue
            out[name] = (h, nq)
    return out


def set_replicated_kv_attrs(parent: nn.Module, q_per_rank: int, kv_attrs) -> None:
    """Per-rank head attributes of an attention module whose kv heads are replicated: 1 kv head,
    ``q_per_rank`` query heads per kv head (its repeat_kv / GQA group)."""
    for a in kv_attrs:
        if isinstance(getattr(parent, a, None), int):
            setattr(parent, a, 1)
    for a in KV_GROUP_ATTRS:
        if isinstance(getattr(parent, a, None), int):
            setattr(parent, a, q_per_rank)
