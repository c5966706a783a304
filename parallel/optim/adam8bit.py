"""Adam / AdamW with 8-bit moments: block-wise quantization with the dynamic data type.

Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861, as bitsandbytes'
Adam8bit and torchao's AdamW8bit do it: each moment is kept as one uint8 code per element plus one
fp32 scale per block of ``block_size`` (256, torchao's default) consecutive elements of the flat
tensor. A block x is normalised by its scale s, and each x_j/s ∈ [−1, 1] is stored as the index of the
nearest of 256 code values q (:func:`dynamic_map`, the "dynamic tree" type of arXiv 1511.04561 and
§2.2 of the paper: a decimal exponent 10^−6 … 10^0 and a linear fraction whose resolution grows with
the exponent, so relative precision holds over seven decades). The first moment m uses the signed map
(127 negative values, 0, 128 positive values up to 1), the second moment v the unsigned one (256
values in [0, 1]): v ≥ 0 stays ≥ 0, and small v, which sets the largest updates, keeps ~2 significant
digits down to 10^−6 of its block's maximum (the reason the paper uses the dynamic type, not linear
int8, for v). Per step and tensor (as the fused kernels do, on a temporary fp32 copy):

    m, v ← deq(m_q), deq(v_q);   m ← β1·m + (1−β1)·g;   v ← β2·v + (1−β2)·g²
    p ← p − η·(m/(1−β1^t)) / (√(v/(1−β2^t)) + ε)  [− η·λ·p decoupled (AdamW) | g += λ·p (Adam)]
    m_q, v_q ← quant(m), quant(v)

One deviation, stated: the scale is the block's *signed* extremum (x at argmax |x|), not |x|max, so
that the extremum always lands on the code +1 — then deq ∘ quant ∘ deq = deq exactly and a checkpoint
holding dequantized fp32 moments (the reshardable formats) resumes bit-exactly. Bytes per moment
element: 1 + 4/block_size (1.016: the moments take 1/3.94 of fp32's).

``dequantized(write_back)`` swaps the state for fp32 ``exp_avg``/``exp_avg_sq`` (what checkpoints
and ZeRO's full state dict read and write); on exit the quantized state is restored, or (write_back)
re-made from what was loaded. A state holding fp32 moments (loaded from an fp32 Adam checkpoint) is
quantized at the next step.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["Adam8bit", "dynamic_map", "quantize", "dequantize"]


def dynamic_map(signed: bool) -> torch.Tensor:
    """256 sorted code values: 0, 1 and, for each decade 10^(k−6), k = 0 … 6, the midpoints of an even
    split of [0.1, 1]·10^(k−6) into 2^k (signed, mirrored to the negatives) or 2^(k+1) (unsigned) parts."""
    vals = [0.0, 1.0]
    for k in range(7):
        parts = 2 ** k if signed else 2 ** (k + 1)
        edges = torch.linspace(0.1, 1.0, parts + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)).tolist()
        vals += mids + ([-x for x in mids] if signed else [])
    out = torch.tensor(sorted(vals), dtype=torch.float32)
    assert out.numel() == 256
    return out


_MAPS = {s: dynamic_map(s) for s in (True, False)}
_MIDS = {s: (m[1:] + m[:-1]) / 2 for s, m in _MAPS.items()}
_TABLES: dict = {}


def _table(signed: bool, device) -> tuple:
    """(first code of each float32 bin, midpoints padded with +inf) for :func:`_codes`, on ``device``.

    A bin is the 2^16 float32 values sharing their top 16 bits (sign, exponent, 7 mantissa bits: relative
    width ≤ 2^−7, finer than the map's closest codes, 0.9/64 apart at the top decade), so at most one
    midpoint falls inside a bin (asserted when the table is built): the code of x is the code of its bin's
    lower end, plus one if x lies above that midpoint. Non-finite bins map to the code of 0."""
    key = (signed, str(device))
    if key not in _TABLES:
        mids = _MIDS[signed]
        top = torch.arange(1 << 16, dtype=torch.int64) << 16
        ends = [(top | low).sub_((top >= 1 << 31).long() << 32).to(torch.int32).view(torch.float32)
                for low in (0, 0xFFFF)]
        lo, hi = torch.minimum(*ends), torch.maximum(*ends)
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        first = torch.bucketize(torch.where(finite, lo, 0.0), mids)
        last = torch.bucketize(torch.where(finite, hi, 0.0), mids)
        assert int((last - first).max()) <= 1, "a float32 bin spans two code boundaries"
        _TABLES[key] = (first.int().to(device), torch.cat([mids, torch.tensor([float("inf")])]).to(device))
    return _TABLES[key]


def _codes(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 index of the nearest map value of each element of flat fp32 ``x`` (finite): equal to
    ``torch.bucketize(x, mids)``, by table (:func:`_table`) — ~50× faster on CPU."""
    first, mids = _table(signed, x.device)
    code = first.index_select(0, (x.view(torch.int32) >> 16) & 0xFFFF)
    return code.to(torch.uint8).add_(mids.index_select(0, code).lt(x).view(torch.uint8))


def quantize(x: torch.Tensor, signed: bool, block_size: int = 256):
    """Flat ``x`` → (uint8 codes [n], fp32 signed-extremum scales [⌈n/block_size⌉])."""
    x = x.reshape(-1).float()
    n = x.numel()
    pad = -n % block_size
    blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, block_size) if pad else x.reshape(-1, block_size)
    idx = blocks.abs().argmax(1, keepdim=True)
    scale = blocks.gather(1, idx).squeeze(1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    normed = (blocks / scale.unsqueeze(1)).reshape(-1)[:n]
    codes = _codes(normed.contiguous(), signed)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, signed: bool, block_size: int = 256) -> torch.Tensor:
    n = codes.numel()
    vals = _MAPS[signed].to(codes.device).index_select(0, codes.reshape(-1).int())
    if n % block_size:
        vals = torch.nn.functional.pad(vals, (0, -n % block_size))
    vals = vals.view(-1, block_size) * scale.unsqueeze(1)
    return vals.reshape(-1)[:n]


