"""ZeroOptimizer: data parallelism with ZeRO stages 0–3 around any elementwise torch optimizer.

Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
arXiv 1910.02054. With N = dp size, Ψ = parameters, K = optimizer bytes per parameter (fp32 Adam
with master: 12; without: 8), model-state bytes per rank (DESIGN.md):

    stage 0  plain DP                     mixed (2+2+K)Ψ      fp32 16Ψ
    stage 1  optimizer state + master /N  mixed 4Ψ + KΨ/N     fp32 8Ψ + 8Ψ/N
    stage 2  … and gradients /N           mixed 2Ψ + (2+K)Ψ/N fp32 4Ψ + 12Ψ/N
    stage 3  … and parameters /N          mixed (2+2+K)Ψ/N    fp32 16Ψ/N

Wire bytes per step and rank (ring model): stage 0 all-reduce 2(N−1)/N·(Ψ+1)·b (one element carries the
unused-parameter flag, :mod:`parallel.data_parallel.unused_flag`); stages 1/2
reduce-scatter + all-gather, the same 2(N−1)/N·Ψ·b; stage 3 two all-gathers + one
reduce-scatter, 3(N−1)/N·Ψ·b (plus a 32-byte norm all-reduce: the norm's three float64 and the count
of parameters without a gradient, :mod:`.unused` — 40 bytes when the engine's loss rides in it too,
:mod:`.norm_carry`; padding as in partition.py).

The optimizer is built by ``optimizer_factory(params)`` on the *pieces* of the fp32 master this
rank owns: one 1-D view per parameter (or part of a parameter, where a shard boundary cuts it)
into the flat master (stage 0: the whole bucket; stages 1–3: this rank's shard). Per-parameter
pieces keep the optimizer's loops cache-sized (one 20 MB flat tensor per op is 3x slower on a
CPU) and its state per parameter. That is exact for optimizers whose update is elementwise given
the step count (SGD, momentum, Adam, AdamW, Adagrad, RMSprop, …). An optimizer with per-tensor
statistics (LAMB's trust ratio) or whole-matrix steps (Muon) has ``bind_partition``: it gets a
:class:`~parallel.zero.partition.ZeroPartition` for whole-tensor norms and gathers
(:mod:`parallel.optim.tensorwise`). One param group.

Offload (``offload=`` an :class:`parallel.config.OffloadConfig`, see :mod:`.offload`): with
``optimizer`` = cpu | nvme the masters and Adam moments live in a tensor store and the step is a
streamed CPU Adam/AdamW over sub-groups (the torch optimizer then only carries hyper-parameters;
``b.master`` is a zero-stride placeholder that holds the gradient); with ``params`` = cpu | nvme
(stage 3) the unit shards live in a store and are fetched for each gather. Checkpoint code that
reads ``_pieces`` and ``optimizer.state`` must run inside ``with zero.materialized():``.

Global gradient norm and the non-finite policy (``on_nonfinite``: stop | skip; fp16 leaves
overflow to its loss scaler): :mod:`.grad_norm`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from parallel.comm import Group
from parallel.config import ZeroConfig
from parallel.data_parallel.bucket import FlatBucket
from parallel.data_parallel.grad_parts import GradReducer, PartsReducer
from parallel.data_parallel.unused_flag import carry_unused
from parallel.precision import LossScaler, Precision
from parallel.zero.accounting import AccountingMixin
from parallel.zero.args import check_args
from parallel.zero.direct_grads import DirectReducer, bind_grads, can_direct, clip_grads
from parallel.zero.flat_init import init_full, init_sharded, materialize_buffers, replace_meta_params
from parallel.zero.grad_norm import SKIP_MESSAGE, NonFiniteError, norm_segments
from parallel.zero.interleave import can_interleave, step_interleaved
from parallel.zero.norm_carry import norm_sq_and_carry
from parallel.zero.offload import OffloadMixin, make_offload
from parallel.zero.onebit import check_onebit, onebit_step
from parallel.zero.partition import ZeroPartition
from parallel.zero.stage3 import Stage3Params
from parallel.zero.state import ZeroStateMixin
from parallel.zero.unit_layout import make_buckets
from parallel.zero.unused import local_missing, warn_onebit_unused
from parallel.zero.write_back import WriteBackMixin

__all__ = ["ZeroOptimizer", "StepResult", "NonFiniteError"]


@dataclass
class StepResult:
    grad_norm: float        # global L2 norm of the (unscaled, averaged) gradient, before clipping
    skipped: bool           # the update was not applied (fp16 overflow, or nonfinite_skip)
    loss_scale: float       # the scale for the next step's loss
    message: str | None = None
    nonfinite_skip: bool = False    # skipped by on_nonfinite="skip" (a non-finite gradient, not fp16)


class ZeroOptimizer(WriteBackMixin, OffloadMixin, ZeroStateMixin, AccountingMixin):
    """``ZeroOptimizer(module, optimizer_factory, dp_group, zero=ZeroConfig(), *, precision="fp32",
    grad_clip=None, on_nonfinite="stop", norm_groups=(), init=None, unit_types=None,
    overlap_param_gather=False, loss_scale=None)``

    module             the (stage of the) model, built identically on every dp rank; params on the
                       meta device need ``init`` (:func:`parallel.zero.deferred_init`)
    optimizer_factory  Callable[[list[Tensor]], torch.optim.Optimizer], called once with this
                       rank's fp32 master pieces (1-D views, one per owned parameter piece)
    dp_group           the counted dp :class:`parallel.comm.Group` (``mesh.group("dp")``)
    zero               the config's ``zero`` section (:class:`parallel.config.ZeroConfig`): stage,
                       bucket_mb, prefetch (stage 3) and offload (optimizer none|cpu|nvme, params
                       none|cpu|nvme for stage 3, nvme_path, buffer_count, buffer_mb,
                       prefetch_depth); ``zero.units`` is the caller's to resolve into ``unit_types``
    precision, grad_clip, on_nonfinite   the config's ``precision``, ``train.grad_clip`` and
                       ``train.on_nonfinite`` (stop | skip, :mod:`.grad_norm`)
    norm_groups        further groups the global grad norm / fp16 overflow spans (engine: tp, pp)
    unit_types         stage 3: module classes gathered as one unit (default: every module with
                       parameters of its own)
    overlap_param_gather  stages 1–2: leave step()'s parameter all-gathers in flight; each module's
                       forward pre-hook waits for the buckets of its own parameters (as Megatron's
                       option of that name). Only for models that use each parameter inside the
                       forward of a module holding it; state-dict calls wait for everything.
    simulate           every parameter on the meta device, nothing initialised: the state's shapes and
                       bytes only, for :mod:`launch.simulate`
    loss_scale         fp16: a LossScaleConfig (``loss_scale``) or a ready
                       :class:`~parallel.precision.LossScaler`; None: LossScaleConfig's defaults (DeepSpeed's)
    expert_groups      (ep, edp) groups (:mod:`parallel.moe`): expert parameters (``ep_split``) go into
                       their own buckets / units, partitioned and reduced over edp (gradient divided by
                       the dp size), their norm summed over ep; None: every parameter over dp

    Per step: ``zero_grad()``; ``prepare_step(m)``; m × (forward, ``(loss * zero.loss_scale)
    .backward()``); ``finish_grad_sync()`` (optional: ``step()`` calls it); ``step()``.
    """

    def __init__(self, module: nn.Module, optimizer_factory, dp_group: Group, zero: ZeroConfig | None = None, *,
                 precision="fp32", grad_clip=None, on_nonfinite: str = "stop", norm_groups=(), init=None,
                 unit_types=None, overlap_param_gather: bool = False, loss_scale=None, simulate: bool = False,
                 expert_groups=None):
        zero = ZeroConfig() if zero is None else zero
        self.expert_groups = expert_groups             # (ep, edp) groups for param_info(p).ep_split params
        check_args(module, optimizer_factory, dp_group, zero, grad_clip, on_nonfinite, norm_groups)
        self.module, self.group, self.stage = module, dp_group, zero.stage
        self.prec = Precision.of(precision)
        self.grad_clip, self.norm_groups, self.on_nonfinite = grad_clip, tuple(norm_groups), on_nonfinite
        self.scaler = loss_scale if isinstance(loss_scale, LossScaler) else self.prec.scaler(
            loss_scale, raise_at_min=on_nonfinite == "stop")
        if self.scaler.enabled != (self.prec.name == "fp16"):
            raise ValueError(f"loss_scale: a LossScaler with enabled={self.scaler.enabled} does not fit "
                             f"precision={self.prec.name!r} (only fp16 scales the loss)")
        self.steps, self.stage3 = 0, None
        self.loss_carry = self.carried_loss = None     # a float summed over dp in the norm's all-reduce (.norm_carry)
        self.fold_loss = True                          # False: never carry (benchmarks pair the separate call)
        named = self._adopt(module, init, simulate)
        units, needs = make_buckets(self, module, named, zero, unit_types)     # .unit_layout
        if self.expert_groups and (zero.offload.optimizer != "none" or zero.offload.params != "none"):
            raise ValueError("zero.offload with parallel.ep > 1 is not supported yet: expert parameters are "
                             "partitioned over their own group; set zero.offload.optimizer/params to none")
        # checks the disk / options before any state is written
        self._opt_off, self._par_off = make_offload(zero.offload, self._all, self.stage, dp_group, optimizer_factory)
        self._init_state()
        if self.stage == 3:
            self.stage3 = Stage3Params(module, units, needs, dp_group, zero.prefetch, shards=self._par_off,
                                       depth=zero.offload.prefetch_depth if self._par_off else 0,
                                       keep=zero.keep_after_forward, reuse=zero.max_reuse_distance)
        self._segments = {b: norm_segments(b) for b in self._all}
        self._build_optimizer(optimizer_factory)
        self._interleave = can_interleave(self)
        self._pending: dict = {}                       # bucket -> in-flight parameter all-gather
        self.overlap_param_gather = overlap_param_gather and self.stage in (1, 2)
        if self.overlap_param_gather:
            self._hook_param_gathers(module)
        # offloaded Adam overlaps backward when nothing global rescales the gradient after reduction
        early = self._opt_off is not None and self.stage >= 2 and grad_clip is None and not self.scaler.enabled
        self.direct = can_direct(self, zero, simulate)  # dp = 1, stage 0: p.grad is the gradient (.direct_grads)
        if self.direct:
            self.reducer = DirectReducer(self.buckets, dp_group, "all_reduce", self.prec.param_dtype, self.deferred)
            return
        self.reducer = (PartsReducer if self.stage == 3 else GradReducer)(  # 3: from p.grad (data_parallel/grad_parts)
            self.buckets, dp_group, "all_reduce" if self.stage == 0 else "reduce_scatter", self.prec.param_dtype,
            keep_full_grads=self.stage < 2, deferred=self.deferred, on_reduced=self._update_early if early else None,
            on_grad=self.stage3.on_grad if self.stage3 else None)
        if self.stage == 0:                            # the unused-parameter flag rides in the last bucket's all-reduce
            carry_unused(self.reducer, lambda g: local_missing(self.buckets, g, self.group))

    # --- construction -----------------------------------------------------------------------------
    def _adopt(self, module, init, simulate: bool = False) -> list:
        """Meta parameters and buffers made real, frozen ones cast; returns the trainable (name, param)."""
        self._init, self._meta_src = init, {}
        # simulate: an engine built for its shapes and bytes only (launch.simulate) — every tensor stays on
        # meta and nothing is initialised
        self.simulated = simulate
        if simulate and (init is not None or not all(p.is_meta for p in module.parameters())):
            raise ValueError("ZeroOptimizer(simulate=True) takes a module whose parameters are all on the meta "
                             "device and no init record")
        if any(p.is_meta for p in module.parameters()) and not self.simulated:
            if init is None:
                raise ValueError("the module has parameters on the meta device: build it with "
                                 "parallel.zero.deferred_init(factory) and pass init=<the returned record>")
            self._meta_src = replace_meta_params(module, init)
        if not self.simulated:
            materialize_buffers(module, init)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        for p in module.parameters():                  # frozen params compute in the same dtype
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(self.prec.param_dtype)
        if not named:
            raise ValueError("ZeroOptimizer: the module has no parameters that require grad")
        return named

    def _init_state(self) -> None:
        """Flat parameters and fp32 masters of every bucket; offload stores take them one at a time."""
        for b in self._all:
            (init_sharded if self.stage == 3 and not b.deferred else init_full)(b, self._value, self.prec)
            if self._opt_off is not None:           # one bucket at a time: never the whole partition
                self._opt_off.add_bucket(b)
            if self._par_off is not None and self._par_off.has(b):
                self._par_off.add(b)

    def _build_optimizer(self, optimizer_factory) -> None:
        """The torch optimizer over one 1-D master view per owned parameter piece."""
        # (bucket, param index, flat a, flat e, view of the master): what the optimizer updates
        self._piece_list = [(b, i, a, e, b.master[a - b.lo:e - b.lo]) for b in self._all for i, a, e in b.pieces()]
        views = [pc[4] for pc in self._piece_list]
        self.optimizer = optimizer_factory(views)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer_factory returned {type(self.optimizer).__name__}, not a torch.optim.Optimizer")
        got = [p for g in self.optimizer.param_groups for p in g["params"]]
        if len(got) != len(views) or any(a is not b for a, b in zip(got, views)):
            raise ValueError("optimizer_factory must build the optimizer on exactly the tensors it is given "
                             "(one param group), e.g. lambda params: torch.optim.AdamW(params, lr=1e-3)")
        if self._opt_off is not None:
            self._opt_off.bind(self.optimizer, self._par_off)
        if hasattr(self.optimizer, "bind_partition"):      # LAMB, Muon: whole-tensor norms / matrices
            self._bind_partition()

    def _bind_partition(self) -> None:
        """Non-elementwise optimizers (:mod:`parallel.optim.tensorwise`) get ZeRO's pieces' layout."""
        if self._opt_off is not None:
            raise ValueError(f"zero.offload.optimizer streams an elementwise Adam: {type(self.optimizer).__name__} "
                             f"needs whole tensors; set zero.offload.optimizer=none or use adam/adamw")
        if hasattr(self.optimizer, "local_gradients"):     # 1-bit Adam: parallel/zero/onebit.py
            check_onebit(self)
        if self.expert_groups:
            raise ValueError(f"{type(self.optimizer).__name__} reads whole tensors over the dp partition, which does "
                             f"not cover expert parameters (parallel.ep > 1) yet: use an elementwise optimizer")
        tp = next((g for g in self.norm_groups if g.axis == "tp"), None)
        self.optimizer.bind_partition(ZeroPartition(self._piece_list, self._all, self.group, self.stage > 0, tp))

    def _hook_param_gathers(self, module) -> None:
        owner = {p: b for b in self._all for p in b.params}
        for m in module.modules():
            bs = list(dict.fromkeys(owner[p] for p in m.parameters(recurse=False) if p in owner))
            if bs:
                m.register_forward_pre_hook(lambda mod, args, bs=bs: self.wait_param_gather(bs))

    def wait_param_gather(self, buckets=None) -> None:
        """Wait for step()'s in-flight parameter all-gathers (all, or those of ``buckets``)."""
        for b in list(self._pending) if buckets is None else buckets:
            w = self._pending.pop(b, None)
            if w is not None:
                w.wait()

    def _value(self, p) -> torch.Tensor:
        """The parameter's full value in fp32 (materialised from the init record for meta-built ones)."""
        src = self._meta_src.get(p)
        return (self._init.materialize(src) if src is not None else p.detach()).float()

    # --- the step ---------------------------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        """Multiply the loss by this before backward (1.0 unless fp16)."""
        return self.scaler.scale

    def prepare_step(self, num_micro_batches: int = 1) -> None:
        """Announce the micro-batches of this step: buckets reduce after their m-th gradient."""
        self.reducer.prepare_step(num_micro_batches)
        self.reducer.local = bool(getattr(self.optimizer, "local_gradients", False))   # 1-bit Adam

    def no_sync(self):
        return self.reducer.no_sync()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._opt_off is not None:
            self._opt_off.discard()                    # a step begun in backward and never taken
        self.reducer.zero_grad()
        self._drop_master_grads()

    def _update_early(self, b: FlatBucket) -> None:
        """GradReducer callback (offload, no clipping, no fp16): update ``b`` while backward goes on."""
        g = b.shard_grad
        self._opt_off.update_early(b, g.float() if self.prec.master else g)

    def _drop_master_grads(self) -> None:
        for b in self._all:
            b.master.grad = None
        for pc in self._piece_list:
            pc[4].grad = None

    def finish_grad_sync(self) -> None:
        """Wait for every bucket, reduce deferred (tied, pp-reduced) parameters, free stage-3 units."""
        self.wait_param_gather()
        self.reducer.finish()
        if self.stage3 is not None:
            self.stage3.free_all()

    def _shard_grad(self, b: FlatBucket) -> torch.Tensor:
        if self.stage == 0:
            return b.flat_grad
        if self.stage == 1:
            return b.flat_grad[b.lo:b.hi]
        return b.shard_grad

    def grad_norm_sq(self) -> torch.Tensor:
        """[Σ tp-split g², Σ replicated g², Σ duplicate g²] over the whole model (float64); the unused-parameter
        count and ``loss_carry`` ride in its all-reduce (:mod:`.norm_carry`)."""
        return norm_sq_and_carry(self)

    def step(self) -> StepResult:
        """Unscale, check for a non-finite gradient (fp16 overflow, else ``on_nonfinite``), clip to
        ``grad_clip``, update, write back, gather."""
        if self.reducer.local:                         # 1-bit Adam's compressed phase
            result = onebit_step(self, StepResult)
            warn_onebit_unused(self, compressed=True)
            return result
        self.finish_grad_sync()
        inv = 1.0 / self.scaler.scale
        if self.direct:                                # fp32 over one rank: nothing to unscale or copy
            bind_grads(self)
        for b in self._all if not self.direct else ():
            g = self._shard_grad(b)
            if self.prec.master:
                b.master.grad = g.float().mul_(inv) if inv != 1.0 else g.float()
            else:
                b.master.grad = g
        try:
            v = self.grad_norm_sq()
        except BaseException:
            if self._opt_off is not None:
                self._opt_off.discard()                # an update begun in backward must not land
            raise
        if not math.isfinite(float(v.sum())):
            return self._nonfinite(v)
        norm = math.sqrt(float(v[0] + v[1]))
        if self.grad_clip is not None:
            coef = self.grad_clip / (norm + 1e-6)
            if coef < 1.0 and self.direct:
                clip_grads(self, coef)
            elif coef < 1.0:
                for b in self._all:
                    b.master.grad.mul_(coef)
        if self._opt_off is not None:
            self._opt_off.step()                       # streamed; new masters go straight to the params
        elif self._interleave:                         # stages 1-2: bucket k's gather under bucket k+1's update
            step_interleaved(self)
        else:
            for b, i, a, e, view in self._piece_list if not self.direct else ():   # no gradient on any rank
                view.grad = b.master.grad[a - b.lo:e - b.lo] if i not in getattr(b, "unused", ()) else None
            self.optimizer.step()
        if not self._interleave:
            self._drop_master_grads()
            self._write_back()
        self.scaler.update(False)
        self.steps += 1
        return StepResult(norm, False, self.scaler.scale)

    def _nonfinite(self, v: torch.Tensor) -> StepResult:
        """‖g‖² is not finite (the same on every rank): no update anywhere. fp16: the loss scaler's
        skip; otherwise ``on_nonfinite``: skip (a skipped result) or stop (:class:`NonFiniteError`)."""
        if self._opt_off is not None:
            self._opt_off.discard()
        if self.scaler.enabled:
            self._drop_master_grads()
            msg = self.scaler.update(True)             # LossScaleError at the minimum scale (DeepSpeed's rule)
            return StepResult(float("inf"), True, self.scaler.scale, msg)
        self._drop_master_grads()
        if self.on_nonfinite == "skip":
            return StepResult(float("nan"), True, self.scaler.scale, SKIP_MESSAGE, nonfinite_skip=True)
        parts = [float(x) for x in v]
        raise NonFiniteError(f"the loss or gradient is non-finite (gradient norm² parts {parts}); the update was "
                             f"not applied. Check the batch, lower the learning rate, or pass on_nonfinite='skip' "
                             f"(train.on_nonfinite=skip) to skip such steps", parts)
