"""Top-k softmax router and its auxiliary losses.

Router (Shazeer et al., arXiv 1701.06538; Switch Transformer, Fedus et al., arXiv 2101.03961;
GShard, Lepikhin et al., arXiv 2006.16668): for token x_t, logits z_t = W_r x_t ∈ R^E (computed in
fp32), p_t = softmax(z_t); the token goes to the k experts of largest p_t,i with weights p_t,i,
or, with ``normalize``, p_t,i / Σ_{j ∈ top-k} p_t,j (Mixtral's / Qwen-MoE's ``norm_topk_prob``).

Load-balancing loss (Switch eq. 4–6, GShard's l_aux in the same form), over the T tokens of one
group (one micro-batch on one rank):

    L_aux = E · Σ_i f_i · P_i,   f_i = (1/(T·k)) Σ_t Σ_{j<k} 1[e_tj = i],   P_i = (1/T) Σ_t p_t,i

(f_i counts routed assignments before capacity dropping and carries no gradient; L_aux = 1 for a
perfectly uniform router). Router z-loss (ST-MoE, Zoph et al., arXiv 2202.08906, eq. 5):

    L_z = (1/T) Σ_t (log Σ_i exp z_t,i)².
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TopKRouter", "load_balancing_loss", "router_z_loss"]


def load_balancing_loss(probs: torch.Tensor, idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E · Σ_i f_i P_i for probabilities ``probs`` [T, E] and chosen experts ``idx`` [T, k]."""
    T, k = idx.shape
    f = torch.bincount(idx.reshape(-1), minlength=num_experts).to(probs.dtype) / (T * k)
    return num_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean_t (logsumexp_i z_t,i)²."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class TopKRouter(nn.Module):
    """``TopKRouter(hidden, num_experts, top_k, normalize=True)``; forward(x [T, h]) returns
    (logits [T, E] fp32, probs [T, E], weights [T, k], expert indices [T, k])."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, normalize: bool = True):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        nn.init.uniform_(self.weight, -1 / math.sqrt(hidden), 1 / math.sqrt(hidden))

    def forward(self, x: torch.Tensor):
        logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return logits, probs, w, idx
