"""The configuration: one dataclass tree, loaded from YAML, overridden with ``a.b=value``.

    cfg = load_config("configs/quickstart.yaml", ["train.steps=50", "parallel.dp=2"])
    cfg.validate(world_size=8)

Every check runs before any process group exists and fails with one :class:`ConfigError` that
names the key, the value and what to change. Unset optimizer fields stay ``None`` and the
optimizer then uses torch's own defaults (the parity contract in DESIGN.md).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


@dataclass
class ModelConfig:
    factory: str = ""                      # "pkg.module:function" returning an nn.Module
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    factory: str = ""                      # "pkg.module:function" returning a map-style Dataset
    kwargs: dict = field(default_factory=dict)
    global_batch_size: int = 8
    micro_batch_size: int = 8              # samples per micro-batch on one dp rank
    shuffle: bool = False                  # seeded permutation per epoch, independent of the layout


@dataclass
class ParallelConfig:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    tp_plan: Any = "auto"                  # "auto" or {module glob: colwise | rowwise | vocab}
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"              # gpipe | 1f1b | interleaved | zero_bubble
    pp_virtual_stages: int = 1
    pp_split: Any = "auto"                 # "auto" or a list of block boundaries


@dataclass
class OptimizerConfig:
    name: str = "adamw"                    # adamw | adam | sgd
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    betas: Optional[list] = None
    momentum: Optional[float] = None
    eps: Optional[float] = None


@dataclass
class SchedulerConfig:
    """Learning-rate schedule as a multiplier of optimizer.lr per step (warm-up then decay)."""
    name: str = "constant"                 # constant | warmup | warmup_linear | warmup_cosine
    warmup_steps: int = 0
    total_steps: Optional[int] = None      # decay horizon; default train.steps
    min_lr_ratio: float = 0.0              # floor of the decay, as a fraction of optimizer.lr
    warmup_start_ratio: float = 0.0        # warm-up starts at this fraction of optimizer.lr
    warmup_type: str = "linear"            # linear | log (DeepSpeed's WarmupLR)
    convention: str = "native"             # native | deepspeed (DeepSpeed's step offsets, exactly)


@dataclass
class LossScaleConfig:
    """fp16 loss scaling (Micikevicius et al., arXiv 1710.03740) by DeepSpeed's rules, its defaults
    (:mod:`parallel.precision`); static when ``static`` is set. Only read with precision=fp16."""
    initial: float = 2.0 ** 16             # DeepSpeed: 2**initial_scale_power
    growth_interval: int = 1000            # overflow-free steps before the scale doubles (loss_scale_window)
    hysteresis: int = 2                    # an overflow halves the scale once this many have come (see precision.py)
    min: float = 1.0                       # floor of the scale (min_loss_scale); an overflow there stops the run
    static: Optional[float] = None         # a fixed scale (DeepSpeed's loss_scale > 0); null: dynamic
    consecutive_hysteresis: bool = False   # refill the hysteresis at every overflow-free step, not only on growth


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    every: int = 0                         # steps between checkpoints; 0 = never


@dataclass
class TrainConfig:
    steps: int = 10
    seed: int = 0
    metrics_file: Optional[str] = None
    log_every: int = 1
    grad_clip: Optional[float] = None
    timeout_s: float = 60.0
    resume: bool = False
    finish: Optional[str] = None           # "pkg.module:function(model, cfg)" run on rank 0 with the full model
    peak_flops: Optional[float] = None     # per-rank peak FLOP/s for MFU (default: a measured matmul rate)
    tensorboard: Optional[str] = None      # a log directory for TensorBoard scalars (needs tensorboard)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    on_nonfinite: str = "stop"             # stop | skip: a non-finite loss/gradient ends the job, or skips the update
    check_collectives: bool = False        # compare collective fingerprints across ranks every step (parallel.fingerprint)
    fault: Optional[dict] = None           # fault injection for tests: {rank, step, phase, kind[, attempt]} (parallel.faults)


@dataclass
class OffloadConfig:
    optimizer: str = "none"                # none | cpu | nvme
    params: str = "none"                   # none | cpu | nvme
    nvme_path: Optional[str] = None
    buffer_count: int = 4                  # IO buffers streaming optimizer sub-groups / layers
    buffer_mb: float = 64.0                # size of each buffer
    prefetch_depth: int = 1                # layers / sub-groups read ahead of use


@dataclass
class ZeroConfig:
    stage: int = 0                         # 0 = plain data parallel
    bucket_mb: float = 25.0
    prefetch: bool = True
    units: str = "module"                  # stage 3 gathers per: module (each module owning parameters, as
    #                                        DeepSpeed) | block (each repeated block + the rest, as FSDP2 per block)
    offload: OffloadConfig = field(default_factory=OffloadConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: str = "cross_entropy"            # cross_entropy | mse | "pkg.module:function"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    precision: str = "fp32"                # fp32 | bf16 | fp16
    device: str = "cpu"                    # cpu | cuda | auto

    @property
    def world_size(self) -> int:
        return self.parallel.dp * self.parallel.tp * self.parallel.pp

    @property
    def micro_batches(self) -> int:
        """Micro-batches per dp rank per step (gradient accumulation / pipeline micro-batches)."""
        return self.data.global_batch_size // (self.parallel.dp * self.data.micro_batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, world_size: int | None = None) -> "Config":
        _validate(self, world_size)
        return self


CHOICES = {
    "loss": ("cross_entropy", "mse"),
    "optimizer.name": ("adamw", "adam", "sgd"),
    "parallel.pp_schedule": ("gpipe", "1f1b", "interleaved", "zero_bubble"),
    "precision": ("fp32", "bf16", "fp16"),
    "device": ("cpu", "cuda", "auto"),
    "scheduler.name": ("constant", "warmup", "warmup_linear", "warmup_cosine"),
    "scheduler.warmup_type": ("linear", "log"),
    "scheduler.convention": ("native", "deepspeed"),
    "zero.offload.optimizer": ("none", "cpu", "nvme"),
    "zero.offload.params": ("none", "cpu", "nvme"),
    "train.on_nonfinite": ("stop", "skip"),
}


# keys that were removed because they restated other keys: what to write instead
REMOVED = {
    "parallel.pp_microbatches": "the micro-batch count is data.global_batch_size / (parallel.dp × "
                                "data.micro_batch_size); remove the key and set data.micro_batch_size",
}


# --- building the tree from plain data ------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, key: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp in (dict, list):
        if isinstance(value, tp):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if prefix + k in REMOVED:
            raise ConfigError(f"'{prefix}{k}' is no longer a config key: {REMOVED[prefix + k]}")
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown key '{prefix}{k}': {hint}valid keys here are {names}")
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def _parse_scalar(text: str):
    """Command-line values are YAML scalars: 3, 0.1, true, null, [1, 2], {a: 1}, text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def load_config(path: str | None = None, overrides: list[str] | tuple = (), data: dict | None = None,
                deepspeed: str | None = None, report: list | None = None) -> Config:
    """YAML file (or a dict) plus ``a.b=value`` overrides → a type-checked :class:`Config`.

    ``deepspeed`` (or a ``deepspeed:`` key in the YAML) names a DeepSpeed JSON config whose
    meaning is mapped onto this tree (:mod:`parallel.deepspeed_config`); command-line overrides
    still win. The mapping's lines (mapped and ignored keys) are appended to ``report``."""
    tree: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist: pass --config with a YAML file path") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping at the top level, got {type(tree).__name__}")
    if data:
        tree = {**tree, **copy.deepcopy(data)}
    ds_path = deepspeed or tree.pop("deepspeed", None)
    tree.pop("deepspeed", None)
    parsed = []
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override {o!r} is not of the form key.sub=value (e.g. train.steps=20)")
        k, v = o.split("=", 1)
        parsed.append((k.strip(), _parse_scalar(v)))
    if ds_path:
        from .deepspeed_config import load_deepspeed_json, map_deepspeed, merge_tree, resolve_path
        if not isinstance(ds_path, str):
            raise ConfigError(f"deepspeed: expected the path of a DeepSpeed JSON file, got {ds_path!r}")
        ds = load_deepspeed_json(ds_path if deepspeed else resolve_path(ds_path, path))
        base = copy.deepcopy(tree)
        for k, v in parsed:
            _set(base, k, v)
        dp = (base.get("parallel") or {}).get("dp", 1)
        mapped, lines = map_deepspeed(ds, base, dp if isinstance(dp, int) else 1)
        tree = merge_tree(tree, mapped)
        if report is not None:
            report.extend(lines)
    for k, v in parsed:
        _set(tree, k, v)
    return _build(Config, tree)


