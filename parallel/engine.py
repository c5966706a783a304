"""parallelize(model, config) → an Engine that trains the model over the 3D mesh.

The engine only composes; each part lives in its own module and gets its group from the mesh:

1. tensor parallelism (Megatron-LM, arXiv 1909.08053) converts the model in place over "tp";
2. the pipeline split (arXiv 2104.04473) keeps this pp rank's stages of the converted model;
   activation checkpointing (``activation_checkpointing.policy``) then hooks the repeated blocks of
   those stage modules — after tp (its hooks sit inside the blocks and rerun in the recompute) and
   the split (the stage copies' blocks are the ones that run), before ZeRO (whose stage-3 hooks are
   prepended and re-gather for the recompute; :mod:`parallel.activation.checkpointing`);
3. ZeRO (arXiv 1910.02054) shards the stage's optimizer state (stage ≥ 1), gradients (≥ 2) and
   parameters (3) over "dp", and owns precision, loss scaling and clipping (the global grad norm
   spans tp and pp through ``norm_groups``);
4. the pipeline executor runs the schedule's actions per step; with pp = 1 a plain loop over the
   micro-batches does the same.

Extension points, instead of patching its parts: ``engine.add_callback(fn)`` calls ``fn(phase,
step)`` at the phase boundaries of a step (:data:`PHASES`; the watchdog and fault injection use
it), ``engine.executor.add_action_callback`` sees each pipeline action, and the non-finite policy
(``train.on_nonfinite``) lives in ZeRO's step.

Gradients of a step are Σ_i ∇(L_i · s / m) over the m micro-batches of every dp rank, averaged over
dp: the gradient of the mean loss over the global batch (times the fp16 loss scale s), which is
what a single process computes (the parity contract in DESIGN.md).
For dict batches (and ``loss: model``) L_i is weighted by its scored tokens so that the sum is the
mean over the scored tokens of the global batch, not a mean of micro-batch means (:mod:`parallel.batch`).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from parallel import batch as batches
from parallel import comm
from parallel.activation.checkpointing import apply_activation_checkpointing
from parallel.checkpoint import engine_state
from parallel.checkpoint.layout import meta_copy
from parallel.compile import apply_compile
from parallel.config import Config, ConfigError
from parallel.context_parallel import ContextParallel
from parallel.context_parallel.engine_hooks import ContextInputs
from parallel.data_parallel import sync_batchnorm
from parallel.data_parallel.buffer_drift import BufferWatch
from parallel.engine_callbacks import PhaseCallbacks
from parallel.engine_inputs import BatchInputs
from parallel.layer_drop import apply_layer_drop
from parallel.loss import check_class_targets, cross_entropy, logits_of, resolve_loss
from parallel.mesh import Mesh
from parallel.moe import apply_expert_parallel, moe_layers, set_aux_scale
from parallel.optim.factory import optimizer_factory
from parallel.optim.lr_schedule import build_scheduler
from parallel.pipeline import PipelineExecutor, find_body, get_schedule, split_for, sync_tied_grads
from parallel.pipeline.stage import follow_dtype
from parallel.tensor_parallel import apply_tensor_parallel, vocab_parallel_cross_entropy
from parallel.zero import NonFiniteError, StepResult, ZeroOptimizer

# phase callbacks, in the order a step meets them; see Engine.add_callback
PHASES = ("forward", "backward", "optimizer", "checkpoint", "checkpoint_written")


class Engine(BatchInputs, PhaseCallbacks, ContextInputs):
    """``train_step(batch)`` takes this dp rank's share of the global batch
    (:func:`parallel.data.rank_batch`) and returns the mean loss over the global batch, on every
    rank. ``save(dir)`` / ``load(dir)`` write and read reshardable checkpoints."""

    def __init__(self, model: nn.Module, config: Config, mesh: Mesh, optimizer=None, sample=None):
        self.cfg, self.mesh, self._sample = config, mesh, sample      # sample: one input, for the pipeline split
        p = config.parallel
        self.tp, self.pp, self.dp = mesh.group("tp"), mesh.group("pp"), mesh.group("dp")
        self.dp_cp, self.context = mesh.group("dp_cp"), None          # gradients reduce over dp×cp
        if p.cp > 1:                                                   # context parallel: parallel/context_parallel
            self.context = _context_parallel(model, mesh, p.cp_algorithm)
        self.template = meta_copy(model)            # the unmodified model's structure (no memory)
        self.tensor_parallel = None                  # TPConversion, set by _shard when tp > 1
        self.sync_bn = sync_batchnorm.prepare(model, config, self.dp, mesh.rank)   # BatchNorm over dp (in place)
        self.layer_drop = self._layer_drop(model)    # pld: droppable blocks, before tp/pp copy them
        blocks = self._block_types(model) if config.zero.stage == 3 and config.zero.units == "block" else None
        self.stages = self._shard(model if mesh.device.type == "meta" else model.to(mesh.device))
        ac = config.activation_checkpointing
        try:
            self.activation = apply_activation_checkpointing(self.stages, ac.policy, ac.every, ac.save_ops)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.module = self.stages[0] if len(self.stages) == 1 else nn.ModuleList(self.stages)
        self.moe = moe_layers(self.stages, reset=True)   # MoE layers of this rank's stages (parallel/moe/)
        if blocks and len(self.stages) > 1:          # each virtual stage's own parameters: one unit each
            blocks += tuple(dict.fromkeys(type(s) for s in self.stages))
        self.loss_mode, self.label_name = self._loss_mode()
        self.loss_fn = self._loss(model)
        opt = optimizer or optimizer_factory(config.optimizer)
        self.zero = ZeroOptimizer(self.module, opt, self.dp_cp, config.zero,
                                  precision=config.precision, grad_clip=config.train.grad_clip,
                                  on_nonfinite=config.train.on_nonfinite, norm_groups=(self.tp, self.pp),
                                  unit_types=blocks, loss_scale=config.loss_scale,
                                  simulate=mesh.device.type == "meta",
                                  expert_groups=(mesh.group("ep"), mesh.group("edp")) if p.ep > 1 else None)
        try:                                         # compile.enabled: torch.compile per block (parallel/compile.py)
            self.compiled = apply_compile(self.stages, config.compile, bool(self.moe), mesh.device.type)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.scheduler = build_scheduler(self.zero.optimizer, config.scheduler, config.train.steps)
        self.executor = None
        if p.pp > 1:
            sched = get_schedule(p.pp_schedule, p.pp, config.micro_batches, p.pp_virtual_stages)
            self.executor = PipelineExecutor(self.stages, sched, self.pp, self.loss_fn,  # ZeRO-3 frees a unit
                                             split_backward=config.zero.stage != 3,         # before a split W
                                             p2p_groups=mesh.pp_p2p_groups(),              # NCCL-safe order
                                             act_shapes=p.tp == 1 and p.cp == 1)   # probe's shapes: no header
            if self.zero.stage3 is not None:     # several forwards before their backwards: keep none (stage3.py)
                self.zero.stage3.keep = 0
            self.executor.add_action_callback(self._stage_inputs)   # dict batches: masks etc. to every stage
            self.executor.add_action_callback(self._cp_action)      # cp: this micro-batch's document ids
            for st in self.stages:                                  # loss=model: the last stage returns the output
                if hasattr(st, "stage_info"):
                    st.stage_info.keep_output = self.loss_mode == "model"
                    tpc = self.tensor_parallel              # region SP (and any SP under cp, whose position ids
                    sp_cp = p.sequence_parallel and p.cp > 1    # are (b, s/cp)): later stages' stand-in ids span
                    st.stage_info.seq_factor = p.tp if tpc is not None and (tpc.region or sp_cp) else 1    # it all
                    follow_dtype(st)                        # bf16/fp16: stand-in embeddings in the compute dtype
        self._current: list = []
        self.step_count = 0
        self.skips_in_a_row, self.max_skips = 0, config.train.max_skips   # consecutive non-finite skips, their limit
        self.last_result = None
        self._callbacks, self._hooks, self._transform = [], [], None
        self._buffer_watch = BufferWatch(self.stages, self.dp_cp.size, self.dp_cp.rank, "dp·cp" if p.cp > 1 else "dp")

    # --- construction -----------------------------------------------------------------------------
    @staticmethod
    def _block_types(model: nn.Module) -> tuple:
        """zero.units=block: the classes of the model's repeated blocks (the pipeline split's body)."""
        try:
            body = find_body(model)[1]
        except ValueError as e:
            raise ConfigError(f"zero.units=block: {e}; or use zero.units=module") from None
        return tuple(dict.fromkeys(type(b) for b in body))
    def _layer_drop(self, model: nn.Module):
        """pld.enabled: progressive layer dropping (:mod:`parallel.layer_drop`), else None."""
        c, z = self.cfg.pld, self.cfg.zero
        if not c.enabled:
            return None
        if z.stage == 3 and z.units != "block":
            raise ConfigError("pld.enabled with zero.stage=3 needs zero.units=block (a dropped block's "
                              "parameters are gathered by its own unit): set zero.units=block")
        try:
            return apply_layer_drop(model, c.theta, c.gamma, self.cfg.train.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _shard(self, model: nn.Module) -> list:
        """TP then PP: the stage modules this rank keeps (also replayed on the layout probe)."""
        p = self.cfg.parallel
        if p.tp > 1:
            self.tensor_parallel = apply_tensor_parallel(model, self.tp, p.tp_plan, p.sequence_parallel,
                                                         gather_logits=self.cfg.loss == "model")
        try:
            apply_expert_parallel(model, self.mesh.group("ep"), self.mesh.group("cp"),     # E/ep experts per rank
                                  p.sequence_parallel and p.tp > 1)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if p.pp == 1:
            return [model]
        sample, w = self._sample, next(model.parameters(), None)
        if sample is None and p.sequence_parallel and p.tp > 1 and w is not None:
            sample = torch.zeros(1, math.lcm(4, p.tp), dtype=torch.long)    # the probe's length splits over tp
        if isinstance(sample, torch.Tensor) and w is not None:      # the layout probe replays this in float64
            sample = sample.to(w.device, dtype=w.dtype if sample.is_floating_point() else sample.dtype)
        return split_for(p.pp_schedule, model, self.pp.rank, p.pp, p.pp_virtual_stages, split=p.pp_split,
                         balance=p.pp_balance, sample=sample)

    def _loss(self, model):
        if self.loss_mode == "model":
            return batches.token_loss(None, "model")
        fn = resolve_loss(self.cfg.loss)
        if self.tensor_parallel is not None and self.tensor_parallel.vocab_parallel_output:
            if fn is not cross_entropy:
                raise ConfigError(f"loss={self.cfg.loss!r}: the tensor-parallel plan leaves the logits split by "
                                  f"vocabulary, which only loss=cross_entropy handles; use a plan whose head gathers")
            tp = self.tp

            def fn(out, y):
                check_class_targets(logits_of(out), y)
                return vocab_parallel_cross_entropy(logits_of(out), y, tp)
        return batches.token_loss(fn, self.loss_mode)

    # --- one step ---------------------------------------------------------------------------------
    def _to(self, t):
        return t.to(self.mesh.device, non_blocking=True)

    def train_step(self, batch) -> float:
        for st in self.stages:
            st.train()
        micro = self._micro(batch)
        z = self.zero
        if self.layer_drop is not None:
            self.layer_drop.step = self.step_count
        z.zero_grad()
        z.prepare_step(len(micro))
        set_aux_scale(self.moe, z.loss_scale / len(micro))      # MoE aux losses: mean over micro-batches
        if self.executor is None:
            total = 0.0
            with self._cp_active():
                for mb in micro:
                    mb = self._cp_shard(mb)
                    loss = self.loss_fn(self._forward(mb), mb.y)
                    (loss * (z.loss_scale / len(micro))).backward()
                    total += loss.item()
            local = total / len(micro)
        else:
            self.executor.loss_scale = z.loss_scale
            self._current = micro = self._cp_micro(micro)          # cp: the sequence shards (engine_hooks)
            try:
                with self._cp_active():
                    local = self.executor.run([(mb.x, mb.y) for mb in micro])
            finally:
                self._current = []
                self._clear_stage_inputs()
            sync_tied_grads(self.stages, self.pp)
        batches.settle(micro)                    # the scored-token count, if no loss read it (pp: not the last stage)
        local = self._pp_loss(local)             # rides in the norm's dp·cp all-reduce (zero/norm_carry.py), if any
        z.loss_carry, z.carried_loss = local, None
        if self.step().nonfinite_skip:
            return float("nan")                  # no loss to share: the ranks agree it is not finite
        # fp16: a non-finite loss overflows the gradients too, and the loss scaler skips the step (DeepSpeed's
        # rule; its minimum-scale stop bounds a run of them). fp32/bf16: step() already applied on_nonfinite.
        s = z.carried_loss                       # None where the norm is not reduced over dp (stage 0, ...)
        return self._dp_mean(local) if s is None else s / self.dp_cp.size     # (bitwise the same number)

    # --- a user's own loop (pp = 1): forward, backward, step ------------------------------------------
    def __call__(self, x):
        """Forward of the (tensor-parallel, ZeRO-sharded) model, as in the user's own loop."""
        self._own_loop_check()
        return self.module(self._to(x))

    def loss(self, output, target):
        """The configured loss (vocab-parallel cross-entropy when the logits are split over tp)."""
        return self.loss_fn(output, self._to(target))

    def zero_grad(self, micro_batches: int | None = None) -> None:
        """Start a step of ``micro_batches`` backward calls (default: the config's count)."""
        self._own_loop_check()
        if self.layer_drop is not None:
            self.layer_drop.step = self.step_count
        self.zero.zero_grad()
        self._own_m = micro_batches or self.cfg.micro_batches
        set_aux_scale(self.moe, self.zero.loss_scale / self._own_m)
        self.zero.prepare_step(self._own_m)

    def backward(self, loss) -> None:
        """Backward of one micro-batch's mean loss (scaled by 1/m and the fp16 loss scale)."""
        if not hasattr(self, "_own_m"):
            raise RuntimeError("call engine.zero_grad() at the start of each step, before engine.backward()")
        (loss * (self.zero.loss_scale / self._own_m)).backward()

    def step(self) -> StepResult:
        """Reduce gradients over dp, clip, update (skipped on fp16 overflow, or on a non-finite
        gradient with train.on_nonfinite=skip), advance the schedule; the step counts either way.
        A non-finite gradient with train.on_nonfinite=stop raises NonFiniteError naming the step, and
        so does the (train.max_skips + 1)-th skipped step in a row with skip."""
        s = self.step_count
        self._emit("optimizer", s)
        try:
            self.last_result = self.zero.step()
        except NonFiniteError as e:
            G = self.cfg.data.global_batch_size
            raise NonFiniteError(f"step {s}: the loss or gradient is non-finite (gradient norm² parts {e.parts}); "
                                 f"the update was not applied. Check the data of global batch {s} (dataset positions "
                                 f"[{s * G}, {(s + 1) * G})), lower optimizer.lr, or set train.on_nonfinite=skip to "
                                 f"skip such steps", e.parts) from None
        if self.last_result.nonfinite_skip:
            self._check_skips(s)
        elif not self.last_result.skipped:
            self.skips_in_a_row = 0
        if not self.last_result.skipped:
            self.scheduler.step()
        self.step_count += 1
        self._buffer_watch.check(self.stages)        # the first step: buffers the forward wrote (buffer_drift.py)
        return self.last_result

    def _check_skips(self, s: int) -> None:
        """train.on_nonfinite=skip allows train.max_skips consecutive skipped steps; the next one stops."""
        self.skips_in_a_row += 1
        n, m = self.skips_in_a_row, self.max_skips
        if n > m:
            G = self.cfg.data.global_batch_size
            raise NonFiniteError(f"step {s}: {n} consecutive steps ({s - n + 1}..{s}) had a non-finite loss or "
                                 f"gradient and were skipped, more than train.max_skips={m} allows "
                                 f"(train.on_nonfinite=skip): the run diverged or the data is bad. Check the data of "
                                 f"global batches {s - n + 1}..{s} (dataset positions [{(s - n + 1) * G}, "
                                 f"{(s + 1) * G})), lower optimizer.lr, or raise train.max_skips", [])

    def _own_loop_check(self) -> None:
        if self.context is not None:
            raise RuntimeError("with parallel.cp > 1 the engine shards each sequence over the cp ranks: call "
                               "engine.train_step(batch) instead of engine(x) / engine.backward(loss)")
        if self.executor is not None:
            raise RuntimeError("with parallel.pp > 1 the pipeline schedule owns forward and backward: "
                               "call engine.train_step(batch) instead of engine(x) / engine.backward(loss)")

    def _pp_loss(self, local: float | None) -> float:
        """The last stage's loss on every pp rank (a control broadcast; the rank: p − 1, or 0 in a V placement)."""
        if self.pp.size == 1:
            return local
        t, sc = torch.tensor([0.0 if local is None else local], dtype=torch.float64), self.executor.schedule
        comm.broadcast(t, self.pp.control(), src=sc.rank_of(sc.n_stages - 1))
        return t.item()

    def _dp_mean(self, local: float) -> float:
        t = comm.all_reduce(torch.tensor([local], dtype=torch.float64), self.dp_cp.control())
        return t.item() / self.dp_cp.size

    @torch.no_grad()
    def eval_step(self, batch) -> float:
        """Mean loss over the global batch, forward only (with pp > 1: the executor's forward-only
        schedule over the training schedule's placement)."""
        for st in self.stages:
            st.eval()
        micro = self._micro(batch)
        with self.zero.gathered() if self.cfg.zero.stage == 3 else contextlib.nullcontext():
            if self.executor is None:
                with self._cp_active():                   # map: one micro-batch sharded at a time
                    local = sum(self.loss_fn(self._forward(mb), mb.y).item() for mb in map(self._cp_shard, micro))
                local /= len(micro)
            else:
                self._current = micro = self._cp_micro(micro)   # dict batches: each stage's masks / positions
                try:
                    with self._cp_active():
                        local = self.executor.forward([(mb.x, mb.y) for mb in micro])
                finally:
                    self._current = []
                    self._clear_stage_inputs()
        batches.settle(micro)
        return self._dp_mean(self._pp_loss(local))      # shared over pp, averaged over dp·cp (control traffic)

    # --- state ------------------------------------------------------------------------------------
    def save(self, path: str, extra_meta: dict | None = None) -> str:
        s = self.step_count - 1
        self._emit("checkpoint", s)
        return engine_state.save_engine(self, path, extra_meta or {},
                                        on_written=lambda: self._emit("checkpoint_written", s))

    def load(self, path: str) -> dict:
        meta = engine_state.load_engine(self, path)
        self.step_count = int(meta["step"])
        if self._buffer_watch.before is not None:     # loaded buffers are not the forward's writes
            self._buffer_watch.snapshot(self.stages)
        return meta

    def full_state_dict(self) -> dict | None:
        """The unmodified model's state_dict (collective; returned on rank 0, None elsewhere)."""
        return engine_state.full_state_dict(self)

    def full_model(self) -> nn.Module | None:
        """The unmodified model with the trained weights (collective; rank 0, None elsewhere)."""
        return engine_state.full_model(self)

    def model_state_bytes(self) -> dict:
        return self.zero.model_state_bytes()

    def close(self) -> None:
        """Remove the gradient hooks the engine put on parameters. They live in the tensors' C++
        autograd metadata, where the garbage collector cannot follow the cycle parameter → hook →
        reducer → parameter: without this the engine, its groups and gloo's threads outlive the job
        (launch.lifecycle.shutdown). The engine cannot train afterwards."""
        reducer = getattr(self.zero, "reducer", None)
        if reducer is not None:
            reducer.remove()


