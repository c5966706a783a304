"""A Mixture-of-Experts feed-forward layer with expert parallelism over the ep axis.

Forward for the T = B·S tokens of one micro-batch on one rank (x_t ∈ R^h):

1. Route (:class:`~parallel.moe.router.TopKRouter`): experts e_tj and weights w_tj, j < k.
2. Capacity (Switch, Fedus et al., arXiv 2101.03961, §2.2): each expert takes at most
   C = ⌈cf · T·k / E⌉ of this rank's assignments. Assignments are ranked choice-major and then by
   token position (every token's first choice before any second choice, GShard's order, Lepikhin et
   al., arXiv 2006.16668, Algorithm 1); an assignment whose position within its expert is ≥ C is
   dropped (deterministic: it depends only on this rank's routing). ``capacity_factor=None`` is
   dropless: C = the largest load of any expert on any ep rank (one all-reduce max, control traffic),
   so nothing is dropped and only padding slots are added.
3. Dispatch: a buffer [E, C, h] holds the kept tokens at (e, position); an all-to-all over ep
   (:func:`~parallel.moe.all_to_all.all_to_all`) sends expert block [r·E/ep, (r+1)·E/ep) to ep rank r.
4. Experts (:class:`~parallel.moe.experts.GroupedExperts`): the E/ep local experts over the ep·C
   slots each received, one batched matmul per weight.
5. Combine: the reverse all-to-all, then y_t = Σ_j w_tj · expert_{e_tj}(x_t) over kept assignments
   (a dropped assignment adds nothing; the block's residual carries the token).
6. Expert tensor parallelism (:mod:`parallel.moe.tp`, the tp plan's ``moe_tp_experts``): every rank of tp
   routes the same tokens and runs f/tp of every expert; one tp all-reduce after the combine sums the slices.

Under context parallelism (``seq_group``, the cp group, set by :func:`parallel.moe.apply_expert_parallel`)
a rank holds a shard of each sequence: capacity, drops and L_aux are decided over the whole micro-batch
as one process decides them (:mod:`parallel.moe.sequence`).

Auxiliary losses: L = α · L_aux + β · L_z (``aux_loss_coef`` α, ``z_loss_coef`` β;
:mod:`parallel.moe.router`), per micro-batch and rank as Switch's per-device loss. They enter the
gradient without the training loss knowing about them: the output passes through an identity whose
backward also yields ∂/∂L = ``aux_scale`` (Megatron-Core's MoEAuxLossAutoScaler). The engine sets
``aux_scale`` to loss_scale / m each step, so the objective is mean over micro-batches of
(task loss + L), exactly as a single process chunking the batch the same way computes it.

Per-step counters (:meth:`MoE.pop_counters`): tokens routed to each expert (before dropping), dropped
assignments, and the summed aux / z losses.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from parallel.comm import Group
from parallel.moe.dispatch import combine, dispatch, dropless_capacity, plan_slots, run_experts
from parallel.moe.experts import GroupedExperts
from parallel.moe.router import TopKRouter, load_balancing_loss, router_z_loss
from parallel.moe.sequence import sequence_active, sequence_route
from parallel.moe.tp import enter, leave

__all__ = ["MoE"]


class _AuxLoss(torch.autograd.Function):
    """Identity on ``y``; backward gives ``aux`` the gradient ``scale`` (adds scale·L to the objective)."""

    @staticmethod
    def forward(ctx, y, aux, scale):
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        return g, torch.full((), ctx.scale, dtype=torch.float32, device=g.device), None


class MoE(nn.Module):
    """``MoE(hidden, ffn_hidden, num_experts, top_k=2, capacity_factor=1.25, normalize_topk=True,
    aux_loss_coef=0.01, z_loss_coef=0.0, bias=True, activation="gelu")``; forward(x [..., h]) → [..., h].

    Built whole (all E experts, identical on every rank); :meth:`shard` (called by the engine through
    :func:`parallel.moe.apply_expert_parallel`) keeps this ep rank's E/ep experts."""

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int = 2,
                 capacity_factor: float | None = 1.25, normalize_topk: bool = True, aux_loss_coef: float = 0.01,
                 z_loss_coef: float = 0.0, bias: bool = True, activation: str = "gelu"):
        super().__init__()
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor={capacity_factor!r} must be positive (or None: dropless)")
        self.hidden, self.num_experts, self.top_k = hidden, num_experts, top_k
        self.capacity_factor, self.aux_loss_coef, self.z_loss_coef = capacity_factor, aux_loss_coef, z_loss_coef
        self.router = TopKRouter(hidden, num_experts, top_k, normalize_topk)
        self.experts = GroupedExperts(num_experts, hidden, ffn_hidden, bias, activation)
        self.ep_group: Group | None = None
        self.seq_group: Group | None = None      # cp > 1: routing decided over the whole sequence (.sequence)
        self.aux_scale = 1.0
        self._reset_counters()

    # --- expert parallelism -----------------------------------------------------------------------
    def shard(self, ep_group: Group) -> None:
        """Keep the experts of this ep rank; tokens are exchanged over ``ep_group`` from now on."""
        if self.ep_group is not None:
            raise RuntimeError("MoE.shard: this layer is already split over an ep group")
        self.experts.shard(ep_group.rank, ep_group.size)
        self.ep_group = ep_group

    @property
    def ep(self) -> int:
        return 1 if self.ep_group is None else self.ep_group.size

    # --- counters -------------------------------------------------------------------------------
    def _reset_counters(self) -> None:
        self.counters = {"load": torch.zeros(self.num_experts, dtype=torch.int64), "dropped": 0,
                         "assignments": 0, "aux_loss": 0.0, "z_loss": 0.0, "calls": 0}

    def pop_counters(self) -> dict:
        """This rank's counters since the last call (load per global expert, dropped assignments, …)."""
        c = self.counters
        self._reset_counters()
        return c

    # --- forward ----------------------------------------------------------------------------------
    def capacity(self, tokens: int, load: torch.Tensor) -> int:
        """Slots per expert per rank: ⌈cf·T·k/E⌉, or (dropless) the largest load over the ep group."""
        if self.capacity_factor is not None:
            return max(1, math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts))
        return dropless_capacity(load, self.ep_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, E = x.shape, self.num_experts
        xt = x.reshape(-1, self.hidden)
        T = xt.shape[0]
        logits, probs, w, idx = self.router(xt)
        z = router_z_loss(logits)
        tp = self.experts.tp_group                      # experts split over tp (parallel.moe.tp)
        xe, w = enter(xt, w, tp)
        if sequence_active(self.seq_group):                             # context parallel: parallel/moe/sequence.py
            lb, s = sequence_route(self, x, probs, w, idx)
        else:
            lb = load_balancing_loss(probs, idx, E)
            s = plan_slots(idx, w, E, lambda load: self.capacity(T, load))
        out = run_experts(dispatch(xe, s, E), self.experts, self.ep_group)
        y = leave(combine(out, s, T), tp)
        if torch.is_grad_enabled() and (self.aux_loss_coef or self.z_loss_coef):
            y = _AuxLoss.apply(y, self.aux_loss_coef * lb + self.z_loss_coef * z, float(self.aux_scale))
        c = self.counters
        c["load"] += s.load.detach().cpu()
        c["dropped"] += s.dropped
        c["assignments"] += T * self.top_k
        c["aux_loss"] += float(lb.detach())
        c["z_loss"] += float(z.detach())
        c["calls"] += 1
        return y.view(shape)
