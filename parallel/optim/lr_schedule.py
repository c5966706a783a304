"""Learning-rate schedules: a multiplier m(t) of ``optimizer.lr`` for optimizer step t = 0, 1, 2, …

    sched = build_scheduler(optimizer, cfg.scheduler, steps=cfg.train.steps)
    for t in range(steps):
        ...; optimizer.step(); sched.step()     # step t ran with lr = optimizer.lr · m(t)

The result is a ``torch.optim.lr_scheduler.LambdaLR``: at construction it sets lr = base · m(0),
and every ``sched.step()`` advances to the next multiplier. The engine calls ``sched.step()``
once after every *applied* optimizer step; a step skipped because fp16 gradients overflowed does
not advance the schedule (DeepSpeed's engine and Megatron-LM do the same).

Native convention (``convention="native"``), with W = warmup_steps, T = total_steps (default: the
``steps`` argument, i.e. train.steps), r = min_lr_ratio, s = warmup_start_ratio:

    warm-up, t < W        m(t) = s + (1 − s)·t/W                    (warmup_type="linear")
                          m(t) = s + (1 − s)·ln(t + 1)/ln W           (warmup_type="log", W ≥ 2)
    constant               m(t) = 1
    warmup                 m(t) = 1                                   for t ≥ W
    warmup_linear          m(t) = r + (1 − r)·max(0, T − t)/max(1, T − W)          for t ≥ W
    warmup_cosine          m(t) = r + (1 − r)·½(1 + cos(π·(t − W)/(T − W)))         for W ≤ t < T,
                           m(t) = r                                                 for t ≥ T

(linear warm-up then cosine decay: Loshchilov & Hutter, SGDR, arXiv 1608.03983; Goyal et al.,
arXiv 1706.02677 for the warm-up.)

DeepSpeed convention (``convention="deepspeed"``) reproduces DeepSpeed's ``WarmupLR``,
``WarmupDecayLR`` and ``WarmupCosineLR`` (deepspeed/runtime/lr_schedules.py) exactly. DeepSpeed
steps its scheduler after each optimizer step, so optimizer step t runs with the scheduler's
``last_batch_iteration`` i = t − 1; its constructor sets the lr of i = −1. With W = max(2, W):

    g(i) = 0 for i < 0;  i/W (linear) or ln(i + 1)/ln W (log) for 0 ≤ i < W;  1 for i ≥ W
    warmup (WarmupLR)             m = s + (1 − s)·g(i)
    warmup_linear (WarmupDecayLR)  m = s + (1 − s)·g(i) for i < W;
                                   m = r + (1 − r)·max(0, (T − i)/max(1, T − W)) for i ≥ W
    warmup_cosine (WarmupCosineLR) m = 0 for t = 0 (its constructor sets the first param group's lr to 0);
                                   m = s + (1 − s)·g(i) for 0 ≤ i < W;
                                   m = max(0, r + (1 − r)·½(1 + cos(π·(i − W + 1)/(T − W)))) for i ≥ W
                                   (no clamp at T: past total_num_steps the cosine rises again, as in DeepSpeed)

DeepSpeed's WarmupLR/WarmupDecayLR are written as lr = min_lr + (max_lr − min_lr)·γ; with
optimizer.lr = max_lr and s = r = min_lr/max_lr that is exactly the multiplier form above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from parallel.config import SchedulerConfig
from parallel.config.errors import ConfigError
from parallel.config.validate import check_schedule


@dataclass
class Schedule:
    """m(t) as a picklable callable (LambdaLR keeps its fields in ``state_dict``)."""
    name: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    min_lr_ratio: float = 0.0
    warmup_start_ratio: float = 0.0
    warmup_type: str = "linear"
    convention: str = "native"

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """The schedule's own consistency (:func:`parallel.config.validate.check_schedule`)."""
        check_schedule(self.name, self.warmup_steps, self.total_steps, self.min_lr_ratio, self.warmup_start_ratio,
                       self.warmup_type, self.convention)

    def _ramp(self, k: int, W: int) -> float:
        """Warm-up fraction after k of W steps (0 ≤ k < W)."""
        if self.warmup_type == "log":
            return math.log(k + 1) / math.log(W)
        return k / W

    def __call__(self, t: int) -> float:
        if self.name == "constant":
            return 1.0
        if self.convention == "deepspeed":
            return self._deepspeed(t)
        s, r, W, T = self.warmup_start_ratio, self.min_lr_ratio, self.warmup_steps, self.total_steps
        if t < W:
            return s + (1.0 - s) * self._ramp(t, W)
        if self.name == "warmup":
            return 1.0
        if self.name == "warmup_linear":
            return r + (1.0 - r) * max(0, T - t) / max(1, T - W)
        if t >= T:
            return r
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * (t - W) / (T - W)))

    def _deepspeed(self, t: int) -> float:
        s, r, T = self.warmup_start_ratio, self.min_lr_ratio, self.total_steps
        W = max(2, self.warmup_steps)
        i = t - 1                                   # DeepSpeed's last_batch_iteration during step t
        if self.name == "warmup_cosine" and i < 0:
            return 0.0
        if i < W:
            return s + (1.0 - s) * (self._ramp(i, W) if i >= 0 else 0.0)
        if self.name == "warmup":
            return 1.0
        if self.name == "warmup_linear":
            return r + (1.0 - r) * max(0.0, (T - i) / max(1, T - W))
        cos = 0.5 * (1.0 + math.cos(math.pi * (i - W + 1) / (T - W)))
        return max(0.0, r + (1.0 - r) * cos)


def make_schedule(cfg: SchedulerConfig, steps: int, *, warmup_start_ratio: Optional[float] = None,
                  warmup_type: Optional[str] = None, convention: Optional[str] = None) -> Schedule:
    """The :class:`Schedule` for ``cfg``; keyword arguments override (or stand in for) config fields.

    ``warmup_start_ratio``, ``warmup_type`` and ``convention`` are read from ``cfg`` when it has them
    and the keyword is not given; otherwise they default to 0.0, "linear", "native".
    """
    if steps < 0:
        raise ConfigError(f"build_scheduler: steps={steps} must be 0 or more (train.steps)")
    total = cfg.total_steps if cfg.total_steps is not None else steps

    def pick(value, key, default):
        return value if value is not None else getattr(cfg, key, default)
    return Schedule(name=cfg.name, warmup_steps=cfg.warmup_steps, total_steps=total,
                    min_lr_ratio=float(cfg.min_lr_ratio),
                    warmup_start_ratio=float(pick(warmup_start_ratio, "warmup_start_ratio", 0.0)),
                    warmup_type=pick(warmup_type, "warmup_type", "linear"),
                    convention=pick(convention, "convention", "native"))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, steps: int,
                    **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose multiplier at optimizer step t is :class:`Schedule` (see the module doc).

    ``steps`` is train.steps, the decay horizon when ``cfg.total_steps`` is unset. Extra keywords:
    see :func:`make_schedule`.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, make_schedule(cfg, steps, **kwargs))