def _context_parallel(model, mesh, algorithm):
    cp = ContextParallel(mesh.group("cp"), algorithm)
    try:
        cp.prepare(model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cp


def parallelize(model: nn.Module, config: Config, mesh: Mesh | None = None, optimizer=None, sample=None) -> Engine:
    """Compose the configured parallelism around ``model`` (built identically on every rank).

    ``optimizer``: optionally the user's own ``params -> torch.optim.Optimizer`` (elementwise
    optimizers: SGD, Adam(W), Adagrad, ...); by default it is built from ``config.optimizer``. ``sample``: one
    input batch (e.g. a micro-batch's inputs) for the pipeline split's probe forward (needed by models
    that do not take token ids, and by parallel.pp_balance=flops|time)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"parallelize needs an nn.Module, got {type(model).__name__}")
    p = config.parallel
    mesh = mesh or Mesh(pp=p.pp, dp=p.dp, tp=p.tp, ep=p.ep, cp=p.cp)
    got = tuple(mesh.size(a) for a in ("pp", "dp", "cp", "tp"))
    if got != (p.pp, p.dp, p.cp, p.tp):
        raise ConfigError(f"the mesh is pp×dp×cp×tp = {'×'.join(map(str, got))} but the config says "
                          f"{p.pp}×{p.dp}×{p.cp}×{p.tp}: build the Mesh from config.parallel")
    if getattr(mesh, "ep", 1) != p.ep:
        raise ConfigError(f"the mesh has ep={getattr(mesh, 'ep', 1)} but the config says parallel.ep={p.ep}: "
                          f"build the Mesh with ep=config.parallel.ep")
    return Engine(model, config, mesh, optimizer, sample)
