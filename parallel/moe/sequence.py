"""MoE routing under context parallelism: the decisions one process makes over the whole sequence.

Under ``parallel.cp`` = n each rank holds the zig-zag shard of every sequence of the micro-batch
(:mod:`parallel.context_parallel.layout`): T_c = β·s/n of the T = β·s tokens. Routing itself is per token
(the router, the top-k, the weights); three things are not, and each is made equal to one process's:

* Load-balancing loss (Switch eq. 4–6): L_aux = E·Σ_i f_i·P_i over the whole micro-batch, with f_i the
  fraction of the T·k assignments going to expert i (no gradient) and P_i the mean router probability.
  The per-expert counts are all-reduced over cp (control traffic, E integers), so every rank has the
  global f; rank c computes L_c = E·Σ_i f_i·P_i^c with P^c over its own tokens. Equal shards make
  P_i = (1/n)·Σ_c P_i^c, so the mean over cp ranks of L_c — what the engine's gradient averaging over
  dp×cp applies — is L_aux, value and gradient (Megatron-Core reduces tokens_per_expert over its tp×cp
  group the same way). The z-loss (ST-MoE eq. 5) is a mean of per-token terms: the cp mean of the
  shards' means is the whole sequence's, nothing to do.
* Capacity (Switch §2.2): C = ⌈cf·T·k/E⌉ for the T tokens of the whole micro-batch, and the T·k
  assignments ranked choice-major, then by global token index b·s + position (GShard's priority,
  arXiv 2006.16668, Algorithm 1); pos ≥ C is dropped. Every rank all-gathers the cp ranks' expert
  choices (T_c·k integers, control traffic), lays them out at their global positions and computes the
  positions of all T·k assignments (a stable sort by expert, O(T·k) memory), then keeps exactly the ones
  of its own tokens that one process keeps. Which assignment is dropped therefore never depends on cp.
* The slot buffer: a rank's kept assignments fill [E, C_buf, h] in the same order; C_buf = the largest
  kept count of any expert on any ep rank (one all-reduce max over ep, control traffic — as dropless
  does), since the all-to-all needs one shape on every ep rank. Slot placement does not change any
  token's result: each slot is computed on its own.

Dropless (capacity_factor None) drops nothing: only the loss changes. ``tests/test_moe_context.py``
checks cp2 × ep2, dp2 × cp2 × ep2/ep4, cp4 and pp2 × cp2 × ep2 against one process to 1e-5. Only while
a cp step runs (:func:`sequence_active`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from parallel import comm
from parallel.comm import Group
from parallel.context_parallel.context import current
from parallel.context_parallel.layout import zigzag_index
from parallel.moe.dispatch import Slots, dropless_capacity

__all__ = ["sequence_active", "sequence_route", "global_expert_counts", "sequence_load_balancing_loss", "global_keep",
           "sequence_slots"]


def sequence_active(group: Group | None) -> bool:
    """Whether the layer runs on a cp shard now: a cp group of more than one rank and a cp step in progress
    (:meth:`parallel.context_parallel.ContextParallel.active`); outside one — the pipeline split's trace, the
    user's own evaluation of the module — the layer sees whole sequences and routes them alone."""
    return group is not None and group.size > 1 and current() is not None


def check_input(x: torch.Tensor, group: Group) -> None:
    if x.dim() != 3:
        raise ValueError(f"an MoE layer under parallel.cp={group.size} got input of shape {tuple(x.shape)}; it needs "
                         f"(batch, sequence shard, hidden) to place its tokens in the whole sequence (their routing "
                         f"and capacity are decided over it): set parallel.cp=1 for this model")


def global_expert_counts(idx: torch.Tensor, num_experts: int, group: Group) -> torch.Tensor:
    """[E] assignments per expert over the whole sequence (all cp ranks; control traffic)."""
    c = torch.bincount(idx.reshape(-1), minlength=num_experts)
    return comm.all_reduce(c, group.control())


def sequence_load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E·Σ_i f_i·P_i^c: global f (``counts``: the n·T_c·k assignments of all cp ranks), P over this rank's T_c
    tokens."""
    f = counts.to(probs.dtype) / counts.sum()
    return num_experts * (f * probs.mean(0)).sum()


def _positions(e: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Position of each entry of ``e`` among the entries with its value (stable: order of appearance)."""
    order = torch.sort(e, stable=True).indices
    counts = torch.bincount(e, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(e)
    pos[order] = torch.arange(e.numel(), device=e.device) - starts[e[order]]
    return pos


def global_keep(idx: torch.Tensor, batch: int, num_experts: int, capacity: int, group: Group) -> torch.Tensor:
    """Kept mask [k·T_c] (choice-major, this rank's token order) of this rank's assignments ``idx`` [T_c, k]
    under one process's capacity rule over the whole sequence (module docstring)."""
    T, k = idx.shape
    n, r, s_loc = group.size, group.rank, T // batch
    S = s_loc * n
    every = comm.all_gather(idx.reshape(batch, s_loc, k).contiguous(), group.control(), dim=0)   # [n·β, s/n, k]
    every = every.view(n, batch, s_loc, k).permute(1, 0, 2, 3).reshape(batch, S, k)
    where = torch.cat([zigzag_index(S, n, j, idx.device) for j in range(n)])
    whole = torch.empty_like(every)
    whole[:, where] = every                                                  # [β, S, k] in sequence order
    e = whole.reshape(batch * S, k).t().reshape(-1)                          # choice-major, then global token
    kept = (_positions(e, num_experts) < capacity).view(k, batch * S)
    mine = (torch.arange(batch, device=idx.device)[:, None] * S + zigzag_index(S, n, r, idx.device)).reshape(-1)
    return kept[:, mine].reshape(-1)


def sequence_slots(idx: torch.Tensor, w: torch.Tensor, batch: int, num_experts: int,
                   capacity_factor: float | None, seq_group: Group, ep_group: Group | None) -> Slots:
    """The slots of this rank's assignments with one process's drops (``capacity_factor`` None: dropless)."""
    T, k = idx.shape
    e = idx.t().reshape(-1)
    tok = torch.arange(T, device=idx.device).repeat(k)
    wt = w.t().reshape(-1)
    load = torch.bincount(e, minlength=num_experts)
    if capacity_factor is None:
        keep = torch.ones_like(e, dtype=torch.bool)
    else:
        C = max(1, math.ceil(capacity_factor * T * seq_group.size * k / num_experts))
        keep = global_keep(idx, batch, num_experts, C, seq_group)
    ek = e[keep]
    onehot = F.one_hot(ek, num_experts)
    pos = (onehot.cumsum(0) * onehot).sum(1) - 1
    cap = dropless_capacity(onehot.sum(0) if ek.numel() else load * 0, ep_group)
    return Slots(tok[keep], ek, pos, wt[keep], load, cap, int(T * k - int(keep.sum())))


def sequence_route(layer, x: torch.Tensor, probs: torch.Tensor, w: torch.Tensor, idx: torch.Tensor):
    """(L_aux of this rank, its :class:`Slots`) for an :class:`parallel.moe.MoE` ``layer`` on the cp shard ``x``
    (β, s/cp, h), given its router's probabilities, top-k weights and experts."""
    g, E = layer.seq_group, layer.num_experts
    check_input(x, g)
    lb = sequence_load_balancing_loss(probs, global_expert_counts(idx, E, g), E)
    return lb, sequence_slots(idx, w, x.shape[0], E, layer.capacity_factor, g, layer.ep_group)
