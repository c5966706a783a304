"""The experts of one MoE layer as stacked weights, computed as one batched matmul.

E two-layer MLPs y = W2ᵢ act(W1ᵢ x + b1ᵢ) + b2ᵢ stored as W1 [E, h, f], b1 [E, f], W2 [E, f, h],
b2 [E, h]; the tokens routed to each expert arrive as a padded [E, n, h] block and all experts run
as two ``torch.baddbmm`` calls (no per-token or per-expert Python loop; GShard's einsum
"EGCM,EMH->EGCH", arXiv 2006.16668, Algorithm 2). Under expert parallelism
(:meth:`GroupedExperts.shard`) a rank keeps the E/ep experts [r·E/ep, (r+1)·E/ep) of its ep rank r;
each kept parameter is flagged ``param_info(p).ep_split``. Under expert tensor parallelism
(:mod:`parallel.moe.tp`) W1, b1 hold f/tp columns and W2 f/tp rows of every expert, and b2 h/tp columns,
added to those columns of the partial output only (the partial outputs are summed over tp after the combine).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.moe.tp import copy_tp_info
from parallel.parameters import param_info

__all__ = ["GroupedExperts"]

_ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class GroupedExperts(nn.Module):
    """``GroupedExperts(num_experts, hidden, ffn_hidden, bias=True, activation="gelu")``;
    forward(x [E_local, n, h]) → [E_local, n, h]."""

    def __init__(self, num_experts: int, hidden: int, ffn_hidden: int, bias: bool = True, activation: str = "gelu"):
        super().__init__()
        if activation not in _ACT:
            raise ValueError(f"activation={activation!r}: use one of {sorted(_ACT)}")
        self.num_experts, self.first, self.activation = num_experts, 0, activation
        self.tp_group = None                              # set by parallel.moe.tp.split_experts_tp
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, ffn_hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, ffn_hidden)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, hidden)) if bias else None
        for w, b, fan_in in ((self.w1, self.b1, hidden), (self.w2, self.b2, ffn_hidden)):
            bound = 1 / math.sqrt(fan_in)                 # nn.Linear's default range, per expert
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _ACT[self.activation]
        h = torch.bmm(x, self.w1) if self.b1 is None else torch.baddbmm(self.b1.unsqueeze(1), x, self.w1)
        h = act(h)
        if self.b2 is None:
            return torch.bmm(h, self.w2)
        b2 = self.b2
        if self.tp_group is not None:                 # this rank's columns of b2, zero elsewhere (parallel.moe.tp)
            lo, n = self.tp_group.rank * b2.shape[-1], b2.shape[-1]
            b2 = F.pad(b2, (lo, self.w2.shape[-1] - lo - n))
        return torch.baddbmm(b2.unsqueeze(1), h, self.w2)

    @torch.no_grad()
    def shard(self, rank: int, ep: int) -> None:
        """Keep experts [rank·E/ep, (rank+1)·E/ep) (new Parameters; call before building the optimizer)."""
        E = self.num_experts
        if E % ep:
            raise ValueError(f"{E} experts do not split over parallel.ep={ep} ranks: choose ep dividing the "
                             f"number of experts ({[d for d in range(1, E + 1) if E % d == 0]})")
        n = E // ep
        lo = rank * n
        for name in ("w1", "w2", "b1", "b2"):
            p = getattr(self, name)
            if p is None:
                continue
            q = nn.Parameter(p.data[lo:lo + n].clone(), requires_grad=p.requires_grad)
            param_info(q).ep_split = True
            copy_tp_info(p, q)
            setattr(self, name, q)
        self.num_experts, self.first = n, self.first + lo
