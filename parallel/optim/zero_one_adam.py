"""0/1 Adam (Lu et al., "Maximizing Communication Efficiency for Large-scale Training via 0/1 Adam",
arXiv 2202.06009), over dp and ZeRO stages 1–2 (:mod:`parallel.zero.zero_one`).

Two policies replace 1-bit Adam's single freeze (:mod:`parallel.optim.onebit_adam`):

* **Adaptive variance freezing** (T_v). The variance v is updated only on the steps of T_v: the first κ
  steps (``var_update_scaler``), then κ steps at every 2nd step, κ at every 4th, … — the interval doubles
  after every κ updates — and never after ``var_freeze_step`` V (DeepSpeed's counter rule, on our step
  numbers). On a step of T_v the gradient is all-reduced in full precision (Adam's traffic) and both
  moments are updated; on the other steps t ≤ V the gradient travels 1-bit (sign + one scale per chunk,
  worker and server error feedback: :func:`parallel.optim.onebit_adam.compressed_mean`) into m only:

      t ∈ T_v:       ḡ = (1/N)Σ_i g_i;  m ← β1·m + (1−β1)·ḡ;  v ← β2·v + (1−β2)·ḡ²
      t ≤ V, ∉ T_v:  ḡ = C-mean(g_i);   m ← β1·m + (1−β1)·ḡ
      both:          w ← w·(1−ηλ) − η·clamp(m̂/(√v̂+ε), ±R)

  (no clamp while every step so far was in T_v: that is Adam, whose |m̂/√v̂| stays within R anyway; once m
  holds a compressed gradient, an element with v ≈ 0 would get ±(chunk scale)/ε — the clamp stays on.)

* **Local steps** (T_u), after V: v is frozen and ranks step on their own gradient without communicating;
  every H_t steps (``local_step_interval``: 1 for the first ``local_step_scaler`` steps after V, then 2, 4, …
  up to ``local_step_clipper``; a step t syncs when t % H_t == 0) the accumulated update is exchanged 1-bit:

      local:  m_i ← β1·m_i + (1−β1)·g_i;  u_i ← u_i + η·clamp(m̂_i/(√v̂+ε), ±R);  Λ ← Λ + η;  b ← b·(1−ηλ)
              w_i = b − u_i                                       (b: the synced weights, the same everywhere)
      sync:   y = C-mean(u_i·(√v̂+ε));  b ← b − clamp(y/(√v̂+ε), ±R·Λ);  m ← (1−β1^t)·y/Λ;  u_i, Λ ← 0;  w = b

  so the replicas are bit-identical after every sync; the error buffers restart at the freeze (they held
  gradient error, now they hold update error — DeepSpeed does the same).

m̂ = m/(1−β1^t) and v̂ = v/(1−β2^{|T_v ∩ [1, t]|}) with ``bias_correction`` (default; torch Adam's
form, so when every step is in T_v — V and κ at least the run's steps — this is torch AdamW bit for bit);
``bias_correction=False`` uses m and v as they are, as DeepSpeed's ZeroOneAdam does (it accepts the flag
and ignores it). DeepSpeed also spends its first step on buffer set-up (no update); we do not. R is
1-bit Adam's ``update_bound`` (elements whose v is ≈ 0 would otherwise take ±(chunk scale)/ε steps).

Wire bytes per step, dp N, Ψ elements: T_v steps Adam's 2(N−1)/N·4Ψ; other steps up to V, and sync
steps after it, 1-bit Adam's (N−1)/N·(2·N·c/8 + 8N) (c = 8⌈Ψ/8N⌉); local steps 0 — plus ZeRO's 8-byte
norm all-reduce every step. State: m, v as Adam; after V also b and u (4Ψ each) and Λ; plus the
error-feedback buffers 4(N·c + c) (``comm_state``). Refused: ZeRO-3, tp, fp16, grad_clip (as 1-bit Adam).
"""
from __future__ import annotations

import math

import torch

from parallel import comm
from parallel.optim.onebit_adam import OneBitAdam, apply_step, compressed_mean

__all__ = ["ZeroOneAdam", "var_schedule", "local_interval", "zero_one_step"]


