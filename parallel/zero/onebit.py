"""1-bit Adam's compressed phase inside ZeroOptimizer: stage 0, and stages 1–2 on the ZeRO partition.

Tang et al., "1-bit Adam", arXiv 2102.02888: after ``freeze_step`` Adam steps the variance v is frozen
and Adam's update is linear in the momentum, so the momentum can travel sign-compressed with error
feedback. Stage 0 is :class:`parallel.optim.onebit_adam.OneBitAdam`'s own step (every rank holds the
whole m, v and master). This module adds, for both, the per-rank non-finite check (one all-reduce of
8 bytes: every rank sees the same verdict, none hangs in a compressed collective another rank skipped),
and for stages 1–2 the same algorithm with the chunks aligned to the ZeRO partition: rank k owns shard
k of every bucket (v, the master, and it is the server of chunk k):

    at the freeze step, once: all-gather the owners' m and √v̂ = √v/√(1−β2^T) (fp32, frozen)
    worker i (whole bucket, its own gradient g_i; m, e_i and √v̂ of the full bucket size):
        x_i = β1·m + (1−β1)·g_i + e_i;  row k → C(row) = ‖row‖/√c · sign(row);  e_i ← x_i − C(x_i)
        all-to-all: row k to its owner k               (compressed reduce-scatter: (N−1)/N·Ψ/8 bytes)
    owner k:  y = (1/N)·Σ_i C(x_i)_k + e_s;  e_s ← y − C(y)   (server error feedback, shard-sized)
        all-gather C(y)                                (compressed all-gather: (N−1)/N·Ψ/8 bytes)
    every rank: m = [C(y)_0 … C(y)_{N−1}];  w ← w·(1 − ηλ) − η·clamp((m/(1−β1^t)) / (√v̂ + ε), ±R)  on the
        whole flat parameter (identical bits everywhere); the owner's master is its shard of w.

That is the stage-0 algorithm with the chunks cut at the buckets' shards: where they coincide (one
bucket, shard a multiple of 8) the result is bit-identical to stage 0 (tests/test_onebit_adam.py). A
bf16 √v̂ was tried: +3.8% loss instead of +2.0% on that test, so it stays fp32. Why every rank
holds √v̂ and applies the update itself: ZeRO-1/2's fp32 parameter all-gather alone is (N−1)/N·4Ψ,
half of Adam's 2(N−1)/N·4Ψ, so no compressed reduce-scatter followed by it could reach ≤ 1/16 of
Adam's. (Compressing the update instead of the momentum fails: elements whose frozen v is tiny — a
tied head's rows of tokens never seen — get updates of 10^5 or more, which through the shared scale
move every element of the chunk.) Wire per step: an all-to-all and an all-gather of
Σ_b N·(⌈shard_b/8⌉ + 4) bytes (signs packed 8 to a byte + one
fp32 scale per bucket shard) times (N−1)/N, plus the 8-byte norm all-reduce: ≈ 1/32 of Adam's.

Limits (refused with the reason): stage 3 (the parameter would have to be gathered for the update),
precisions other than fp32 at stages 1–2 (a bf16 parameter cannot take the small delta identically to
an owner casting its master), fp16 (its loss scaler needs reduced gradients), gradient clipping (the
local gradients have no global norm), offload and expert parallelism. Memory at stages 1–2, after
warm-up: plain ZeRO-1/2 Adam + 12Ψ + 4Ψ/N (m, e_i, √v̂, e_s), about stage 0's 1-bit Adam: the compressed
phase needs the whole m and v on every rank; stage 2 also keeps the whole local gradient until the step.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist

from parallel import comm
from parallel.optim import onebit_kernels as K
from parallel.optim.onebit_adam import _all_to_all, _clone, _unpack, apply_step
from parallel.optim.onebit_lamb import lamb_compressed_update
from parallel.zero.grad_norm import SKIP_MESSAGE, NonFiniteError
from parallel.zero.zero_one import is_zero_one, sharded_step

__all__ = ["check_onebit", "onebit_step", "full_comm_state", "load_full_comm_state"]


def check_onebit(z) -> None:
    """ZeroOptimizer construction: 1-bit Adam's limits, each refused with its reason and fix."""
    name = type(z.optimizer).__name__
    if z.stage == 3:
        raise ValueError(f"{name} with zero.stage=3: the compressed update needs the whole parameter on every rank "
                         f"(stage 3 would all-gather it, costing more than the compression saves); use zero.stage "
                         f"0, 1 or 2")
    if hasattr(z.optimizer, "frozen_coeff") and any(g.axis == "tp" and g.size > 1 for g in z.norm_groups):
        raise ValueError(f"{name} with tensor parallelism: its compressed phase scales each whole tensor by a factor "
                         f"from all of its elements, and a tp rank holds a shard; use tp=1 or OneBitAdam")
    if is_zero_one(z) and any(g.axis == "tp" and g.size > 1 for g in z.norm_groups):
        raise ValueError(f"{name} with tensor parallelism: its local steps and 1-bit exchanges are verified at dp "
                         f"and ZeRO-1/2 only (tests/test_zero_one_adam.py), not over tp shards; use tp=1 or "
                         f"OneBitAdam")
    if z.grad_clip is not None:
        raise ValueError(f"{name} communicates compressed momentum: each rank keeps its own gradient, which has no "
                         f"global norm to clip by (got train.grad_clip={z.grad_clip}); remove train.grad_clip")
    if z.prec.name == "fp16":
        raise ValueError(f"{name} with precision=fp16: the loss scaler's overflow check needs reduced gradients, "
                         f"which the compressed phase does not have; use precision=bf16 (zero.stage=0) or fp32")
    if z.stage > 0 and z.prec.name != "fp32":
        raise ValueError(f"{name} with zero.stage={z.stage} needs precision=fp32 (got {z.prec.name}): every rank "
                         f"applies the compressed update to the whole parameter, which a {z.prec.name} parameter "
                         f"cannot hold identically to the owner's fp32 master; use precision=fp32 or zero.stage=0")


