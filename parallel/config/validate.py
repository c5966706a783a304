"""Cross-field checks of a :class:`~parallel.config.Config`, before any process group exists.

Every check fails with one :class:`ConfigError` that names the key, the value and what to change.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from parallel.config.compile_keys import check_compile
from parallel.config.errors import ConfigError
from parallel.config.faults import check_fault
from parallel.config.onebit_keys import check_onebit_keys

if TYPE_CHECKING:
    from parallel.config.schema import Config

__all__ = ["CHOICES", "validate", "check_factory", "check_schedule"]

CHOICES = {
    "loss": ("cross_entropy", "mse", "model"),
    "optimizer.name": ("adamw", "adam", "sgd", "lamb", "muon", "onebit_adam", "onebit_lamb", "zero_one_adam"),
    "parallel.pp_schedule": ("gpipe", "1f1b", "interleaved", "zero_bubble", "zb_v", "dualpipe_v"),
    "parallel.pp_balance": ("params", "flops"),
    "parallel.cp_algorithm": ("ring", "ulysses"),
    "precision": ("fp32", "bf16", "fp16"),
    "device": ("cpu", "cuda", "auto"),
    "scheduler.name": ("constant", "warmup", "warmup_linear", "warmup_cosine"),
    "scheduler.warmup_type": ("linear", "log"),
    "scheduler.convention": ("native", "deepspeed"),
    "zero.offload.optimizer": ("none", "cpu", "nvme"),
    "zero.offload.params": ("none", "cpu", "nvme"),
    "train.on_nonfinite": ("stop", "skip"),
    "activation_checkpointing.policy": ("none", "full", "every", "selective", "offload"),
}


def check_factory(key: str, spec: str) -> None:
    if not spec:
        raise ConfigError(f"{key} is not set: give 'pkg.module:function' (e.g. examples.gpt:build)")
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"{key}={spec!r} must look like 'pkg.module:function'")


def validate(c: Config, world_size: int | None = None) -> None:
    """Check ``c`` (for a job of ``world_size`` processes when given); raise :class:`ConfigError` naming the key.
    The sections run in this order, so the first problem found is reported."""
    _check_choices(c)
    _check_batch(c, world_size)
    _check_parallel(c)
    _check_zero(c)
    _check_activation(c)
    _check_train(c, world_size)
    _check_optimizer(c)
    check_compile(c)
    if not (0.0 < c.pld.theta <= 1.0 and c.pld.gamma >= 0.0):
        raise ConfigError(f"pld.theta={c.pld.theta} must be in (0, 1] and pld.gamma={c.pld.gamma} >= 0 "
                          f"(progressive layer dropping's floor keep probability and decay rate)")


def _check_choices(c: Config) -> None:
    """Every enumerated key holds one of its values; the factories look like 'pkg.module:function'."""
    for key, allowed in CHOICES.items():
        v = c
        for part in key.split("."):
            v = getattr(v, part)
        if key == "loss" and ":" in v:
            continue
        if v not in allowed:
            raise ConfigError(f"{key}={v!r} is not one of {list(allowed)}")
    check_factory("model.factory", c.model.factory)
    check_factory("data.factory", c.data.factory)


def _check_batch(c: Config, world_size: int | None) -> None:
    """Sizes, the world size, and the batch cut into dp ranks and micro-batches (the pipeline's count)."""
    p, d, t = c.parallel, c.data, c.train
    for key, v in (("parallel.dp", p.dp), ("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.cp", p.cp),
                   ("data.global_batch_size", d.global_batch_size), ("data.micro_batch_size", d.micro_batch_size),
                   ("parallel.pp_virtual_stages", p.pp_virtual_stages)):
        if v < 1:
            raise ConfigError(f"{key}={v} must be at least 1")
    if t.steps < 0:
        raise ConfigError(f"train.steps={t.steps} must be 0 or more")
    if d.prefetch < 0:
        raise ConfigError(f"data.prefetch={d.prefetch} must be 0 (load in the step) or more (batches loaded ahead)")
    if world_size is not None and c.world_size != world_size:
        axes, sizes = "dp*tp*pp", f"{p.dp}*{p.tp}*{p.pp}"
        if p.cp > 1:
            axes, sizes = axes + "*cp", f"{sizes}*{p.cp}"
        raise ConfigError(f"parallel.{axes} = {sizes} = {c.world_size} but the job has {world_size} processes: "
                          f"change parallel.{axes.replace('*', '/')} or start {c.world_size} processes "
                          f"(--nproc {c.world_size})")
    if d.global_batch_size % p.dp:
        raise ConfigError(f"data.global_batch_size={d.global_batch_size} does not divide over parallel.dp={p.dp} "
                          f"ranks: use a multiple of {p.dp}")
    per_rank = d.global_batch_size // p.dp
    if per_rank % d.micro_batch_size:
        raise ConfigError(f"data.micro_batch_size={d.micro_batch_size} does not divide the {per_rank} samples each of "
                          f"the {p.dp} dp ranks gets per step (data.global_batch_size={d.global_batch_size}): "
                          f"choose a divisor of {per_rank}")
    m = per_rank // d.micro_batch_size
    if p.pp_schedule == "interleaved":
        if p.pp_virtual_stages < 2:
            raise ConfigError("parallel.pp_schedule=interleaved needs parallel.pp_virtual_stages >= 2")
        if m % p.pp:
            raise ConfigError(f"parallel.pp_schedule=interleaved needs the micro-batch count ({m}) to be a multiple "
                              f"of parallel.pp={p.pp}: change data.micro_batch_size or data.global_batch_size")
    elif p.pp_schedule in ("zb_v", "dualpipe_v"):
        _check_v(p, m)
    elif p.pp_virtual_stages != 1:
        raise ConfigError(f"parallel.pp_virtual_stages={p.pp_virtual_stages} only applies to "
                          f"parallel.pp_schedule=interleaved, zb_v or dualpipe_v (got {p.pp_schedule!r}): set it to 1")


def _check_v(p, m: int) -> None:
    """zb_v / dualpipe_v: two stages per rank in a V (stages r and 2p−1−r), so v = 2; DualPipeV
    needs m >= 2p micro-batches. (With pp = 1 the schedule is not used, as for interleaved.)"""
    name = p.pp_schedule
    if p.pp_virtual_stages != 2:
        raise ConfigError(f"parallel.pp_schedule={name} places two stages on each pp rank (a V: stages r and "
                          f"2·pp−1−r), but parallel.pp_virtual_stages={p.pp_virtual_stages}: set "
                          "parallel.pp_virtual_stages=2")
    if name == "dualpipe_v" and p.pp > 1 and m < 2 * p.pp:
        raise ConfigError(f"parallel.pp_schedule=dualpipe_v needs at least 2·pp = {2 * p.pp} micro-batches per dp "
                          f"rank, got {m} (data.global_batch_size / (parallel.dp · data.micro_batch_size)): lower "
                          "data.micro_batch_size, raise data.global_batch_size, or use pp_schedule=zb_v")


def _check_parallel(c: Config) -> None:
    """Sequence parallel, the tensor-parallel plan, sync_batchnorm and the pipeline split."""
    p = c.parallel
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1 (it shards along the sequence "
                          "within the tp group)")
    if not (p.tp_plan == "auto" or isinstance(p.tp_plan, dict)):
        raise ConfigError(f"parallel.tp_plan={p.tp_plan!r} must be 'auto' or a mapping "
                          f"{{module glob: colwise|rowwise|vocab}}")
    if not isinstance(p.ep, int) or p.ep < 1 or (p.dp * p.cp) % p.ep:
        what = f"parallel.dp={p.dp}" if p.cp == 1 else f"parallel.dp·cp={p.dp * p.cp}"
        raise ConfigError(f"parallel.ep={p.ep!r} must be a positive divisor of {what}: expert parallelism "
                          f"is carved out of data (×context) parallelism (dp·cp = ep × expert-data-parallel size)")
    _check_cp(c)
    if not isinstance(p.sync_batchnorm, bool):
        raise ConfigError(f"parallel.sync_batchnorm={p.sync_batchnorm!r} must be true or false")
    if not (p.pp_split == "auto" or isinstance(p.pp_split, list) and p.pp_split and (
            all(isinstance(b, int) and not isinstance(b, bool) for b in p.pp_split)
            or all(isinstance(b, str) and b for b in p.pp_split))):
        raise ConfigError(f"parallel.pp_split={p.pp_split!r} must be 'auto', a list of block indices where stages "
                          "start, or a list of module names where stages start (e.g. [features.4, head])")


def _check_cp(c: Config) -> None:
    """Context parallelism: the sequence splits into 2·cp zig-zag chunks; sequence parallelism cuts each rank's
    sequence (seq_len / cp) into tp chunks — checked here, before any worker starts, rather than at the first
    forward's scatter (the data factories' ``seq_len`` is the model's input length)."""
    p = c.parallel
    ev = c.data.eval.get("kwargs") if isinstance(c.data.eval, dict) else None
    for key, kw in (("data.kwargs", c.data.kwargs), ("data.eval.kwargs", ev)):
        n = kw.get("seq_len") if isinstance(kw, dict) else None
        if p.sequence_parallel and p.tp > 1 and isinstance(n, int) and n % p.cp == 0 and (n // p.cp) % p.tp:
            local = f"{n}" if p.cp == 1 else f"{n} / cp = {n // p.cp}"
            mult = math.lcm(p.tp * p.cp, 2 * p.cp) if p.cp > 1 else p.tp     # also whole 2·cp zig-zag chunks
            raise ConfigError(f"parallel.sequence_parallel=true: the sequence length {local} ({key}.seq_len) is not "
                              f"divisible by parallel.tp={p.tp} (each tp rank holds one chunk): use a multiple of "
                              f"{mult} for {key}.seq_len, or set parallel.sequence_parallel=false")
    if p.cp == 1:
        return
    for key, kw in (("data.kwargs", c.data.kwargs), ("data.eval.kwargs", ev)):    # eval batches split over cp too
        seq = kw.get("seq_len") if isinstance(kw, dict) else None
        if isinstance(seq, int) and seq % (2 * p.cp):
            raise ConfigError(f"parallel.cp={p.cp}: the sequence length {seq} ({key}.seq_len) must be divisible "
                              f"by 2·cp = {2 * p.cp} (the zig-zag split into 2·cp chunks): change seq_len or "
                              f"parallel.cp")


def _check_zero(c: Config) -> None:
    """ZeRO stage, buckets, stage-3 units and what may be offloaded where."""
    if not 0 <= c.zero.stage <= 3:
        raise ConfigError(f"zero.stage={c.zero.stage} must be 0, 1, 2 or 3")
    if c.zero.bucket_mb <= 0:
        raise ConfigError(f"zero.bucket_mb={c.zero.bucket_mb} must be positive")
    if c.zero.keep_after_forward < 0:
        raise ConfigError(f"zero.keep_after_forward={c.zero.keep_after_forward} must be >= 0 (stage-3 units kept "
                          "gathered from forward to backward; 0 frees every unit after its forward)")
    for key in ("unit_mb", "max_reuse_distance"):
        v = getattr(c.zero, key)
        if v is None and key == "max_reuse_distance":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise ConfigError(f"zero.{key}={v!r} must be a finite number >= 0 ("
                              + ("MiB of parameters per stage-3 unit; 0 keeps one unit per module or block)"
                                 if key == "unit_mb" else "elements, as DeepSpeed's stage3_max_reuse_distance; "
                                 "null keeps zero.keep_after_forward units)"))
    if (c.zero.unit_mb or c.zero.max_reuse_distance is not None) and c.zero.stage != 3:
        raise ConfigError(f"zero.unit_mb / zero.max_reuse_distance only apply to stage-3 units (zero.stage is "
                          f"{c.zero.stage}): remove them or set zero.stage=3")
    if c.zero.units not in ("module", "block"):
        raise ConfigError(f"zero.units={c.zero.units!r} must be 'module' (a stage-3 unit per module that owns "
                          f"parameters) or 'block' (one per repeated block, plus one for the rest)")
    if c.zero.offload.params != "none" and c.zero.stage != 3:
        raise ConfigError(f"zero.offload.params={c.zero.offload.params} needs zero.stage=3 (got {c.zero.stage})")
    if "nvme" in (c.zero.offload.params, c.zero.offload.optimizer) and not c.zero.offload.nvme_path:
        raise ConfigError("zero.offload uses nvme but zero.offload.nvme_path is not set: give a directory on a "
                          "local disk")


def _check_activation(c: Config) -> None:
    a = c.activation_checkpointing
    if a.every < 1:
        raise ConfigError(f"activation_checkpointing.every={a.every} must be >= 1 (recompute blocks 0, k, 2k, …)")
    if a.every != 1 and a.policy != "every":
        raise ConfigError(f"activation_checkpointing.every={a.every} only applies to policy=every (got "
                          f"{a.policy!r}): set policy: every, or remove 'every'")
    if a.save_ops is not None and (a.policy != "selective" or not isinstance(a.save_ops, list)
                                   or not all(isinstance(o, str) for o in a.save_ops)):
        raise ConfigError(f"activation_checkpointing.save_ops={a.save_ops!r} must be a list of aten op names "
                          f"(e.g. ['mm', 'addmm']) and only applies to policy=selective (got {a.policy!r})")


SAVE_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


def check_signals(names) -> list:
    """``train.save_on_signal``: signal names (``SIGTERM`` or ``TERM``), normalised to ``SIGTERM``."""
    if not isinstance(names, (list, tuple)):
        names = [names] if names else []
    out = []
    for n in names:
        name = str(n).upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name not in SAVE_SIGNALS:
            raise ConfigError(f"train.save_on_signal: {n!r} is not one of {list(SAVE_SIGNALS)} (SIGINT and SIGHUP "
                              f"stop at once; give [] to let every signal stop the job without saving)")
        out.append(name)
    return list(dict.fromkeys(out))


def _check_train(c: Config, world_size: int | None) -> None:
    """The run: learning-rate schedule, offload IO buffers, clipping, timeout, fault injection, checkpoints."""
    t = c.train
    _check_scheduler(c)
    off = c.zero.offload
    if off.buffer_count < 1 or off.buffer_mb <= 0 or off.prefetch_depth < 0:
        raise ConfigError(f"zero.offload: buffer_count={off.buffer_count} must be >= 1, buffer_mb={off.buffer_mb} "
                          f"> 0 and prefetch_depth={off.prefetch_depth} >= 0")
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise ConfigError(f"train.grad_clip={t.grad_clip} must be positive (or null for no clipping)")
    if t.timeout_s <= 0:
        raise ConfigError(f"train.timeout_s={t.timeout_s} must be positive")
    if t.eval_every < 0:                 # (step + 1) % −k == 0 at every step: it would evaluate every step
        raise ConfigError(f"train.eval_every={t.eval_every} must be 0 (evaluate data.eval after the last step "
                          f"only) or positive (every N steps)")
    if t.log_every < 1:
        raise ConfigError(f"train.log_every={t.log_every} must be >= 1 (rank details every N steps and at the last)")
    ev = c.data.eval
    if isinstance(ev, dict) and set(ev) - {"factory", "kwargs", "batches"}:   # checked before any worker starts
        raise ConfigError(f"data.eval has unknown keys {sorted(set(ev) - {'factory', 'kwargs', 'batches'})}; "
                          f"allowed: factory, kwargs, batches")
    if t.fault is not None:
        check_fault(c, world_size)
    if t.max_skips < 0:
        raise ConfigError(f"train.max_skips={t.max_skips} must be 0 or more (consecutive skipped steps allowed "
                          f"with train.on_nonfinite=skip)")
    t.save_on_signal = check_signals(t.save_on_signal)
    if t.checkpoint.every < 0:
        raise ConfigError(f"train.checkpoint.every={t.checkpoint.every} must be 0 (never) or positive")
    if t.checkpoint.keep_last is not None and t.checkpoint.keep_last < 1:
        raise ConfigError(f"train.checkpoint.keep_last={t.checkpoint.keep_last!r} must be a positive number of "
                          f"checkpoints to keep, or null to keep all")
    if t.checkpoint.every and not t.checkpoint.dir:
        raise ConfigError("train.checkpoint.every is set but train.checkpoint.dir is not: give a directory")
    if t.resume and not t.checkpoint.dir:
        raise ConfigError("train.resume=true needs train.checkpoint.dir (where to look for checkpoints)")
    ls = c.loss_scale
    for key, v, ok in (("initial", ls.initial, ls.initial > 0), ("growth_interval", ls.growth_interval,
                       ls.growth_interval >= 1), ("hysteresis", ls.hysteresis, ls.hysteresis >= 1),
                       ("min", ls.min, ls.min > 0), ("static", ls.static, ls.static is None or ls.static > 0)):
        if not ok:
            raise ConfigError(f"loss_scale.{key}={v} must be positive (growth_interval and hysteresis: integers "
                              f">= 1; static: null for dynamic scaling)")


def _check_optimizer(c: Config) -> None:
    """Optimizer hyper-parameters that apply to the chosen optimizer only."""
    o = c.optimizer
    if o.betas is not None and (len(o.betas) != 2 or not all(isinstance(b, (int, float)) for b in o.betas)):
        raise ConfigError(f"optimizer.betas={o.betas!r} must be two numbers, e.g. [0.9, 0.999]")
    if o.lr is not None and o.lr < 0:
        raise ConfigError(f"optimizer.lr={o.lr} must not be negative")
    _check_ranges(o)
    if o.name == "sgd" and o.betas is not None:
        raise ConfigError("optimizer.betas applies to adam/adamw, not sgd: remove it or change optimizer.name")
    if o.name not in ("sgd", "muon") and o.momentum is not None:
        raise ConfigError(f"optimizer.momentum applies to sgd, not {o.name} (and to muon): remove it or set "
                          f"optimizer.name=sgd")
    if o.name != "muon" and o.adamw_lr is not None:
        raise ConfigError(f"optimizer.adamw_lr applies to muon (its AdamW part), not {o.name}: remove it")
    onebit = o.name in ("onebit_adam", "onebit_lamb", "zero_one_adam")
    check_onebit_keys(o)
    if o.name == "zero_one_adam" and c.parallel.tp > 1:
        raise ConfigError(f"optimizer.name=zero_one_adam with parallel.tp={c.parallel.tp}: its local steps and 1-bit "
                          f"exchanges are verified at dp and ZeRO-1/2 only (parallel/optim/zero_one_adam.py); set "
                          f"parallel.tp=1 or optimizer.name=onebit_adam")
    if o.name == "onebit_lamb" and c.parallel.tp > 1:
        raise ConfigError(f"optimizer.name=onebit_lamb with parallel.tp={c.parallel.tp}: its compressed phase scales "
                          f"each whole tensor by its frozen trust ratio and is not split over tp "
                          f"(parallel/optim/onebit_lamb.py); set parallel.tp=1 or optimizer.name=lamb")
    if o.state_dtype not in (None, "fp32", "int8"):
        raise ConfigError(f"optimizer.state_dtype={o.state_dtype!r} must be fp32 or int8")
    if o.state_dtype == "int8" and o.name not in ("adam", "adamw"):
        raise ConfigError(f"optimizer.state_dtype=int8 quantizes Adam's moments: it applies to adam/adamw, not "
                          f"{o.name}; remove it or set optimizer.name=adamw")
    if o.fused and (o.name not in ("adam", "adamw", "sgd") or o.state_dtype == "int8"):
        raise ConfigError(f"optimizer.fused=true selects torch's fused adam/adamw/sgd kernel, not {o.name}"
                          f"{' with state_dtype=int8' if o.state_dtype == 'int8' else ''}: remove optimizer.fused")
    if o.fused is not None and c.zero.offload.optimizer != "none":
        raise ConfigError(f"optimizer.fused={str(o.fused).lower()} with zero.offload.optimizer="
                          f"{c.zero.offload.optimizer}: the offloaded step runs on the CPU with the fastest AdamW "
                          f"kernel timed at start (torch's single-tensor, foreach or fused, or DeepSpeed's CPU Adam: "
                          f"parallel/offload/cpu_adam.py), which the flag would not choose: remove optimizer.fused")
    if onebit and c.zero.stage == 3:
        raise ConfigError(f"optimizer.name={o.name} with zero.stage=3: the compressed update needs the whole "
                          "parameter on every rank (parallel/zero/onebit.py); set zero.stage to 0, 1 or 2")
    if onebit and c.precision == "fp16":
        raise ConfigError(f"optimizer.name={o.name} with precision=fp16: the loss scaler's overflow check needs "
                          "reduced gradients, which the compressed phase lacks; use bf16 (zero.stage=0) or fp32")
    if onebit and c.zero.stage > 0 and c.precision != "fp32":
        raise ConfigError(f"optimizer.name={o.name} with zero.stage={c.zero.stage} needs precision=fp32 (got "
                          f"{c.precision}): every rank applies the compressed update to its full-precision "
                          f"parameter; set precision=fp32 or zero.stage=0")
    if onebit and c.train.grad_clip is not None:
        raise ConfigError(f"optimizer.name={o.name} keeps each rank's own gradient after warm-up: there is no "
                          "global norm to clip by; remove train.grad_clip")


def _check_ranges(o) -> None:
    """The ranges torch's optimizers check when they are built, on every rank: named here, before any worker."""
    for key in ("weight_decay", "eps", "momentum"):
        v = getattr(o, key)
        if v is not None and v < 0:
            raise ConfigError(f"optimizer.{key}={v} must not be negative")
    if o.betas is not None and not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optimizer.betas={list(o.betas)} must each be in [0, 1), e.g. [0.9, 0.999]")


def _check_scheduler(c: Config) -> None:
    """The schedule as the engine will build it: its horizon is train.steps while scheduler.total_steps is unset."""
    s = c.scheduler
    horizon = "scheduler.total_steps"
    if s.total_steps is None:
        horizon = "train.steps (the decay horizon while scheduler.total_steps is unset)"
    check_schedule(s.name, s.warmup_steps, s.total_steps if s.total_steps is not None else c.train.steps,
                   s.min_lr_ratio, s.warmup_start_ratio, s.warmup_type, s.convention, total_key=horizon)


def check_schedule(name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
                   warmup_start_ratio: float = 0.0, warmup_type: str = "linear", convention: str = "native",
                   total_key: str = "scheduler.total_steps") -> None:
    """A learning-rate schedule's own consistency (:class:`parallel.optim.lr_schedule.Schedule` calls it too).
    ``total_key`` names where ``total_steps`` came from in the messages."""
    n, w, T = name, warmup_steps, total_steps
    key_T = total_key.split(" ")[0]
    for key, v in (("name", n), ("warmup_type", warmup_type), ("convention", convention)):
        allowed = CHOICES[f"scheduler.{key}"]
        if v not in allowed:
            raise ConfigError(f"scheduler.{key}={v!r} is not one of {list(allowed)}")
    for key, v in (("min_lr_ratio", min_lr_ratio), ("warmup_start_ratio", warmup_start_ratio)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"scheduler.{key}={v} must be within [0, 1] (a fraction of optimizer.lr)")
    if w < 0:
        raise ConfigError(f"scheduler.warmup_steps={w} must be 0 or more")
    if n == "constant" and (w or warmup_start_ratio):
        raise ConfigError(f"scheduler.name=constant has no warm-up but scheduler.warmup_steps={w}, "
                          f"warmup_start_ratio={warmup_start_ratio}: use scheduler.name=warmup "
                          f"or set warmup_steps=0")
    if convention == "native":
        if warmup_type == "log" and 0 < w < 2:
            raise ConfigError(f"scheduler.warmup_type=log needs scheduler.warmup_steps >= 2 (ln W divides), "
                              f"got {w}: use 2 or more, or warmup_type=linear")
        if n in ("warmup_linear", "warmup_cosine") and T < w:
            raise ConfigError(f"{key_T}={T}{total_key[len(key_T):]} is before the end of the warm-up "
                              f"(scheduler.warmup_steps={w}): raise {key_T} to at least {w} or lower "
                              f"scheduler.warmup_steps")
    else:
        W = max(2, w)
        if n == "warmup_cosine" and T <= W:
            raise ConfigError(f"{key_T}={T}{total_key[len(key_T):]} must exceed the warm-up max(2, warmup_steps)={W} "
                              f"for DeepSpeed's WarmupCosineLR (it divides by total_num_steps - warmup_num_steps)")
        if n == "warmup_linear" and T < W:
            raise ConfigError(f"{key_T}={T}{total_key[len(key_T):]} is before the end of the warm-up "
                              f"max(2, warmup_steps)={W}: DeepSpeed's WarmupDecayLR would decay from a partial "
                              f"warm-up; raise {key_T} to at least {W}")