def var_schedule(t: int, kappa: int) -> tuple[bool, int]:
    """(t ∈ T_v, |T_v ∩ [1, t]|): κ updates at interval 1, then κ at interval 2, 4, … (multiples of it)."""
    interval, start, count = 1, 1, 0
    while True:
        first = -(-start // interval) * interval             # the first multiple of the interval ≥ start
        last = first + (kappa - 1) * interval
        if t <= last:
            done = 0 if t < first else (t - first) // interval + 1
            return t >= first and t % interval == 0, count + done
        count += kappa
        start, interval = last + 1, interval * 2


def local_interval(t: int, var_freeze_step: int, scaler: int, clipper: int) -> int:
    """H_t for a step t > V: 1 for the first ``scaler`` steps after V, then doubling every ``scaler`` steps,
    at most ``clipper``."""
    return min(clipper, 2 ** ((t - var_freeze_step - 1) // scaler))


def zero_one_step(w, g, S: dict, errs: dict, t: int, hp: dict, group) -> None:
    """One 0/1 Adam step on flat fp32 tensors (module docstring), in place: ``w`` this rank's weights, ``g`` its
    own (local) gradient, ``S`` {exp_avg, exp_avg_sq[, base, accum, lrs]} (created at the freeze), ``errs`` the
    error-feedback buffers, ``group`` the dp group (None: one process). Every rank calls it at the same t."""
    (b1, b2), lr, eps, wd, V = hp["betas"], hp["lr"], hp["eps"], hp["weight_decay"], hp["var_freeze_step"]
    bc, R = hp["bias_correction"], hp["update_bound"]
    is_var, nv = var_schedule(min(t, V), hp["var_update_scaler"])
    is_var = is_var and t <= V
    c1 = 1 - b1 ** t if bc else 1.0
    c2 = 1 - b2 ** nv if bc else 1.0
    m, v = S["exp_avg"], S["exp_avg_sq"]
    N = group.size if group is not None else 1
    if t <= V:
        if is_var:
            if N > 1:                                        # as ZeRO's reducer: divide, then sum
                g = comm.all_reduce(g.div(N), group)
            m.lerp_(g, 1 - b1)                               # torch Adam's own ops, bit for bit
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
        else:
            m.mul_(b1).add_(compressed_mean(g, errs, group), alpha=1 - b1)
        if wd:
            w.mul_(1 - lr * wd)
        exact = nv == t                                      # m holds no compressed gradient yet: Adam's own step
        apply_step(w, m, v.sqrt().div_(math.sqrt(c2)).add_(eps), lr, c1, None if exact else R)
        return
    if "base" not in S:                                      # the freeze: b = w, u = 0, fresh error buffers
        S["base"], S["accum"], S["lrs"] = w.clone(), torch.zeros_like(w), torch.zeros((), dtype=torch.float64)
        errs.clear()
    base, accum = S["base"], S["accum"]
    denom = v.sqrt().div_(math.sqrt(c2)).add_(eps)
    m.mul_(b1).add_(g, alpha=1 - b1)
    s = m.div(denom).div_(c1)
    if R is not None:
        s.clamp_(-R, R)
    accum.add_(s, alpha=lr)
    S["lrs"] += lr
    if wd:
        base.mul_(1 - lr * wd)
    if t % local_interval(t, V, hp["local_step_scaler"], hp["local_step_clipper"]):
        torch.sub(base, accum, out=w)
        return
    lam = float(S["lrs"])
    y = compressed_mean(accum.mul(denom), errs, group)
    step = y / denom
    if R is not None:
        step.clamp_(-R * lam, R * lam)
    base.sub_(step)
    m.copy_(y).mul_(c1 / lam)
    accum.zero_()
    S["lrs"].zero_()
    w.copy_(base)


class ZeroOneAdam(OneBitAdam):
    """0/1 Adam (module docstring). DeepSpeed's keys and defaults: ``var_freeze_step`` 100000,
    ``var_update_scaler`` 16, ``local_step_scaler`` 32678, ``local_step_clipper`` 16."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 var_freeze_step: int = 100000, var_update_scaler: int = 16, local_step_scaler: int = 32678,
                 local_step_clipper: int = 16, bias_correction: bool = True,
                 update_bound: float | str | None = "adam"):
        for k, x in (("var_freeze_step", var_freeze_step), ("var_update_scaler", var_update_scaler),
                     ("local_step_scaler", local_step_scaler), ("local_step_clipper", local_step_clipper)):
            if not (isinstance(x, int) and not isinstance(x, bool) and x >= 1):
                raise ValueError(f"ZeroOneAdam: {k}={x!r} must be an int >= 1")
        if not isinstance(bias_correction, bool):
            raise ValueError(f"ZeroOneAdam: bias_correction={bias_correction!r} must be true or false")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, freeze_step=var_freeze_step,
                         update_bound=update_bound)
        g = self.param_groups[0]
        g.pop("freeze_step")
        g.update(var_freeze_step=var_freeze_step, var_update_scaler=var_update_scaler,
                 local_step_scaler=local_step_scaler, local_step_clipper=local_step_clipper,
                 bias_correction=bias_correction)
        self.defaults = {k: v for k, v in g.items() if k != "params"}

    @property
    def local_gradients(self) -> bool:
        """Always: the optimizer communicates (full all-reduce on T_v steps, 1-bit otherwise, nothing locally)."""
        return True

    def whole_state(self) -> dict:
        """This rank's state as whole flats {exp_avg, exp_avg_sq[, base, accum, lrs]} (stage 0's order), kept in
        ``comm_state["S"]``: m and u are per rank during local steps, so the per-rank file of a checkpoint
        carries them. Rebuilt from the pieces' state after a load that did not restore it (zeros when fresh)."""
        S = self.comm_state.get("S")
        if S is not None:
            return S
        ps = self.param_groups[0]["params"]
        st0 = self.state.get(ps[0], {}) if ps else {}
        keys = [k for k in ("exp_avg", "exp_avg_sq", "base", "accum") if k in st0] or ["exp_avg", "exp_avg_sq"]
        S = {k: torch.cat([self.state[p][k].reshape(-1) if k in self.state.get(p, {}) else
                           torch.zeros(p.numel()) for p in ps]).float() if ps else torch.zeros(0) for k in keys}
        if "base" in S:
            S["lrs"] = torch.as_tensor(st0.get("lrs", 0.0), dtype=torch.float64).clone().reshape(())
        self.comm_state["S"] = S
        return S

    def bind_views(self) -> None:
        """Each piece's state as views of the whole flats (stage 0: no second copy; checkpoints see pieces)."""
        S, o = self.whole_state(), 0
        for p in self.param_groups[0]["params"]:
            n, st = p.numel(), self.state[p]
            for k in ("exp_avg", "exp_avg_sq", "base", "accum"):
                if k in S:
                    st[k] = S[k][o:o + n].view_as(p)
            if "lrs" in S:
                st["lrs"] = S["lrs"]
            o += n

    def local_weights(self) -> torch.Tensor | None:
        """w_i = b − u_i once local steps began (None before the freeze)."""
        S = self.comm_state.get("S", {})
        return torch.sub(S["base"], S["accum"]) if "base" in S else None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if getattr(self.partition, "partitioned", False):
            raise RuntimeError("ZeroOneAdam.step() under ZeRO stages 1-2: ZeroOptimizer runs that step "
                               "(parallel.zero.zero_one); call ZeroOptimizer.step(), not optimizer.step()")
        g = self.param_groups[0]
        self._t = t = self.t + 1
        ps = g["params"]
        S = self.whole_state()
        w = torch.cat([p.reshape(-1) for p in ps]) if ps else torch.zeros(0)
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]) \
            if ps else torch.zeros(0)
        zero_one_step(w, grad, S, self.comm_state.setdefault("errs", {}), t, g, getattr(self.partition, "dp", None))
        self.bind_views()
        o = 0
        for p in ps:
            p.copy_(w[o:o + p.numel()].view_as(p))
            self.state[p]["step"] = torch.tensor(float(t))
            o += p.numel()
        return loss
