"""Muon for the 2-D weights, AdamW for the rest, as one optimizer that ZeRO and tp can shard.

Muon (K. Jordan, https://kellerjordan.github.io/posts/muon/; Liu et al., "Muon is Scalable for LLM
Training", arXiv 2502.16982) as ``torch.optim.Muon`` computes it, for a matrix W with gradient G:

    B ← μ·B + (1−μ)·G              (torch: ``B.lerp_(G, 1−μ)``)
    U = G + μ·(B − G) if nesterov else B
    O = NS_k^(a,b,c)(U)            (torch's own ``_zeropower_via_newtonschulz``, in bf16)
    W ← (1 − η·λ)·W − η·adjust(η, shape W)·O

B and U are elementwise and stay on this rank's pieces. NS needs the whole matrix: U's pieces are
gathered (:meth:`parallel.zero.partition.ZeroPartition.gather`: an all-gather over dp of each
ZeRO bucket holding a matrix, (N−1)/N·4·padded bytes, then an all-gather over tp of each split
matrix, (T−1)/T·4·numel bytes, reassembled in the unsplit order), every rank runs NS on the full
matrix (redundantly: no further traffic) and keeps its own piece of O. Every other tensor
(biases, norms: full ndim ≠ 2) gets torch's AdamW update with ``adamw_lr`` (default: lr),
``betas``, ``eps`` and ``adamw_weight_decay`` (default 0.01, torch's), scaled by the same schedule
as lr. The single-process reference is ``torch.optim.Muon`` on the 2-D parameters plus
``torch.optim.AdamW`` on the rest.
"""
from __future__ import annotations

import math

import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _adjust_lr, _zeropower_via_newtonschulz

from parallel.optim.tensorwise import TensorwiseOptimizer

__all__ = ["MuonAdamW"]


def _is_matrix(shape) -> bool:
    return len(shape) == 2


class MuonAdamW(TensorwiseOptimizer):
    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C), eps: float = EPS,
                 ns_steps: int = 5, adjust_lr_fn=None, adamw_lr=None, betas=(0.9, 0.999), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float = 0.01):
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"MuonAdamW: adjust_lr_fn={adjust_lr_fn!r} must be None, 'original' or 'match_rms_adamw'")
        if not (lr >= 0 and momentum >= 0 and weight_decay >= 0):
            raise ValueError(f"MuonAdamW: lr={lr}, momentum={momentum}, weight_decay={weight_decay} must be >= 0")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                                      adjust_lr_fn=adjust_lr_fn, adamw_lr=lr if adamw_lr is None else adamw_lr,
                                      betas=tuple(betas), adamw_eps=adamw_eps, adamw_weight_decay=adamw_weight_decay))
        self.base_lr = lr

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g = self.param_groups[0]
        ps = g["params"]
        part = self.partition
        is_mat = [_is_matrix(part.shape(j)) for j in range(len(ps))]
        updates = []
        for j, p in enumerate(ps):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if is_mat[j]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(grad, 1 - g["momentum"])
                updates.append(grad.lerp(buf, g["momentum"]) if g["nesterov"] else buf)
            else:
                updates.append(None)
                self._adamw(p, grad, g)
        full = part.gather(updates, _is_matrix)       # collective: every rank calls it, even with no matrix
        ortho = {j: _zeropower_via_newtonschulz(f, g["ns_coefficients"], g["ns_steps"], g["eps"])
                 for j, f in full.items()}
        lr = g["lr"]
        for j in full:
            o = part.local(j, ortho[j])
            ps[j].mul_(1 - lr * g["weight_decay"])
            ps[j].add_(o.reshape(ps[j].shape), alpha=-_adjust_lr(lr, g["adjust_lr_fn"], part.shape(j)))
        return loss

    def _adamw(self, p, grad, g) -> None:
        """torch's single-tensor AdamW (torch/optim/adam.py, decoupled weight decay)."""
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        lr = g["adamw_lr"] * (g["lr"] / self.base_lr if self.base_lr else 1.0)
        b1, b2 = g["betas"]
        st["step"] += 1
        t = float(st["step"])
        p.mul_(1 - lr * g["adamw_weight_decay"])
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        denom = (v.sqrt() / math.sqrt(c2)).add_(g["adamw_eps"])
        p.addcdiv_(m, denom, value=-lr / c1)