# --- cross-field checks ---------------------------------------------------------------------------

def _check_factory(key: str, spec: str) -> None:
    if not spec:
        raise ConfigError(f"{key} is not set: give 'pkg.module:function' (e.g. examples.gpt:build)")
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"{key}={spec!r} must look like 'pkg.module:function'")


def _validate(c: Config, world_size: int | None) -> None:
    for key, allowed in CHOICES.items():
        v = c
        for part in key.split("."):
            v = getattr(v, part)
        if key == "loss" and ":" in v:
            continue
        if v not in allowed:
            raise ConfigError(f"{key}={v!r} is not one of {list(allowed)}")
    _check_factory("model.factory", c.model.factory)
    _check_factory("data.factory", c.data.factory)
    p, d, t = c.parallel, c.data, c.train
    for key, v in (("parallel.dp", p.dp), ("parallel.tp", p.tp), ("parallel.pp", p.pp),
                   ("data.global_batch_size", d.global_batch_size), ("data.micro_batch_size", d.micro_batch_size),
                   ("parallel.pp_virtual_stages", p.pp_virtual_stages)):
        if v < 1:
            raise ConfigError(f"{key}={v} must be at least 1")
    if t.steps < 0:
        raise ConfigError(f"train.steps={t.steps} must be 0 or more")
    if world_size is not None and c.world_size != world_size:
        raise ConfigError(f"parallel.dp*tp*pp = {p.dp}*{p.tp}*{p.pp} = {c.world_size} but the job has {world_size} "
                          f"processes: change parallel.dp/tp/pp or start {c.world_size} processes (--nproc {c.world_size})")
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
    elif p.pp_virtual_stages != 1:
        raise ConfigError(f"parallel.pp_virtual_stages={p.pp_virtual_stages} only applies to "
                          f"parallel.pp_schedule=interleaved (got {p.pp_schedule!r}): set it to 1")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1 (it shards along the sequence "
                          "within the tp group)")
    if not (p.tp_plan == "auto" or isinstance(p.tp_plan, dict)):
        raise ConfigError(f"parallel.tp_plan={p.tp_plan!r} must be 'auto' or a mapping {{module glob: colwise|rowwise|vocab}}")
    if not (p.pp_split == "auto" or (isinstance(p.pp_split, list) and all(isinstance(b, int) for b in p.pp_split))):
        raise ConfigError(f"parallel.pp_split={p.pp_split!r} must be 'auto' or a list of block indices where stages start")
    if not 0 <= c.zero.stage <= 3:
        raise ConfigError(f"zero.stage={c.zero.stage} must be 0, 1, 2 or 3")
    if c.zero.bucket_mb <= 0:
        raise ConfigError(f"zero.bucket_mb={c.zero.bucket_mb} must be positive")
    if c.zero.units not in ("module", "block"):
        raise ConfigError(f"zero.units={c.zero.units!r} must be 'module' (a stage-3 unit per module that owns "
                          f"parameters) or 'block' (one per repeated block, plus one for the rest)")
    if c.zero.offload.params != "none" and c.zero.stage != 3:
        raise ConfigError(f"zero.offload.params={c.zero.offload.params} needs zero.stage=3 (got {c.zero.stage})")
    if "nvme" in (c.zero.offload.params, c.zero.offload.optimizer) and not c.zero.offload.nvme_path:
        raise ConfigError("zero.offload uses nvme but zero.offload.nvme_path is not set: give a directory on a local disk")
    sc = c.scheduler
    if sc.warmup_steps < 0 or (sc.total_steps is not None and sc.total_steps < sc.warmup_steps):
        raise ConfigError(f"scheduler.warmup_steps={sc.warmup_steps} must be >= 0 and <= scheduler.total_steps "
                          f"({sc.total_steps})")
    if not 0.0 <= sc.min_lr_ratio <= 1.0:
        raise ConfigError(f"scheduler.min_lr_ratio={sc.min_lr_ratio} must be within [0, 1]")
    off = c.zero.offload
    if off.buffer_count < 1 or off.buffer_mb <= 0 or off.prefetch_depth < 0:
        raise ConfigError(f"zero.offload: buffer_count={off.buffer_count} must be >= 1, buffer_mb={off.buffer_mb} "
                          f"> 0 and prefetch_depth={off.prefetch_depth} >= 0")
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise ConfigError(f"train.grad_clip={t.grad_clip} must be positive (or null for no clipping)")
    if t.timeout_s <= 0:
        raise ConfigError(f"train.timeout_s={t.timeout_s} must be positive")
    if t.fault is not None:
        from .faults import check_fault            # local import: parallel.faults imports this module
        check_fault(c, world_size)
    if t.checkpoint.every < 0:
        raise ConfigError(f"train.checkpoint.every={t.checkpoint.every} must be 0 (never) or positive")
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
    o = c.optimizer
    if o.betas is not None and (len(o.betas) != 2 or not all(isinstance(b, (int, float)) for b in o.betas)):
        raise ConfigError(f"optimizer.betas={o.betas!r} must be two numbers, e.g. [0.9, 0.999]")
    if o.lr is not None and o.lr < 0:
        raise ConfigError(f"optimizer.lr={o.lr} must not be negative")
    if o.name == "sgd" and o.betas is not None:
        raise ConfigError("optimizer.betas applies to adam/adamw, not sgd: remove it or change optimizer.name")
    if o.name != "sgd" and o.momentum is not None:
        raise ConfigError(f"optimizer.momentum applies to sgd, not {o.name}: remove it or set optimizer.name=sgd")


def import_object(spec: str, key: str):
    """Import "pkg.module:attr" (the module must be importable: on PYTHONPATH or the working directory)."""
    _check_factory(key, spec)
    mod_name, attr = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"{key}={spec!r}: cannot import module {mod_name!r} ({e}); put it on PYTHONPATH "
                          f"or run from the directory that contains it") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ConfigError(f"{key}={spec!r}: module {mod_name!r} has no attribute {attr!r}") from None
