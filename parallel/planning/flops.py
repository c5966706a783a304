"""Model FLOPs per step and model FLOPs utilisation (MFU).

Convention (Kaplan et al., arXiv 2001.08361 §2.1; Chowdhery et al., PaLM, arXiv 2204.02311
App. B; Narayanan et al., arXiv 2104.04473 §5.1): a training step costs, per token,

    6·N + 12·L·h·s        FLOPs (one multiply-add = 2 FLOPs)

* N counts the parameters that take part in a matmul: every Linear weight of the blocks and the
  output head (lm_head, V·h, also when it is tied to the input embedding). Embedding lookups,
  biases, norms and activations are not matmuls and are left out. Forward 2·N per token,
  backward 4·N (the input gradient and the weight gradient).
* 12·L·h·s is attention's two batched matmuls (Q·Kᵀ and P·V, 2·2·s·h per token per layer
  forward, twice that backward), counted over the full s×s square — causal masking is not
  credited, as torch.utils.flop_counter.FlopCounterMode does not credit it either.

For our GPT (examples/gpt.py, 4h MLP): N = L·(4h² + 8h²) + V·h = 12·L·h² + V·h. The same number
comes out of :func:`count_training_flops`, which runs forward + backward under FlopCounterMode
(matmul FLOPs only); the CPU kernel of scaled_dot_product_attention is not in FlopCounterMode's
table, so we register it: forward with torch's SDPA formula, backward as twice the forward (the
flash kernel's recomputation of Q·Kᵀ is not a model FLOP). On a meta-device copy of the model
(``engine.template``) that count costs no memory and no time.

MFU (PaLM App. B) = model FLOPs per step / (step seconds · devices · peak FLOP/s per device).
Recomputation (ZB-H1's W re-walk, activation checkpointing) is not model FLOPs and is not counted.
Peak: an explicit value, the ``P3D_PEAK_FLOPS`` environment variable, the data-sheet figure of a
known GPU, or else the best measured matmul rate of this device (:func:`measure_matmul_flops`).
"""
from __future__ import annotations

import copy
import os
import time

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter as fc
from torch.utils.flop_counter import FlopCounterMode

from parallel.loss import logits_of

__all__ = ["gpt_matmul_params", "flops_per_token", "gpt_flops_per_token", "count_training_flops",
           "measure_matmul_flops", "peak_flops", "mfu", "GPU_PEAK_FLOPS"]

# Dense peak FLOP/s from vendors' data sheets (no sparsity): {name fragment: {dtype: flops}}.
GPU_PEAK_FLOPS = {
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
    "L4": {torch.bfloat16: 121e12, torch.float16: 121e12, torch.float32: 30.3e12},
}


def gpt_matmul_params(n_layer: int, hidden: int, vocab: int, ffn: int | None = None,
                      kv_hidden: int | None = None, mlp_matrices: int = 2) -> int:
    """N of a GPT-style decoder: per layer q, k, v, o (k and v of width ``kv_hidden`` under
    grouped-query attention) and ``mlp_matrices`` h×ffn matrices (2: fc/proj, 3: SwiGLU); plus the
    V·h head. ``ffn`` defaults to 4h, ``kv_hidden`` to h."""
    ffn = 4 * hidden if ffn is None else ffn
    kv = hidden if kv_hidden is None else kv_hidden
    return n_layer * (2 * hidden * hidden + 2 * hidden * kv + mlp_matrices * hidden * ffn) + vocab * hidden


def flops_per_token(n_matmul_params: int, n_layer: int, hidden: int, seq_len: int) -> int:
    """Training FLOPs per token: 6·N + 12·L·h·s (forward + backward, see the module docstring)."""
    return 6 * n_matmul_params + 12 * n_layer * hidden * seq_len


def gpt_flops_per_token(n_layer: int, hidden: int, seq_len: int, vocab: int, **kw) -> int:
    """6·N + 12·L·h·s for the GPT of examples/gpt.py (``kw`` as :func:`gpt_matmul_params`)."""
    return flops_per_token(gpt_matmul_params(n_layer, hidden, vocab, **kw), n_layer, hidden, seq_len)


