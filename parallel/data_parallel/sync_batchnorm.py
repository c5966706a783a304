"""BatchNorm whose batch statistics span the dp group: ``parallel.sync_batchnorm: true``.

A BatchNorm layer in training normalises channel c of its input x (all dims but 1 reduced, n values
per channel on a rank, N = Σ_ranks n in the group) with the *batch* moments

    μ = (1/N) Σ x,    σ² = (1/N) Σ (x − μ)²,    x̂ = (x − μ) / √(σ² + ε),    y = γ x̂ + β,

so without synchronisation every dp rank normalises by its own shard's moments and the layout
changes the numbers. Here the moments are taken over the whole dp group, in two counted all-reduces
on ``mesh.group("dp")`` (the two-pass variance, as numerically safe as one process's):

    forward    all_reduce [Σ x, n]            C + 1 floats   → μ
               all_reduce [Σ (x − μ)²]        C floats       → σ²
    backward   all_reduce [Σ dy, Σ dy·x̂]     2C floats      (only when x needs a gradient)
               dx = γ / √(σ² + ε) · (dy − Σdy / N − x̂ · Σ(dy·x̂) / N)

(the sums over the group: each rank's dy is ∂L_r/∂y of its own loss, so dx is ∂(Σ_r L_r)/∂x and the
dp average of the parameter gradients is the gradient of the global mean loss). dγ = Σ dy·x̂ and
dβ = Σ dy stay local: the data-parallel gradient reduction sums them like any other gradient.
Per BatchNorm layer and forward, a rank sends 2(N−1)/N · 4 · (4C + 1) bytes (fp32 statistics; 2C + 1
without the backward) — torch.nn.SyncBatchNorm's all-gather of (mean, invstd, count) plus the same
backward all-reduce moves the same amount at N = 2. The running statistics are updated as one
process would: running_mean ← (1 − f)·running_mean + f·μ, running_var ← (1 − f)·running_var +
f·σ²·N/(N − 1) (the unbiased variance over the group), f = momentum, or 1/num_batches_tracked when
momentum is None.

**Exactness and micro-batches.** With one micro-batch per dp rank and step (data.micro_batch_size =
global_batch_size / dp) a forward sees the whole global batch: losses, gradients and running
statistics equal one process with the global batch. With m > 1 micro-batches the statistics are those
of each micro-batch across the group (dp × micro_batch_size samples) and the running statistics move
m times per step: the same numbers as one process accumulating gradients over m micro-batches, not
as one process with the global batch. No cheap scheme closes that gap: μ and σ² of layer k depend on
every sample of the step, and so does each sample's gradient (through Σdy, Σdy·x̂), so exact
statistics over the step would need all micro-batches to advance in lockstep, layer by layer, forward
and backward — the memory of the whole batch that micro-batching exists to avoid — or a
recomputation pass per BatchNorm layer. The engine says so once (rank 0) when m > 1.

Eval mode with running statistics stays local (no communication), as in torch. Under
``pp_schedule: zero_bubble`` the W pass re-runs a stage's backward, so on the stages that split B
from W the backward all-reduce runs twice (same numbers; 2(N−1)/N · 4 · 2C more bytes per layer).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from parallel import comm

__all__ = ["SyncBatchNormMixin", "convert_sync_batchnorm", "batchnorm_modules", "prepare", "stat_bytes_per_forward"]

def stat_bytes_per_forward(channels: int, dp: int, backward: bool = True, elem: int = 4) -> float:
    """Ring-model wire bytes one rank sends for one BatchNorm layer's forward (+ backward)."""
    floats = (2 * channels + 1) + (2 * channels if backward else 0)
    return 2 * (dp - 1) / dp * floats * elem


def _reduce_dims(x: torch.Tensor) -> list:
    return [0] + list(range(2, x.dim()))


def _shape(x: torch.Tensor) -> tuple:
    return (1, -1) + (1,) * (x.dim() - 2)


@torch.no_grad()
def _group_moments(x: torch.Tensor, group) -> tuple:
    """(μ, σ² biased, N) per channel over every rank's ``x`` in ``group`` (fp32; two all-reduces)."""
    xf = x.float()
    dims = _reduce_dims(x)
    n = x.numel() // x.shape[1]
    first = torch.cat([xf.sum(dims), torch.tensor([float(n)], device=x.device)])
    comm.all_reduce(first, group)
    N = int(round(first[-1].item()))
    if N <= 1:
        raise ValueError(f"sync_batchnorm: expected more than 1 value per channel when training, got {N} over "
                         f"the dp group (input shape {tuple(x.shape)} on this rank)")
    mean = first[:-1] / N
    sq = (xf - mean.view(_shape(x))).square().sum(dims)
    comm.all_reduce(sq, group)
    return mean, sq / N, N


