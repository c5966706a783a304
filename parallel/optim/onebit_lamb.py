"""1-bit LAMB (Li et al., "1-bit LAMB: Communication Efficient Large-Scale Large-Batch Training with LAMB's
Convergence Speed", arXiv 2104.06069, Algorithm 1), over dp and ZeRO stages 1–2.

Warm-up, steps 1 … ``freeze_step``: LAMB (:class:`parallel.optim.lamb.Lamb`, bias-corrected) on the
dp-averaged gradient; per tensor the trust ratio r_t = clamp(‖w‖/‖u‖, min_coeff, max_coeff) is also
averaged, r̄ ← β3·r̄ + (1−β3)·r_t (``coeff_beta`` β3 = 0.9), and used bias-corrected, r̄/(1−β3^T) (DeepSpeed
starts r̄ at 0 without the correction, which after T = 15 steps is 21 % low).

Compressed phase (as :class:`parallel.optim.onebit_adam.OneBitAdam`): v frozen, each rank's momentum
m_i = β1·m + (1−β1)·g_i sign-compressed with worker and server error feedback into the shared m. The
layer-wise scale cannot be recomputed from the compressed m (its norm is the compression's), so per
tensor it is the frozen r̄ times a factor that follows the variance the frozen v no longer sees (§3.2):

    g̃ = (m_t − β1·m_{t−1}) / (1−β1)              (the gradient m_t implies; the same on every rank)
    ṽ ← β2·ṽ + (1−β2)·g̃²                          (ṽ starts at v̂ = v/(1−β2^T) at the freeze)
    u° = clamp(m̂/(√v̂ + ε), ±R);  u = u° + λ·w       (R: ``update_bound``, as OneBitAdam)
    f = max_k (√v̂_k + ε)/(√ṽ_k + ε);   with λ > 0: f ← f·ρ + (1−ρ), ρ = min(1, ‖u°‖/‖u‖)
    f ← clamp(f, factor_min, factor_max), then within last_f·(1 ± factor_threshold)
    w ← w − η·(r̄/(1−β3^T))·f·u

All of it is per whole tensor on data every rank holds in the compressed phase (stage 0: the tensors;
stages 1–2: every rank holds the whole bucket, :mod:`parallel.zero.onebit`), so it adds no traffic: the
wire bytes per step are 1-bit Adam's. Not with tensor parallelism (a tp shard is not a whole tensor):
refused. State beyond 1-bit Adam's: ṽ and √v̂ (stage 0), m_{t−1} during the step, r̄ and last_f (4 bytes
per element each: see :meth:`OneBitLamb.frozen_coeff`).
"""
from __future__ import annotations

import math

import torch

from parallel.optim.lamb import trust_ratio_step
from parallel.optim.onebit_adam import OneBitAdam, compressed_mean

__all__ = ["OneBitLamb", "lamb_compressed_update"]


def lamb_compressed_update(w, m, m_prev, sqrt_v, v_fresh, coeff: float, last_factor: float, g: dict,
                           c1: float) -> float:
    """One tensor's compressed-phase step (module docstring), all 1-D: w, v_fresh updated in place; returns f."""
    (b1, b2), eps, wd, lr = g["betas"], g["eps"], g["weight_decay"], g["lr"]
    gr = (m - b1 * m_prev) / (1 - b1)
    v_fresh.mul_(b2).addcmul_(gr, gr, value=1 - b2)
    denom = sqrt_v + eps
    u0 = m.div(denom).div_(c1)
    if g.get("update_bound") is not None:
        u0.clamp_(-g["update_bound"], g["update_bound"])
    u = u0 + wd * w if wd else u0
    f = float((denom / (v_fresh.sqrt() + eps)).max()) if w.numel() else 1.0
    if wd:
        n0, n = float(u0.double().norm()), float(u.double().norm())
        rho = min(1.0, n0 / n) if n > 0 else 1.0
        f = f * rho + (1 - rho)
    f = min(max(f, g["factor_min"]), g["factor_max"])
    th = g["factor_threshold"]
    f = min(max(f, last_factor * (1 - th)), last_factor * (1 + th))
    w.add_(u, alpha=-lr * coeff * f)
    return f


