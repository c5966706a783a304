"""The fastest CPU AdamW available here, chosen by measurement (ZeRO-Offload's CPU step).

ZeRO-Offload (Ren et al., arXiv 2101.06840, §4.2) makes the CPU step cheap with a SIMD, multi-threaded
Adam. The same update (AdamW, Loshchilov & Hutter, arXiv 1711.05101), per element, at step t:

    p ← p − lr·λ·p
    m ← β1·m + (1 − β1)·g            v ← β2·v + (1 − β2)·g²
    p ← p − lr · (m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + ε)

is offered by torch three ways (single-tensor loop, ``foreach`` multi-tensor, ``fused`` kernel —
fused runs on CPU since torch 2.4) and by DeepSpeed's ``DeepSpeedCPUAdam`` op when the
``deepspeed`` extra is installed. :func:`fastest_cpu_adamw` times each on a representative
partition (interleaved rounds, median; well under a second) and caches the winner per process.
All candidates compute the same update; they agree to ~1e-7 relative (the fused kernel and
DeepSpeed's op order the arithmetic differently), which the tests check.

An :class:`AdamWKernel` is both a factory (``kernel(params, lr=…)`` → a torch optimizer) and a
functional step over explicit state tensors, which is what a streamed, offloaded optimizer
needs: the state lives in the store, not in ``optimizer.state``.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch.optim.adam import adam as _adam

__all__ = ["AdamWKernel", "cpu_adamw_candidates", "fastest_cpu_adamw"]

_CACHE: dict = {}


@dataclass
class AdamWKernel:
    """One implementation of AdamW. ``name`` ∈ {torch-single, torch-foreach, torch-fused, deepspeed}."""
    name: str
    options: dict = field(default_factory=dict)
    measured_s: dict = field(default_factory=dict)    # filled on the chosen kernel: name → median step time
    skipped: dict = field(default_factory=dict)       # name → why it was not a candidate

    def __call__(self, params, **kwargs) -> torch.optim.Optimizer:
        """Build an optimizer over ``params`` (torch.optim.AdamW keyword arguments)."""
        if self.name == "deepspeed":
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
        return torch.optim.AdamW(params, **self.options, **kwargs)

    def step(self, params, grads, exp_avgs, exp_avg_sqs, steps, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
             weight_decay=1e-2, decoupled: bool = True) -> None:
        """One AdamW step, in place, on lists of tensors; ``steps`` are float32 scalar tensors, each
        incremented by one (torch's convention for optimizer state). ``decoupled=False`` is Adam with
        L2 regularisation (g ← g + λ·p), torch.optim.Adam's ``weight_decay``."""
        if self.name == "deepspeed" and (decoupled or not weight_decay):
            return self._ds_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas, eps, weight_decay)
        opts = self.options if self.name != "deepspeed" else {}
        _adam(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), [], list(steps),
              foreach=opts.get("foreach"), fused=opts.get("fused"),
              decoupled_weight_decay=decoupled, amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr,
              weight_decay=weight_decay, eps=eps, maximize=False)

    def _ds_step(self, params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas, eps, weight_decay):
        # DeepSpeedCPUAdam keeps state in optimizer.state; lend it the store's tensors for one step.
        opt = self.options.get("_opt")
        if opt is None:
            opt = self.options["_opt"] = self([torch.nn.Parameter(torch.zeros(1))], lr=lr, betas=betas, eps=eps,
                                             weight_decay=weight_decay)
        group = opt.param_groups[0]
        group.update(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            w = torch.nn.Parameter(p, requires_grad=False)      # shares p's storage
            w.grad = g
            group["params"] = [w]
            opt.state.clear()
            opt.state[w] = {"step": int(s.item()), "exp_avg": m, "exp_avg_sq": v}
            opt.step()
            s.fill_(float(opt.state[w]["step"]))
        opt.state.clear()


def cpu_adamw_candidates() -> tuple[list[AdamWKernel], dict]:
    """The AdamW implementations usable on this machine, and why any others were left out."""
    kernels = [AdamWKernel("torch-single", {"foreach": False, "fused": False}),
               AdamWKernel("torch-foreach", {"foreach": True, "fused": False})]
    skipped = {}
    try:
        p = torch.zeros(4, requires_grad=True)
        p.grad = torch.ones(4)
        torch.optim.AdamW([p], fused=True).step()
        kernels.append(AdamWKernel("torch-fused", {"fused": True}))
    except (RuntimeError, ValueError) as e:
        skipped["torch-fused"] = f"fused AdamW unavailable on CPU: {e}"
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: F401
        k = AdamWKernel("deepspeed")
        k.step([torch.zeros(4)], [torch.ones(4)], [torch.zeros(4)], [torch.zeros(4)], [torch.zeros(())])
        kernels.append(k)
    except Exception as e:                                     # noqa: BLE001 - any import/build failure
        skipped["deepspeed"] = f"DeepSpeedCPUAdam unavailable: {type(e).__name__}: {e}"[:300]
    return kernels, skipped


def fastest_cpu_adamw(numel: int = 1 << 20, rounds: int = 5, budget_s: float = 0.5,
                      refresh: bool = False) -> AdamWKernel:
    """Time one AdamW step of each candidate on a ``numel``-element fp32 partition (split in four
    tensors, like sub-groups) over up to ``rounds`` interleaved rounds after a warm-up, stopping
    early once ``budget_s`` is spent (at least one timed round); return the fastest (median), cached
    per process and ``numel``. The result carries ``measured_s`` and ``skipped``."""
    if not refresh and numel in _CACHE:
        return _CACHE[numel]
    kernels, skipped = cpu_adamw_candidates()
    gen = torch.Generator().manual_seed(0)
    sizes = [numel // 4] * 3 + [numel - 3 * (numel // 4)]
    state = {k.name: ([torch.randn(n, generator=gen) for n in sizes], [torch.zeros(n) for n in sizes],
                      [torch.zeros(n) for n in sizes], [torch.zeros(()) for _ in sizes]) for k in kernels}
    grads = [torch.randn(n, generator=gen) for n in sizes]
    times: dict = {k.name: [] for k in kernels}
    start = time.perf_counter()
    for r in range(rounds + 1):
        if r > 1 and time.perf_counter() - start > budget_s:
            break
        for k in kernels:
            p, m, v, s = state[k.name]
            t0 = time.perf_counter()
            k.step(p, grads, m, v, s)
            if r:                                               # round 0 warms up
                times[k.name].append(time.perf_counter() - t0)
    measured = {name: statistics.median(ts) for name, ts in times.items()}
    best = min(kernels, key=lambda k: measured[k.name])
    best.measured_s, best.skipped = measured, skipped
    _CACHE[numel] = best
    return best