class _SyncBN(torch.autograd.Function):
    """y = γ (x − μ)/√(σ² + ε) + β with group moments given; backward all-reduces Σdy, Σdy·x̂."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, N, group):
        shape = _shape(x)
        invstd = torch.rsqrt(var + eps)
        xhat = (x.float() - mean.view(shape)) * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.float().view(shape)
        if bias is not None:
            y = y + bias.float().view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.N, ctx.group, ctx.has_bias, ctx.dtype = N, group, bias is not None, x.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape = _reduce_dims(dy), _shape(dy)
        dyf = dy.float()
        sum_dy = dyf.sum(dims)
        sum_dy_xhat = (dyf * xhat).sum(dims)
        dw = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = sum_dy.to(dy.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_dy, sum_dy_xhat])
            comm.all_reduce(both, ctx.group)
            C = sum_dy.numel()
            scale = invstd if weight is None else invstd * weight.float()
            dx = scale.view(shape) * (dyf - (both[:C] / ctx.N).view(shape) - xhat * (both[C:] / ctx.N).view(shape))
            dx = dx.to(ctx.dtype)
        return dx, dw, db, None, None, None, None, None


class SyncBatchNormMixin:
    """Put in front of a BatchNorm class (``convert_sync_batchnorm`` swaps the instance's class):
    training-mode statistics over ``self.sync_group`` (a counted dp :class:`parallel.comm.Group`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.sync_group
        if not self.training or group.size == 1:
            return _BatchNorm.forward(self, x)  # eval (running stats, or local batch stats) / one rank: torch's
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        mean, var, N = _group_moments(x, group)
        if self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_((var * (N / (N - 1))).to(self.running_var.dtype),
                                                       alpha=factor)
        return _SyncBN.apply(x, self.weight, self.bias, mean, var, self.eps, N, group)


_CLASSES: dict = {}


def _sync_class(cls: type) -> type:
    """The class ``Sync<cls>`` = (SyncBatchNormMixin, cls), made once and kept in this module (picklable)."""
    if cls not in _CLASSES:
        name = f"Sync{cls.__name__}" if cls.__module__.startswith("torch.") else f"Sync{cls.__name__}_{id(cls):x}"
        new = type(name, (SyncBatchNormMixin, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = new
        _CLASSES[cls] = new
    return _CLASSES[cls]


def batchnorm_modules(model: nn.Module) -> list:
    """(name, module) of every BatchNorm (torch's _BatchNorm subclasses) in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def convert_sync_batchnorm(model: nn.Module, group) -> list:
    """Make every BatchNorm*d in ``model`` synchronise its statistics over ``group``, in place: the
    instance's class becomes ``Sync<class>`` (its weights, buffers, hooks and every reference to it
    stay), with ``sync_group = group``. Subclasses with their own forward are refused (converting them
    would drop their extra computation). Returns the converted modules' names."""
    if not isinstance(group, comm.Group):
        raise TypeError(f"convert_sync_batchnorm needs a counted group (mesh.group('dp')), got {type(group).__name__}")
    done = []
    for name, m in batchnorm_modules(model):
        if isinstance(m, SyncBatchNormMixin):
            m.sync_group = group
            done.append(name)
            continue
        cls = type(m)
        if isinstance(m, nn.modules.lazy.LazyModuleMixin):
            raise ValueError(f"sync_batchnorm: {name or '<model>'} is a {cls.__name__} (lazy): run one forward "
                             f"first so its parameters exist, then parallelize the model")
        own = cls.forward not in (_BatchNorm.forward, nn.SyncBatchNorm.forward)
        if own:
            raise ValueError(f"sync_batchnorm: {name or '<model>'} is a {cls.__name__} with its own forward; "
                             f"synchronising it would drop that computation. Use nn.BatchNorm*d there, or set "
                             f"parallel.sync_batchnorm: false")
        m.__class__ = _sync_class(cls)
        m.sync_group = group
        done.append(name)
    return done


def prepare(model: nn.Module, cfg, dp_group, rank: int) -> list:
    """The engine's hook (before TP/PP/ZeRO): convert when ``parallel.sync_batchnorm`` is on, and say
    once on rank 0 what the statistics cover. Returns the converted modules' names."""
    on, bns = cfg.parallel.sync_batchnorm, batchnorm_modules(model)
    if not bns or cfg.parallel.dp == 1 and not on:
        return []
    m = cfg.micro_batches
    if not on:
        _warn(rank, f"the model has {len(bns)} BatchNorm layer(s) ({bns[0][0]}, ...) and parallel.dp="
                   f"{cfg.parallel.dp}: statistics are per rank and per micro-batch ({cfg.data.micro_batch_size} "
                   f"samples, not the global batch of {cfg.data.global_batch_size}), so the numbers differ from one "
                   f"process; set parallel.sync_batchnorm: true")
        return []
    if m > 1:
        _warn(rank, f"parallel.sync_batchnorm: {m} micro-batches per dp rank, so BatchNorm statistics "
                   f"span the dp group per micro-batch ({cfg.parallel.dp} × {cfg.data.micro_batch_size} samples), "
                   f"not the step's {cfg.data.global_batch_size}: the numbers are one process accumulating over {m} "
                   f"micro-batches. For one process with the global batch set data.micro_batch_size="
                   f"{cfg.data.global_batch_size // cfg.parallel.dp}")
    return convert_sync_batchnorm(model, dp_group)


def _warn(rank: int, msg: str) -> None:
    """Once per engine (``prepare`` runs once, at construction), on global rank 0."""
    if rank == 0:
        warnings.warn(msg, UserWarning, stacklevel=3)
