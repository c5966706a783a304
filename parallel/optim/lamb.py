"""LAMB: layer-wise adaptive moments (You et al., "Large Batch Optimization for Deep Learning:
Training BERT in 76 minutes", arXiv 1904.00962, Algorithm 2), per tensor w with gradient g:

    m ← β1·m + (1−β1)·g            v ← β2·v + (1−β2)·g²
    m̂ = m / (1−β1^t)               v̂ = v / (1−β2^t)          (bias_correction; else m̂ = m, v̂ = v)
    u = m̂ / (√v̂ + ε) + λ·w
    r = clamp(‖w‖ / ‖u‖, min_coeff, max_coeff)   if ‖w‖ > 0 and ‖u‖ > 0, else 1
    w ← w − η·r·u

The defaults are DeepSpeed's FusedLamb (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0,
max_coeff 10, min_coeff 0.01). m, v and u are elementwise and stay on ZeRO's pieces; ‖w‖ and ‖u‖
are over the whole tensor: :meth:`~parallel.optim.tensorwise.LocalPartition.sum_sq` sums the
squares over the dp partition and the tp shards in one float64 all-reduce per axis (2 values per
parameter: 16·P bytes of payload), so LAMB under ZeRO 0–3 and tp equals LAMB on one process.
"""
from __future__ import annotations

import math

import torch

from parallel.optim.tensorwise import TensorwiseOptimizer

__all__ = ["Lamb", "trust_ratio_step"]


def trust_ratio_step(partition, params: list, updates: list, g: dict, lr: float) -> list:
    """p ← p − lr·r·u for each tensor, r = clip(‖w‖/‖u‖, min_coeff, max_coeff) (1 when either norm is 0), the norms
    summed over the partition's ZeRO pieces and tp shards (``partition.sum_sq``); returns the r's."""
    w_sq, u_sq = partition.sum_sq(params, updates)
    rs = []
    for p, u, ws, us in zip(params, updates, w_sq, u_sq):
        w_norm, u_norm = math.sqrt(float(ws)), math.sqrt(float(us))
        r = min(max(w_norm / u_norm, g["min_coeff"]), g["max_coeff"]) if w_norm > 0 and u_norm > 0 else 1.0
        p.add_(u, alpha=-lr * r)
        rs.append(r)
    return rs


class Lamb(TensorwiseOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 bias_correction: bool = True, max_coeff: float = 10.0, min_coeff: float = 0.01):
        if not lr >= 0:
            raise ValueError(f"Lamb: lr={lr} must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Lamb: betas={betas} must lie in [0, 1)")
        if not 0 < min_coeff <= max_coeff:
            raise ValueError(f"Lamb: need 0 < min_coeff ({min_coeff}) <= max_coeff ({max_coeff})")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, max_coeff=max_coeff, min_coeff=min_coeff))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g = self.param_groups[0]
        (b1, b2), eps, wd, lr = g["betas"], g["eps"], g["weight_decay"], g["lr"]
        params, updates = [], []
        for p in g["params"]:                 # every tensor takes part (the reductions are collective)
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float64)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            st["step"] += 1
            t = int(st["step"])
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if g["bias_correction"] else (1.0, 1.0)
            u = (m / c1) / ((v / c2).sqrt_().add_(eps))
            if wd:
                u.add_(p, alpha=wd)
            params.append(p)
            updates.append(u)
        trust_ratio_step(self.partition, params, updates, g, lr)
        return loss