class OneBitLamb(OneBitAdam):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 freeze_step: int = 100, max_coeff: float = 10.0, min_coeff: float = 0.01, coeff_beta: float = 0.9,
                 factor_max: float = 4.0, factor_min: float = 0.5, factor_threshold: float = 0.1,
                 update_bound: float | str | None = "adam"):
        if not 0 < min_coeff <= max_coeff:
            raise ValueError(f"OneBitLamb: need 0 < min_coeff ({min_coeff}) <= max_coeff ({max_coeff})")
        if not (0 < factor_min <= 1 <= factor_max and 0 <= factor_threshold and 0 <= coeff_beta < 1):
            raise ValueError(f"OneBitLamb: need 0 < factor_min ({factor_min}) <= 1 <= factor_max ({factor_max}), "
                             f"factor_threshold ({factor_threshold}) >= 0 and 0 <= coeff_beta ({coeff_beta}) < 1")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, freeze_step=freeze_step,
                         update_bound=update_bound)
        self.param_groups[0].update(max_coeff=max_coeff, min_coeff=min_coeff, coeff_beta=coeff_beta,
                                    factor_max=factor_max, factor_min=factor_min, factor_threshold=factor_threshold)
        self.defaults.update(self.param_groups[0])
        self.defaults.pop("params")

    @staticmethod
    def _first(x: torch.Tensor) -> float:
        return float(x.reshape(-1)[0]) if x.numel() else 1.0

    def frozen_coeff(self, st: dict) -> float:
        """r̄/(1−β3^T): the warm-up's averaged trust ratio, bias-corrected. r̄ and the last factor are one value
        per tensor held in every element of a parameter-shaped state tensor: checkpoints, ZeRO's full state dict
        and resharding then carry them as they carry exp_avg (a scalar state would be taken as one for all)."""
        g = self.param_groups[0]
        return self._first(st["lamb_coeff"]) / (1 - g["coeff_beta"] ** g["freeze_step"])

    def _warmup(self, g, t: int) -> None:
        (b1, b2), eps, wd, lr = g["betas"], g["eps"], g["weight_decay"], g["lr"]
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        params, updates = [], []
        for p in g["params"]:
            st = self.state[p]
            if not st:
                st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                st["lamb_coeff"] = torch.zeros_like(p)      # per tensor, held per element (see frozen_coeff)
            st["step"] = torch.tensor(float(t))
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            st["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            u = (st["exp_avg"] / c1) / ((st["exp_avg_sq"] / c2).sqrt_().add_(eps))
            if wd:
                u.add_(p, alpha=wd)
            params.append(p)
            updates.append(u)
        for p, r in zip(params, trust_ratio_step(self.partition, params, updates, g, lr)):
            self.state[p]["lamb_coeff"].mul_(g["coeff_beta"]).add_((1 - g["coeff_beta"]) * r)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g = self.param_groups[0]
        compressed = self.local_gradients
        if compressed and getattr(self.partition, "partitioned", False):
            raise RuntimeError("OneBitLamb.step() in the compressed phase under ZeRO stages 1-2: ZeroOptimizer runs "
                               "that step (parallel.zero.onebit); call ZeroOptimizer.step(), not optimizer.step()")
        self._t = t = self.t + 1
        if not compressed:
            self._warmup(g, t)
            return loss
        (b1, b2), T = g["betas"], g["freeze_step"]
        c1, c2 = 1 - b1 ** t, 1 - b2 ** T
        ps = g["params"]
        prev = []
        for p in ps:
            st = self.state[p]
            st["step"] = torch.tensor(float(t))
            if "v_fresh" not in st:                     # the freeze: ṽ = v̂, last factor 1
                st["sqrt_v"] = st["exp_avg_sq"].sqrt() / math.sqrt(c2)
                st["v_fresh"] = st["sqrt_v"] * st["sqrt_v"]
                st["last_factor"] = torch.ones_like(p)
            prev.append(st["exp_avg"].clone())
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            st["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
        flat = torch.cat([self.state[p]["exp_avg"].reshape(-1) for p in ps]) if ps else torch.zeros(0)
        mean = compressed_mean(flat, self.comm_state, getattr(self.partition, "dp", None))
        o = 0
        for p, m_prev in zip(ps, prev):
            st = self.state[p]
            n = p.numel()
            st["exp_avg"].copy_(mean[o:o + n].view_as(p))
            o += n
            f = lamb_compressed_update(p.view(-1), st["exp_avg"].view(-1), m_prev.view(-1), st["sqrt_v"].view(-1),
                                       st["v_fresh"].view(-1), self.frozen_coeff(st), self._first(st["last_factor"]), g,
                                       c1)
            st["last_factor"].fill_(f)
        return loss