def _local_norm_check(z, StepResult):
    """Σ_i ‖g_i‖² over the dp ranks (one float64 all-reduce): the same verdict everywhere. Returns
    (reported norm = √((1/N)Σ_i ‖g_i‖²) over the whole model, or a StepResult when non-finite)."""
    dev = z._all[0].master.device
    sq = torch.zeros(1, dtype=torch.float64, device=dev)
    for b in z._all:
        sq += torch.linalg.vector_norm(b.flat_grad).double() ** 2
    comm.all_reduce(sq, z.group)
    for grp in z.norm_groups:                    # tp / pp shards: every rank of the step sees the verdict
        comm.all_reduce(sq, grp)
    v = float(sq) / z.group.size
    if math.isfinite(v):
        return math.sqrt(v)
    z._drop_master_grads()
    if z.on_nonfinite == "skip":
        return StepResult(float("nan"), True, z.scaler.scale, SKIP_MESSAGE, nonfinite_skip=True)
    total = v * z.group.size
    raise NonFiniteError(f"a rank's local gradient is non-finite in 1-bit Adam's compressed phase (Σ_i ‖g_i‖² = "
                         f"{total}); the update was not applied. Check the batch, lower the learning rate, or "
                         f"pass on_nonfinite='skip' (train.on_nonfinite=skip)", [v, 0.0, 0.0])


def onebit_step(z, StepResult):
    """ZeroOptimizer.step() while the reducer keeps local gradients (1-bit Adam after warm-up)."""
    z.finish_grad_sync()
    norm = _local_norm_check(z, StepResult)
    if isinstance(norm, StepResult):
        return norm
    if z.stage == 0:
        for b, _, a, e, view in z._piece_list:
            view.grad = b.flat_grad[a:e].float()
        z.optimizer.step()
    elif is_zero_one(z):
        sharded_step(z)                              # 0/1 Adam: parallel/zero/zero_one.py
    else:
        _sharded_step(z)
    z._drop_master_grads()
    if z.stage == 0:
        z._write_back()                              # stages 1–2 wrote the parameters themselves
    z.scaler.update(False)
    z.steps += 1
    return StepResult(norm, False, z.scaler.scale)


