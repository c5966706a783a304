"""1-bit Adam's compressed phase inside ZeroOptimizer: stage 0, and stages 1–2 on the ZeRO partition.

Tang et al., "1-bit Adam", arXiv 2102.02888: after ``freeze_step`` Adam steps the variance v is frozen
and Adam's update is linear in the momentum, so the momentum can travel sign-compressed with error
feedback. Stage 0 is :class:`parallel.optim.onebit_adam.OneBitAdam`'s own step (every rank holds the
whole m, v and master). This module adds, for both, the per-rank non-finite check (one all-reduce of
8 bytes: every rank sees the same verdict, none hangs in a compressed collective another rank skipped),
and for stages 1–2 the step on the partition, where rank k owns shard k of every bucket (m, v, master):

    worker i (whole bucket, its own gradient g_i, fp32 buffers μ_i and e_i of the full bucket size):
        μ_i ← β1·μ_i + (1−β1)·g_i                 (local momentum; μ_i = m at the freeze step, so
                                                   (1/N)Σ_i μ_i is exactly Adam's m of the mean gradient)
        x_i = μ_i + e_i;  row k of x_i → C(row) = ‖row‖/√c · sign(row);  e_i ← x_i − C(x_i)
        all-to-all: row k to its owner k               (compressed reduce-scatter: (N−1)/N·Ψ/8 bytes)
    owner k (its shard s_k; e_s and e_u of the shard size):
        m_k = (1/N)·Σ_i C(x_i)_k                       (the momentum, kept as the pieces' exp_avg)
        u_k = m̂_k/(√v̂_k + ε) + λ·w_k                  (m̂ = m/(1−β1^t), v̂ = v/(1−β2^T), T = freeze_step)
        z_k = u_k + e_u;  e_u ← z_k − C(z_k)           (server-side error feedback, on the update)
        all-gather C(z_k)                              (compressed all-gather: (N−1)/N·Ψ/8 bytes)
    every rank: w ← w − η·C(z)  on the whole flat parameter (identical bits on every rank); the
        owner's master is its shard of w.

Why the update, not the parameters, is all-gathered: ZeRO-1/2's fp32 parameter all-gather alone is
(N−1)/N·4Ψ, half of Adam's 2(N−1)/N·4Ψ, so no compressed reduce-scatter could bring the step to
≤ 1/16 of Adam's. With v frozen the update is a fixed diagonal rescaling of m, and error feedback on it
keeps Σ_t η·C(z_t) within η·‖e_u‖ of Σ_t η·u_t (nothing accumulates). Wire per step: an all-to-all and
an all-gather of Σ_b N·(⌈shard_b/8⌉ + 4) bytes (signs packed 8 to a byte + one fp32 scale per bucket
shard) times (N−1)/N, plus the 8-byte norm all-reduce: ≈ 1/32 of Adam's. At the freeze step the
owners' m is all-gathered once (fp32, (N−1)/N·4Ψ) to start μ_i.

Limits (refused with the reason): stage 3 (the parameter would have to be gathered for the update),
precisions other than fp32 at stages 1–2 (a bf16 parameter cannot take the small delta identically to
an owner casting its master), gradient clipping (the local gradients have no global norm), offload and
expert parallelism. The memory at stages 1–2: + 8Ψ (μ_i, e_i) over ZeRO's, − 8Ψ(N−1)/N (v, master).
"""
from __future__ import annotations

import math

import torch

from parallel import comm
from parallel.optim.onebit_adam import _all_to_all, _compress, _unpack
from parallel.zero.grad_norm import SKIP_MESSAGE, NonFiniteError

__all__ = ["check_onebit", "onebit_step"]


def check_onebit(z) -> None:
    """ZeroOptimizer construction: 1-bit Adam's limits, each refused with its reason and fix."""
    name = type(z.optimizer).__name__
    if z.stage == 3:
        raise ValueError(f"{name} with zero.stage=3: the compressed update needs the whole parameter on every rank "
                         f"(stage 3 would all-gather it, costing more than the compression saves); use zero.stage "
                         f"0, 1 or 2")
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
    else:
        _sharded_step(z)
    z._drop_master_grads()
    if z.stage == 0:
        z._write_back()                              # stages 1–2 wrote the parameters themselves
    z.scaler.update(False)
    z.steps += 1
    return StepResult(norm, False, z.scaler.scale)


