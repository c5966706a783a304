"""The configuration tree: one dataclass per section, with defaults.

Unset optimizer fields stay ``None`` and the optimizer then uses torch's own defaults (the parity
contract in DESIGN.md). Loading is :mod:`parallel.config.load`, checks :mod:`parallel.config.validate`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from parallel.config.errors import ConfigError
from parallel.config.validate import validate

__all__ = ["ConfigError", "Config", "ModelConfig", "DataConfig", "ParallelConfig", "OptimizerConfig", "SchedulerConfig",
           "LossScaleConfig", "CheckpointConfig", "TrainConfig", "OffloadConfig", "ZeroConfig",
           "ActivationCheckpointingConfig", "CompileConfig"]


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
    eval: Optional[dict] = None            # {factory, kwargs, batches}: a held-out set (launch/evaluate.py)
    prefetch: int = 2                      # batches a background thread loads ahead, in order (parallel/prefetch.py)


@dataclass
class ParallelConfig:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    tp_plan: Any = "auto"                  # "auto" or {module glob: colwise | rowwise | vocab}
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"              # gpipe | 1f1b | interleaved | zero_bubble | zb_v | dualpipe_v
    pp_virtual_stages: int = 1
    pp_split: Any = "auto"                 # "auto", block indices or module names where stages start
    pp_balance: str = "params"             # the auto split balances params | flops (counted on one input sample)
    sync_batchnorm: bool = False           # BatchNorm statistics over the dp group (data_parallel/sync_batchnorm.py)
    ep: int = 1                            # expert parallelism, carved out of dp (parallel/moe/): divides dp
    cp: int = 1                            # context parallel: the sequence dim split over cp ranks (context_parallel/)
    cp_algorithm: str = "ring"             # ring (K/V around the ring) | ulysses (all-to-all to head shards)


@dataclass
class OptimizerConfig:
    name: str = "adamw"                    # adamw adam sgd lamb muon onebit_adam onebit_lamb zero_one_adam
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    betas: Optional[list] = None
    momentum: Optional[float] = None       # sgd; muon (Muon's momentum)
    eps: Optional[float] = None            # muon: the AdamW part's eps
    adamw_lr: Optional[float] = None       # muon: lr of the non-matrix tensors (AdamW); default lr
    freeze_step: Optional[int] = None      # onebit_adam/_lamb: warm-up steps before compression (100)
    update_bound: Optional[Any] = None     # onebit_*/zero_one_adam: clamp of the compressed step; number|adam|none
    var_freeze_step: Optional[int] = None  # zero_one_adam (DeepSpeed's keys and defaults, optim/zero_one_adam.py):
    var_update_scaler: Optional[int] = None    # 100000, 16, 32678, 16
    local_step_scaler: Optional[int] = None
    local_step_clipper: Optional[int] = None
    bias_correction: Optional[bool] = None     # zero_one_adam: true (torch Adam's); false as DeepSpeed computes
    max_coeff: Optional[float] = None      # onebit_lamb (optim/onebit_lamb.py): 10.0, 0.01, 0.9, 4.0, 0.5, 0.1
    min_coeff: Optional[float] = None
    coeff_beta: Optional[float] = None
    factor_max: Optional[float] = None
    factor_min: Optional[float] = None
    factor_threshold: Optional[float] = None
    state_dtype: Optional[str] = None      # adam/adamw moments: fp32 (default) | int8 (parallel/optim/adam8bit.py)
    fused: Optional[bool] = None           # adam/adamw/sgd: torch's fused kernel; null: on iff all params on CUDA


@dataclass
class PLDConfig:
    """Progressive layer dropping (arXiv 2010.13369; :mod:`parallel.layer_drop`): block l of L is kept
    at step t with probability 1 − (l/L)(1 − θ(t)), θ(t) = (1 − theta)·exp(−gamma·t) + theta."""
    enabled: bool = False
    theta: float = 0.5                     # DeepSpeed's defaults
    gamma: float = 0.001


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
    keep_last: Optional[int] = None        # keep this job's newest N checkpoints, remove its older ones; null = all
    fallback: bool = False                 # resume: a damaged newest checkpoint -> the previous intact one (logged)
    async_: bool = False                   # YAML key "async": write in a background thread from a host snapshot


@dataclass
class TrainConfig:
    steps: int = 10
    seed: int = 0
    metrics_file: Optional[str] = None
    log_every: int = 1
    eval_every: int = 0                    # evaluate data.eval every N steps (0: only after the last, if set)
    grad_clip: Optional[float] = None
    timeout_s: float = 60.0
    resume: bool = False
    finish: Optional[str] = None           # "pkg.module:function(model, cfg)" run on rank 0 with the full model
    peak_flops: Optional[float] = None     # per-rank peak FLOP/s for MFU (default: a measured matmul rate)
    tensorboard: Optional[str] = None      # a log directory for TensorBoard scalars (needs tensorboard)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    on_nonfinite: str = "stop"             # stop | skip: a non-finite loss/gradient ends the job, or skips the update
    max_skips: int = 10                    # on_nonfinite=skip: this many consecutive skipped steps at most, then stop
    save_on_signal: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # save at the next step, exit 128+n
    check_collectives: bool = False        # compare collective fingerprints across ranks every step (fingerprint.py)
    fault: Optional[dict] = None           # fault injection, tests only (P3D_ENABLE_FAULTS=1; reliability.faults)


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
    keep_after_forward: int = 2            # stage 3: the units freed last in forward (block units: the root's and
    #                                        the last block's) stay gathered into backward, one all-gather each
    #                                        less per micro-batch; 0 frees all (parallel/zero/stage3.py)
    max_reuse_distance: Optional[float] = None   # stage 3, elements (DeepSpeed's stage3_max_reuse_distance): set, it
    #                                        replaces keep_after_forward: keep the units whose reuse distance
    #                                        2·(elements of the units freed after it in forward) is < this
    unit_mb: float = 0.0                   # stage 3: merge consecutive units up to this many MiB into one (one
    #                                        all-gather + one reduce-scatter each; DeepSpeed's prefetch bucket);
    #                                        0 = one unit per module / block (parallel/zero/unit_plan.py)
    offload: OffloadConfig = field(default_factory=OffloadConfig)


@dataclass
class ActivationCheckpointingConfig:
    """What the repeated blocks keep for backward (parallel/activation/checkpointing.py)."""
    policy: str = "none"                   # none | full | every | selective | offload
    every: int = 1                         # policy=every: recompute blocks 0, k, 2k, … (k = every)
    save_ops: Optional[list] = None        # policy=selective: aten ops whose outputs are kept (null: matmuls,
    #                                        attention); every other op is recomputed


@dataclass
class CompileConfig:
    """torch.compile on each repeated block, as torchtitan (parallel/compile.py; refusals in compile_keys.py)."""
    enabled: bool = False
    backend: str = "inductor"              # inductor | aot_eager (no code generation: CPU tests) | eager
    mode: Optional[str] = None             # inductor: null (default) | default | max-autotune-no-cudagraphs
    fullgraph: bool = False                # a graph break inside a block is an error instead of eager fallback


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: str = "cross_entropy"            # cross_entropy | mse | model (its own loss) | "pkg.module:function"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(default_factory=ActivationCheckpointingConfig)
    pld: PLDConfig = field(default_factory=PLDConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    precision: str = "fp32"                # fp32 | bf16 | fp16
    device: str = "cpu"                    # cpu | cuda | auto

    @property
    def world_size(self) -> int:
        return self.parallel.dp * self.parallel.tp * self.parallel.pp * self.parallel.cp

    @property
    def micro_batches(self) -> int:
        """Micro-batches per dp rank per step (gradient accumulation / pipeline micro-batches)."""
        return self.data.global_batch_size // (self.parallel.dp * self.data.micro_batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, world_size: int | None = None) -> "Config":
        """Every cross-field check (:func:`parallel.config.validate.validate`); returns ``self``."""
        validate(self, world_size)
        return self
