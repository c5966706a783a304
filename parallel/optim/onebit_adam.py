"""1-bit Adam (Tang et al., "1-bit Adam: Communication Efficient Large-Scale Training with Adam's
Convergence Speed", arXiv 2102.02888), over ZeRO stage 0 (plain dp).

Warm-up, steps 1 … ``freeze_step``: Adam (bias-corrected, as torch's; decoupled ``weight_decay``)
on the dp-averaged gradient, which ZeRO's reducer all-reduces as usual. From then on the variance
v is frozen and the gradient is *not* all-reduced (``local_gradients`` tells ZeRO's reducer to keep
each rank's own gradient g_i); the momentum is communicated compressed instead:

    m_i = β1·m + (1−β1)·g_i                           (local momentum from the shared m)
    x_i = m_i + e_i;  C(x) = ‖x_k‖₂/√c · sign(x_k) per chunk k of c elements;  e_i ← x_i − C(x_i)
    server k (rank k, chunk k): y = (1/N)·Σ_i C(x_i)_k + e_s;  e_s ← y − C(y)
    m = [C(y)_0 … C(y)_{N−1}]  (all-gathered);        w ← w − η·(m̂/(√v̂ + ε) + λ·w)

with m̂ = m/(1−β1^t) and v̂ = v/(1−β2^T) frozen at T = freeze_step. In the compressed phase the
per-element step m̂/(√v̂ + ε) is clamped to ±R (``update_bound``; default R = max(1, (1−β1)/√(1−β2)),
Adam's own bound on |m̂/√v̂|, Kingma & Ba arXiv 1412.6980 §2.1; 3.16 for β = (0.9, 0.999)): an element
whose frozen v is ≈ 0 (a token never seen in warm-up) receives ±(its chunk's scale) from the sign
compression, and divided by √v̂ + ε ≈ ε that step is ~10⁵·η — on the char LM such elements reached
|w| ≈ 10³–10⁴. DeepSpeed has no such guard (its ``exp_avg_mask`` zeroes momenta the user lists);
a floor on √v̂ would need a per-tensor reduction at the freeze, the clamp is elementwise (identical
at every ZeRO stage). ``update_bound=None`` turns it off.

e_i is the worker error, e_s the server error (error feedback on both sides, §3 of the paper).
Signs travel packed 8 to a byte with one fp32 scale per chunk: an all-to-all of (N−1)/N·Ψ/8 bytes
to the servers and an all-gather of (N−1)/N·Ψ/8 bytes back, vs Adam's 2(N−1)/N·4Ψ: 1/32 of it,
plus 8(N−1) bytes of scales.

The compressed step runs as three fused elementwise passes and torch's row norms
(:mod:`parallel.optim.onebit_kernels`: C++ built once, bit-equal to the eager ops, which remain the
fallback): x = e_i + β1·m + (1−β1)·g_i; pack + worker error; server mean + error; unpack + update.

This class is the whole algorithm on one process or over ZeRO stage 0 (every rank holds m, v and the
master). Under ZeRO stages 1–2 its warm-up runs here on the owned pieces and the compressed phase in
:mod:`parallel.zero.onebit` (compressed reduce-scatter of the momentum, compressed all-gather of the
update). No gradient clipping. The step count is the pieces' ``step`` state; ``comm_state`` (the
error-feedback buffers) travels in ``state_dict()`` under ``"onebit_comm"``, so a resume is exact.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from parallel import comm
from parallel.optim import onebit_kernels as K

# the codec's primitives, re-exported here where callers have imported them from
from parallel.optim.onebit_codec import _compress, _decompressed_mean, _pack, _unpack, apply_step  # noqa: F401
from parallel.optim.tensorwise import TensorwiseOptimizer

__all__ = ["OneBitAdam", "compressed_mean", "apply_step"]

def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Row j of ``x`` to rank j; row i of the result from rank i. Counted as all_to_all, (N−1)/N·M."""
    out = torch.empty_like(x)
    n = x.numel() * x.element_size()
    group.stats.record(group.axis, "all_to_all", n, (group.size - 1) * n / group.size)
    dist.all_to_all_single(out, x.contiguous(), group=group.pg)
    return out