def _start(z, opt, c2: float) -> list:
    """At the first compressed step: the owners' m and √v̂ (fp32) all-gathered once."""
    out = []
    for b in z._all:
        m = torch.zeros(b.shard, dtype=torch.float32, device=b.master.device)
        d = torch.zeros(b.shard, dtype=torch.float32, device=b.master.device)
        for pb, _, a, e, view in z._piece_list:
            if pb is b:
                st = opt.state[view]
                m[a - b.lo:e - b.lo] = st["exp_avg"]
                d[a - b.lo:e - b.lo] = st["exp_avg_sq"].sqrt() / math.sqrt(c2)      # as OneBitAdam.step
        full_m = torch.empty(b.padded, dtype=torch.float32, device=m.device)
        full_d = torch.empty(b.padded, dtype=torch.float32, device=m.device)
        comm.all_gather_into(full_m, m, z.group)
        comm.all_gather_into(full_d, d, z.group)
        out.append({"momentum": full_m, "sqrt_v": full_d, "worker_error": torch.zeros_like(full_m),
                    "server_error": torch.zeros(b.shard, dtype=torch.float32, device=m.device)})
        if hasattr(opt, "frozen_coeff"):                 # 1-bit LAMB: ṽ = v̂, every tensor's frozen trust ratio
            coeff = torch.zeros(len(b.names), dtype=torch.float64)
            for pb, i, _, _, view in z._piece_list:
                if pb is b and view.numel():
                    coeff[i] = opt.frozen_coeff(opt.state[view])
            comm.all_reduce(coeff, z.group, op="max")  # every piece of a tensor holds the same value
            out[-1].update(v_fresh=full_d * full_d, coeff=coeff, last_factor=torch.ones_like(coeff))
    return out


def _rows(x: torch.Tensor, N: int, c: int, c8: int) -> torch.Tensor:
    """[N, c] rows of a flat buffer, zero-padded to c8 columns (whole bytes of signs)."""
    r = x.view(N, c)
    return r if c8 == c else torch.nn.functional.pad(r, (0, c8 - c))