def _start_momentum(z, opt) -> list:
    """At the first compressed step: μ_i = the owners' m, all-gathered once (fp32)."""
    out = []
    for b in z._all:
        shard = torch.zeros(b.shard, dtype=torch.float32, device=b.master.device)
        for pb, _, a, e, view in z._piece_list:
            if pb is b:
                shard[a - b.lo:e - b.lo] = opt.state[view]["exp_avg"]
        full = torch.empty(b.padded, dtype=torch.float32, device=b.master.device)
        comm.all_gather_into(full, shard, z.group)
        out.append({"momentum": full, "worker_error": torch.zeros_like(full),
                    "update_error": torch.zeros(b.shard, dtype=torch.float32, device=full.device)})
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
    """Stages 1–2: the compressed reduce-scatter of the momentum, the update on the owned shard, the
    compressed all-gather of the update (module docstring)."""
    opt, N, r = z.optimizer, z.group.size, z.group.rank
    g = opt.param_groups[0]
    (b1, b2), lr, eps, wd, T = g["betas"], g["lr"], g["eps"], g["weight_decay"], g["freeze_step"]
    if "zero" not in opt.comm_state:
        opt.comm_state["zero"] = _start_momentum(z, opt)
    bufs = opt.comm_state["zero"]
    t = opt.t + 1
    c1, c2 = 1 - b1 ** t, 1 - b2 ** min(t, T)
    # worker side: every bucket's rows into one byte tensor [N, Σ_b (c8_b/8 + 4)]
    sends, dims = [], []
    for b, st in zip(z._all, bufs):
        c, c8 = b.shard, -(-b.shard // 8) * 8
        dims.append((c, c8))
        st["momentum"].mul_(b1).add_(b.flat_grad, alpha=1 - b1)
        x = st["momentum"] + st["worker_error"]
        packed, scale, approx = _compress(_rows(x, N, c, c8))
        st["worker_error"] = x - approx[:, :c].reshape(-1)
        st["worker_error"][b.numel:] = 0.0                # bucket padding carries no error
        sends.append(_to_bytes(packed, scale))
    recv = _all_to_all(torch.cat(sends, 1), z.group) if N > 1 else torch.cat(sends, 1)
    # server side: the owned shard's momentum, update and its compression
    o, outs = 0, []
    for b, st, (c, c8) in zip(z._all, bufs, dims):
        w = c8 // 8 + 4
        packed, scale = _from_bytes(recv[:, o:o + w], c8)
        o += w
        m = (_unpack(packed) * scale.unsqueeze(-1)).mean(0)[:c]
        u = torch.zeros(c, dtype=torch.float32, device=m.device)
        for pb, _, a, e, view in z._piece_list:
            if pb is not b:
                continue
            s = opt.state[view]
            s["exp_avg"].copy_(m[a - b.lo:e - b.lo])
            s["step"] = torch.tensor(float(t))
            denom = (s["exp_avg_sq"].sqrt() / math.sqrt(c2)).add_(eps)
            u[a - b.lo:e - b.lo] = s["exp_avg"] / c1 / denom + wd * view
        zz = u + st["update_error"]
        packed, scale, approx = _compress(_rows(zz, 1, c, c8))
        st["update_error"] = zz - approx[0, :c]
        st["update_error"][max(0, min(c, b.numel - b.lo)):] = 0.0
        outs.append(_to_bytes(packed, scale))
    mine = torch.cat(outs, 1)
    allb = torch.empty(N, mine.shape[1], dtype=torch.uint8, device=mine.device)
    comm.all_gather_into(allb, mine, z.group)
    # every rank: the same compressed update on the whole flat parameter
    o = 0
    with torch.no_grad():
        for b, (c, c8) in zip(z._all, dims):
            w = c8 // 8 + 4
            packed, scale = _from_bytes(allb[:, o:o + w], c8)
            o += w
            delta = (_unpack(packed)[:, :c] * scale.unsqueeze(-1)).reshape(-1)
            delta[b.numel:] = 0.0
            b.flat_param.sub_(delta, alpha=lr)
            b.master.copy_(b.flat_param[b.lo:b.hi])
    opt._t = t