class Adam8bit(torch.optim.Optimizer):
    """``Adam8bit(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, decoupled=True,
    block_size=256)``: AdamW (decoupled) or Adam (L2 into the gradient) with 8-bit moments."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled: bool = True, block_size: int = 256):
        if not (isinstance(block_size, int) and block_size >= 8):
            raise ValueError(f"Adam8bit: block_size={block_size!r} must be an int >= 8 (256 is the usual)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      decoupled=decoupled, block_size=block_size))

    def _moments(self, st: dict, B: int):
        if "exp_avg" in st:                                   # fp32 moments (a checkpoint): adopt them
            return st.pop("exp_avg").reshape(-1).float(), st.pop("exp_avg_sq").reshape(-1).float()
        return (dequantize(st["exp_avg_q"], st["exp_avg_scale"], True, B),
                dequantize(st["exp_avg_sq_q"], st["exp_avg_sq_scale"], False, B))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            (b1, b2), lr, eps, wd, B = g["betas"], g["lr"], g["eps"], g["weight_decay"], g["block_size"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    z = torch.zeros(p.numel(), device=p.device)
                    m, v = z, z.clone()
                else:
                    m, v = self._moments(st, B)
                st["step"] += 1
                t = float(st["step"])
                grad = p.grad.reshape(-1).float()
                if wd and not g["decoupled"]:
                    grad = grad.add(p.reshape(-1), alpha=wd)
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                if wd and g["decoupled"]:
                    p.mul_(1 - lr * wd)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                p.add_((m / denom).view_as(p), alpha=-lr / (1 - b1 ** t))
                st["exp_avg_q"], st["exp_avg_scale"] = quantize(m, True, B)
                st["exp_avg_sq_q"], st["exp_avg_sq_scale"] = quantize(v, False, B)
        return loss

    @contextlib.contextmanager
    def dequantized(self, write_back: bool = False):
        """The state as fp32 ``exp_avg``/``exp_avg_sq`` (shaped like the param) for the duration."""
        saved = {}
        for g in self.param_groups:
            B = g["block_size"]
            for p in g["params"]:
                st = self.state.get(p)
                if st and "exp_avg_q" in st:
                    saved[p] = dict(st)
                    m, v = self._moments(st, B)
                    self.state[p] = {"step": st["step"], "exp_avg": m.view_as(p), "exp_avg_sq": v.view_as(p)}
        try:
            yield
        finally:
            if not write_back:
                for p, st in saved.items():
                    self.state[p] = st
            else:
                for g in self.param_groups:
                    for p in g["params"]:
                        st = self.state.get(p)
                        if st and "exp_avg" in st:
                            m, v = self._moments(st, g["block_size"])
                            st["exp_avg_q"], st["exp_avg_scale"] = quantize(m, True, g["block_size"])
                            st["exp_avg_sq_q"], st["exp_avg_sq_scale"] = quantize(v, False, g["block_size"])
                            st["step"] = torch.as_tensor(st.get("step", 0.0), dtype=torch.float32)