def _to_bytes(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.cat([packed, scale.float().contiguous().view(-1, 1).view(torch.uint8)], 1)


def _from_bytes(buf: torch.Tensor, c8: int):
    k = c8 // 8
    return buf[:, :k], buf[:, k:k + 4].contiguous().view(torch.float32).view(-1)


def _sharded_step(z) -> None:
    """Stages 1–2: compressed reduce-scatter of the momentum to the chunk owners, compressed
    all-gather of their result, the update on every rank (module docstring)."""
    opt, N = z.optimizer, z.group.size
    g = opt.param_groups[0]
    (b1, b2), lr, eps, wd, T = g["betas"], g["lr"], g["eps"], g["weight_decay"], g["freeze_step"]
    t = opt.t + 1
    c1, c2 = 1 - b1 ** t, 1 - b2 ** min(t, T)
    if "zero" not in opt.comm_state:
        opt.comm_state["zero"] = _start(z, opt, c2)
    bufs = opt.comm_state["zero"]
    sends, dims = [], []                               # worker: all buckets' rows in one [N, Σ_b bytes] tensor
    for b, st in zip(z._all, bufs):
        c, c8 = b.shard, -(-b.shard // 8) * 8
        dims.append((c, c8))
        x = st["worker_error"]                         # x = e_i + (β1·m + (1−β1)·g_i), in place (fused passes)
        K.momentum_error(x, st["momentum"], b.flat_grad, x, b1, 1 - b1)
        scale = K.row_scale(_rows(x, N, c, c8))
        packed = torch.empty(N, c8 // 8, dtype=torch.uint8)
        K.pack_error(x, scale, c, c8, packed, x, b.numel)   # e_i ← x − C(x); bucket padding carries no error
        sends.append(_to_bytes(packed, scale))
    recv = _all_to_all(torch.cat(sends, 1), z.group) if N > 1 else torch.cat(sends, 1)
    o, outs = 0, []                                    # server: chunk k of every bucket
    for b, st, (c, c8) in zip(z._all, bufs, dims):
        w = c8 // 8 + 4
        packed, scale = _from_bytes(recv[:, o:o + w], c8)
        o += w
        y = torch.empty(c)
        K.server_mean(packed, scale, st["server_error"], y, c)
        scale = K.row_scale(_rows(y, 1, c, c8))
        packed = torch.empty(1, c8 // 8, dtype=torch.uint8)
        K.pack_error(y, scale, c, c8, packed, st["server_error"], max(0, min(c, b.numel - b.lo)))
        outs.append(_to_bytes(packed, scale))
    mine = torch.cat(outs, 1)
    allb = torch.empty(N, mine.shape[1], dtype=torch.uint8, device=mine.device)
    comm.all_gather_into(allb, mine, z.group)
    o = 0
    with torch.no_grad():                              # every rank: the same update of the whole parameter
        for b, st, (c, c8) in zip(z._all, bufs, dims):
            w = c8 // 8 + 4
            packed, scale = _from_bytes(allb[:, o:o + w], c8)
            o += w
            if "coeff" not in st:                      # 1-bit Adam: m in place, the update fused with its unpacking
                m, fp, k = st["momentum"], b.flat_param, b.numel
                hp = dict(mode=1, eps=eps, lr=lr, c1=c1, wd=(1 - lr * wd) if wd else None, bound=g.get("update_bound"))
                K.unpack_update(packed, scale, c, 0, m[:k], fp[:k], st["sqrt_v"][:k], **hp)
                m[k:] = 0.0                            # the bucket padding: m = 0, as the eager step
                if wd:
                    fp[k:].mul_(1 - lr * wd)
                apply_step(fp[k:], m[k:], st["sqrt_v"][k:] + eps, lr, c1, g.get("update_bound"))
                b.master.copy_(fp[b.lo:b.hi])
                continue
            m = (_unpack(packed)[:, :c] * scale.unsqueeze(-1)).reshape(-1)
            m[b.numel:] = 0.0
            prev, st["momentum"] = st["momentum"], m
            if "coeff" in st:                          # 1-bit LAMB: per whole tensor (parallel/optim/onebit_lamb.py)
                for i, (off, n) in enumerate(zip(b.offsets, b.sizes)):
                    sl = slice(off, off + n)
                    st["last_factor"][i] = lamb_compressed_update(
                        b.flat_param[sl], m[sl], prev[sl], st["sqrt_v"][sl], st["v_fresh"][sl], float(st["coeff"][i]),
                        float(st["last_factor"][i]), g, c1)
            else:
                if wd:
                    b.flat_param.mul_(1 - lr * wd)
                apply_step(b.flat_param, m, st["sqrt_v"] + eps, lr, c1, g.get("update_bound"))
            b.master.copy_(b.flat_param[b.lo:b.hi])
    for b, _, a, e, view in z._piece_list:             # the owners' record of m and the step count
        s = opt.state[view]
        s["exp_avg"].copy_(bufs[z._all.index(b)]["momentum"][a:e])
        s["step"] = torch.tensor(float(t))
    opt._t = t


def _comm_layout(z) -> dict:
    return {k: v for k, v in z._layout().items() if k != "rank"}


def full_comm_state(z) -> dict | None:
    """For ``full_state_dict()``: every dp rank's error-feedback buffers (``comm_state``; they are per rank:
    each worker's own e_i, each server's e_s) with the layout they belong to. Gathered as objects over dp:
    every rank's dict then holds N × (the whole worker error + the shard's server error), ≈ 4Ψ·N bytes (with
    ZeRO-1/2 also each rank's m and √v̂ copy: ≈ 12Ψ·N). None for optimizers without them."""
    cs = getattr(z.optimizer, "comm_state", None)
    if cs is None:
        return None
    ranks = [None] * z.group.size
    if z.group.size > 1:
        dist.all_gather_object(ranks, _clone(cs), group=z.group.pg)
    else:
        ranks = [_clone(cs)]
    return {"layout": _comm_layout(z), "ranks": ranks}


def load_full_comm_state(z, saved: dict | None) -> None:
    """For ``load_full_state_dict()``: this rank's buffers when the layout (stage, dp size, buckets) is the
    saved one — the resume is then exact; otherwise they restart at zero, with a warning if there were any."""
    if getattr(z.optimizer, "comm_state", None) is None:
        return
    if saved and saved.get("layout") == _comm_layout(z):
        z.optimizer.comm_state = _clone(saved["ranks"][z.group.rank])
        return
    z.optimizer.comm_state = {}
    if saved and any(saved.get("ranks") or []) and z.group.rank == 0:
        old = saved.get("layout", {})
        warnings.warn(f"full state dict: 1-bit Adam's error-feedback buffers were saved at "
                      f"zero.stage={old.get('stage')}, dp={old.get('dp')} (or other buckets) and this layout "
                      f"differs: they restart at zero (the resume is not bit-exact)", stacklevel=3)