# --- counting with torch.utils.flop_counter --------------------------------------------------------

def _cpu_sdpa_mapping() -> dict:
    """FlopCounterMode formulas for the CPU flash-attention kernels (absent from torch's table)."""
    aten = torch.ops.aten
    out = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        out[fwd] = lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)
    if bwd is not None:
        # dQ, dK, dV and dP: twice the forward. torch's flash formula adds the recomputed Q·Kᵀ
        # (2.5×), which is recomputation, not model FLOPs; the meta (math) path counts 2× as well.
        out[bwd] = lambda g, q, k, v, *a, out_shape=None, **kw: 2 * fc.sdpa_flop_count(q, k, v)
    return out


def count_training_flops(model: nn.Module, sample, loss_fn=None, backward: bool = True) -> int:
    """FLOPs of one forward (+ backward) of ``model`` on ``sample``, counted by FlopCounterMode.

    ``loss_fn(output) -> scalar`` (default: the sum of the output tensor: a loss adds no matmul).
    The model may live on the meta device (e.g. ``engine.template``): then ``sample`` is moved to
    meta too and nothing is computed, only shapes. The model's gradients are left untouched when
    it is on the meta device; on a real device they accumulate (zero them afterwards). A meta model
    whose buffers are real (BatchNorm running statistics, as in a ``meta_copy`` template) is counted
    on a copy with its buffers on meta too, so the template's buffers are not updated."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_training_flops needs an nn.Module, got {type(model).__name__}")
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dev.type == "meta" and any(not b.is_meta for b in model.buffers()):
        model = copy.deepcopy(model).to("meta")
    if isinstance(sample, torch.Tensor):
        sample = sample.to(dev)
    was = model.training
    model.train(backward)

    def count() -> int:
        with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as counter:
            out = logits_of(model(sample))
            if backward:
                loss = loss_fn(out) if loss_fn is not None else out.float().sum()
                loss.backward()
        return int(counter.get_total_flops())
    try:
        try:
            return count()
        except RuntimeError as e:
            # A forward that reads a value (transformers' packed-sequence check on the position ids,
            # ``(mask[:, -1] == 0).all()``) cannot run on meta tensors; under FakeTensorMode it skips that
            # check (``is_tracing``) and the shapes — hence the counts — are the same as on a real device.
            if dev.type != "meta" or "meta tensors" not in str(e):
                raise
            with FakeTensorMode(allow_non_fake_inputs=True):
                return count()
    finally:
        model.train(was)
        if dev.type == "meta":
            for p in model.parameters():
                p.grad = None


# --- peak and utilisation --------------------------------------------------------------------------

def measure_matmul_flops(device=None, dtype=torch.float32, n: int = 512, seconds: float = 0.2) -> float:
    """Best observed FLOP/s of an n×n @ n×n matmul on ``device`` (a practical peak for MFU on a CPU,
    at the current thread count). Runs for about ``seconds``."""
    device = torch.device(device or "cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds or best == float("inf"):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def peak_flops(device=None, dtype=torch.float32, override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): ``override``, then ``$P3D_PEAK_FLOPS``, then the
    data sheet of a known CUDA device, then :func:`measure_matmul_flops`."""
    if override:
        return float(override), "config"
    env = os.environ.get("P3D_PEAK_FLOPS")
    if env:
        try:
            return float(env), "P3D_PEAK_FLOPS"
        except ValueError:
            raise ValueError(f"P3D_PEAK_FLOPS={env!r} is not a number: give FLOP/s per device, e.g. 989e12") from None
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in GPU_PEAK_FLOPS.items():
            if key in name and dtype in table:
                return table[dtype], f"data sheet ({name})"
    return measure_matmul_flops(device, dtype), f"measured {dtype} matmul on {device.type}"


def mfu(flops_per_step: float | None, step_s: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: flops_per_step / (step_s · n_devices · peak)."""
    if not flops_per_step or not peak or step_s <= 0 or n_devices < 1:
        return None
    return flops_per_step / (step_s * n_devices * peak)