def compressed_mean(x: torch.Tensor, state: dict, group) -> torch.Tensor:
    """The compressed average of every rank's flat ``x`` with worker and server error feedback
    (``state`` keeps ``worker_error`` and ``server_error``); ``group`` None or size 1: one rank."""
    xp, N, c = _worker_buffer(x.numel(), state, group)
    xp[:x.numel()].add_(x)                             # x + e_w (the padding's error stays 0)
    packed, scale = _exchange(state, group, x.numel())
    out = torch.empty(x.numel())
    K.unpack_update(packed, scale, c, 0, out)
    return out


def _worker_buffer(n: int, state: dict, group):
    """(e_w, N, c): the worker error buffer [N·c] (created at zero), the ranks and the chunk (a multiple of 8:
    whole bytes of signs)."""
    N = group.size if group is not None else 1
    c = -(-n // (N * 8)) * 8
    if "worker_error" not in state:
        state["worker_error"] = torch.zeros(N * c)
        state["server_error"] = torch.zeros(c)
    return state["worker_error"], N, c


def _exchange(state: dict, group, n: int):
    """``state["worker_error"]`` holds x = m_i + e_i (the first n elements; 0 after): compress it per chunk
    (e_w ← x − C(x) in place), all-to-all, the server's mean with its error feedback, compress that
    (e_s ← y − C(y)) and all-gather: returns (packed signs [N, c/8], scales [N]) of m = [C(y)_0 … C(y)_{N−1}]."""
    xp = state["worker_error"]
    N = group.size if group is not None else 1
    c = xp.numel() // N
    scale = K.row_scale(xp.view(N, c))
    packed = torch.empty(N, c // 8, dtype=torch.uint8)
    K.pack_error(xp, scale, c, c, packed, xp, n)       # e_w ← x − C(x), in place; 0 past n
    if N > 1:
        packed, scale = _all_to_all(packed, group), _all_to_all(scale, group)
    y = torch.empty(c)
    K.server_mean(packed, scale, state["server_error"], y, c)
    s_scale = K.row_scale(y.view(1, c))
    s_packed = torch.empty(1, c // 8, dtype=torch.uint8)
    K.pack_error(y, s_scale, c, c, s_packed, state["server_error"], c)
    if N > 1:
        allp = torch.empty(N, c // 8, dtype=torch.uint8)
        comm.all_gather_into(allp.view(-1), s_packed[0], group)
        alls = torch.empty(N)
        comm.all_gather_into(alls, s_scale, group)
        s_packed, s_scale = allp, alls
    return s_packed, s_scale


def _clone(x):
    """A deep copy of nested dicts / lists of tensors (the error-feedback buffers)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


class OneBitAdam(TensorwiseOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 freeze_step: int = 100, update_bound: float | str | None = "adam"):
        if not (isinstance(freeze_step, int) and freeze_step >= 1):
            raise ValueError(f"OneBitAdam: freeze_step={freeze_step!r} must be an int >= 1 (Adam warm-up steps)")
        if update_bound == "adam":
            update_bound = max(1.0, (1 - betas[0]) / math.sqrt(1 - betas[1]))
        if update_bound is not None and not (isinstance(update_bound, (int, float)) and update_bound > 0):
            raise ValueError(f"OneBitAdam: update_bound={update_bound!r} must be a number > 0, 'adam' (Adam's bound "
                             f"max(1, (1-beta1)/sqrt(1-beta2))) or None (no clamp)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      freeze_step=freeze_step, update_bound=update_bound))
        self._t = 0
        self.comm_state: dict = {}

    @property
    def t(self) -> int:
        """Steps taken: the ``step`` state of the first piece that has one (what checkpoints restore)."""
        for p in self.param_groups[0]["params"]:
            s = self.state.get(p)
            if s and "step" in s:
                return int(s["step"])
        return self._t

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["onebit_comm"] = _clone(self.comm_state)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        comm_state = sd.pop("onebit_comm", {})
        super().load_state_dict(sd)
        self.comm_state = _clone(comm_state)
        self._t = self.t

    @property
    def local_gradients(self) -> bool:
        """True once the variance is frozen: the next step's gradients must not be all-reduced."""
        return self.t >= self.param_groups[0]["freeze_step"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g = self.param_groups[0]
        (b1, b2), lr, eps, wd = g["betas"], g["lr"], g["eps"], g["weight_decay"]
        compressed = self.local_gradients
        if compressed and getattr(self.partition, "partitioned", False):
            raise RuntimeError("OneBitAdam.step() in the compressed phase under ZeRO stages 1-2: ZeroOptimizer runs "
                               "that step (parallel.zero.onebit); call ZeroOptimizer.step(), not optimizer.step()")
        self._t = self.t + 1
        ps = g["params"]
        for p in ps:
            st = self.state[p]
            if not st:
                st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            st["step"] = torch.tensor(float(self._t))
            if compressed:
                continue                                   # the momentum is fused into the exchange below
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            st["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        T = min(self._t, g["freeze_step"])
        c1, c2 = 1 - b1 ** self._t, 1 - b2 ** T
        if compressed:
            self._compressed_step(ps, g, c1, c2)
            return loss
        for p in ps:
            st = self.state[p]
            if wd:
                p.mul_(1 - lr * wd)
            denom = (st["exp_avg_sq"].sqrt() / math.sqrt(c2)).add_(eps)
            apply_step(p, st["exp_avg"], denom, lr, c1, None)
        return loss

    def _compressed_step(self, ps, g: dict, c1: float, c2: float) -> None:
        """The compressed phase in three fused passes (:mod:`parallel.optim.onebit_kernels`): per tensor
        x = e_w + (β1·m + (1−β1)·g_i) into the worker buffer; the exchange (:func:`_exchange`); per tensor
        m = the decompressed mean, w·(1−ηλ), w ← w − η·clamp(m̂/(√v̂ + ε), ±R). Bit-equal to the eager ops."""
        (b1, _), lr, eps, wd = g["betas"], g["lr"], g["eps"], g["weight_decay"]
        n = sum(p.numel() for p in ps)
        group = getattr(self.partition, "dp", None)
        xp, N, c = _worker_buffer(n, self.comm_state, group)
        o = 0
        for p in ps:
            k, st = p.numel(), self.state[p]
            grad = p.grad.reshape(-1) if p.grad is not None else torch.zeros(k, dtype=p.dtype)
            K.momentum_error(xp[o:o + k], st["exp_avg"].reshape(-1), grad, xp[o:o + k], b1, 1 - b1)
            o += k
        packed, scale = _exchange(self.comm_state, group, n)
        o = 0
        for p in ps:
            k, st = p.numel(), self.state[p]
            m, v = st["exp_avg"], st["exp_avg_sq"]
            w = p.data
            mo = m.view(-1) if m.is_contiguous() else torch.empty(k)
            wo = w.view(-1) if w.is_contiguous() else w.reshape(-1).clone()
            K.unpack_update(packed, scale, c, o, mo, wo, v.reshape(-1), mode=0, sqrt_c2=math.sqrt(c2), eps=eps,
                            lr=lr, c1=c1, wd=(1 - lr * wd) if wd else None, bound=g.get("update_bound"))
            if mo.data_ptr() != m.data_ptr():
                m.copy_(mo.view_as(m))
            if wo.data_ptr() != w.data_ptr():
                w.copy_(wo.view_as(w))
            o += k
