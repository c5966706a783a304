"""Mixed-precision policies and the dynamic loss scaler.

Three policies (``precision: fp32 | bf16 | fp16``), after Micikevicius et al., "Mixed Precision
Training" (arXiv 1710.03740), as ZeRO uses them (Rajbhandari et al., arXiv 1910.02054, §3):

    policy  model params / compute   gradients (and their reduction)   optimizer sees
    fp32    fp32                     fp32, b = 4                       the fp32 params themselves
    bf16    bf16                     bf16, b = 2                       an fp32 master copy
    fp16    fp16                     fp16, b = 2, loss-scaled          an fp32 master copy

With bf16/fp16 the optimizer updates the fp32 master, and the result is cast back into the
low-precision parameters (stage 0–2: the flat parameter buffer; stage 3: the parameter shard).

fp16's narrow exponent range needs loss scaling: the loss is multiplied by S before backward,
gradients are divided by S before the update; an inf/NaN in any gradient on any rank means S was
too large, and the step is skipped. S follows DeepSpeed's DynamicLossScaler (the ``fp16`` block of
its config; ``loss_scale.*`` here), with factor f = 2, hysteresis H, window W, floor S_min:

    start       S = loss_scale.initial (DeepSpeed: 2**initial_scale_power), h = H, t = 0, t_last = -1
    overflow    if h > 1: h -= 1 and S is kept, else S = max(S / f, S_min); in both cases t_last = t.
                At S = S_min already (and h = 1) the run stops (LossScaleError), as DeepSpeed's does,
                unless train.on_nonfinite=skip: then S stays at S_min and the step is skipped
    clean step  with consecutive_hysteresis h = H at every clean step; then with n = t - t_last - 1:
                if n > 0 and n % W == 0, S *= f (and h = H without consecutive_hysteresis: its only refill)
    every step  t += 1 (t counts updates, skipped ones included)

So the scale first grows at the (W + 1)-th clean step after the start or after an overflow, then
every W clean steps. A static scale (``loss_scale.static``, DeepSpeed's
``loss_scale > 0``) never changes; an overflowing step is still skipped.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from parallel.config import LossScaleConfig

log = logging.getLogger("parallel.precision")

__all__ = ["Precision", "LossScaler", "LossScaleError", "PRECISIONS"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """One policy: ``param_dtype`` for params, compute, gradients and their reduction;
    ``master`` says whether an fp32 master copy of the (owned) parameters is kept."""
    name: str
    param_dtype: torch.dtype

    @classmethod
    def of(cls, name: "str | Precision") -> "Precision":
        if isinstance(name, Precision):
            return name
        if name not in PRECISIONS:
            raise ValueError(f"precision={name!r} is not one of {sorted(PRECISIONS)}: "
                             f"set precision to fp32, bf16 or fp16")
        return cls(name, PRECISIONS[name])

    @property
    def master(self) -> bool:
        return self.param_dtype != torch.float32

    @property
    def reduce_dtype(self) -> torch.dtype:
        """Gradients are reduced in the parameter dtype (b = 2 bytes for bf16/fp16)."""
        return self.param_dtype

    @property
    def bytes_per_element(self) -> int:
        return torch.empty(0, dtype=self.param_dtype).element_size()

    def scaler(self, cfg=None, raise_at_min: bool = True) -> "LossScaler":
        """The loss scaler of this policy: dynamic or static as ``cfg`` (a
        :class:`~parallel.config.LossScaleConfig`; None: its defaults, which are DeepSpeed's) says
        for fp16, a disabled one (S = 1) otherwise."""
        if cfg is None:
            cfg = LossScaleConfig()
        return LossScaler.from_config(cfg, enabled=self.name == "fp16", raise_at_min=raise_at_min)


class LossScaleError(RuntimeError):
    """fp16 gradients overflow with the dynamic loss scale already at its minimum."""


class LossScaler:
    """Dynamic (or static) loss scale; ``scale`` is 1.0 when disabled (fp32, bf16).

    ``update(found_inf)`` once per optimizer step, skipped steps included, applies the rules of the
    module docstring. On overflow it logs and returns "step skipped: fp16 gradient overflow, loss
    scale X -> Y" (or "... loss scale X kept (hysteresis a -> b)", "... static loss scale X kept").
    """

    def __init__(self, enabled: bool = True, init_scale: float = 2.0 ** 16, growth_interval: int = 1000,
                 hysteresis: int = 2, min_scale: float = 1.0, consecutive_hysteresis: bool = False,
                 static: float | None = None, factor: float = 2.0, raise_at_min: bool = True):
        if enabled:
            bad = [f"{k}={v!r} must be {want}" for k, v, ok, want in (
                ("loss_scale.initial", init_scale, _finite(init_scale) and init_scale > 0, "a positive number"),
                ("loss_scale.growth_interval", growth_interval, _int(growth_interval) and growth_interval >= 1,
                 "an integer >= 1"),
                ("loss_scale.hysteresis", hysteresis, _int(hysteresis) and hysteresis >= 1, "an integer >= 1"),
                ("loss_scale.min", min_scale, _finite(min_scale) and min_scale > 0, "a positive number"),
                ("loss_scale.static", static, static is None or (_finite(static) and static > 0),
                 "a positive number or null (dynamic scaling)"),
                ("factor", factor, _finite(factor) and factor > 1, "a number > 1")) if not ok]
            if bad:
                raise ValueError("LossScaler: " + "; ".join(bad))
        self.enabled, self.static = enabled, (float(static) if enabled and static else None)
        self.scale = (self.static or float(init_scale)) if enabled else 1.0
        self.growth_interval, self.hysteresis, self.min_scale = growth_interval, hysteresis, float(min_scale)
        self.consecutive_hysteresis, self.factor, self.raise_at_min = consecutive_hysteresis, factor, raise_at_min
        self.iter = 0                       # updates so far (DeepSpeed's cur_iter)
        self.last_overflow = -1             # the iter of the last overflow (DeepSpeed's last_overflow_iter)
        self.hysteresis_left = hysteresis   # DeepSpeed's cur_hysteresis
        self.skipped_steps = 0

    @classmethod
    def from_config(cls, cfg, enabled: bool = True, raise_at_min: bool = True) -> "LossScaler":
        """From a :class:`~parallel.config.LossScaleConfig` (``loss_scale.*``)."""
        return cls(enabled, init_scale=cfg.initial, growth_interval=cfg.growth_interval, hysteresis=cfg.hysteresis,
                   min_scale=cfg.min, consecutive_hysteresis=cfg.consecutive_hysteresis, static=cfg.static,
                   raise_at_min=raise_at_min)

    def update(self, found_inf: bool) -> str | None:
        if not self.enabled:
            return None
        msg = None
        if found_inf:
            self.skipped_steps += 1
            if self.static is not None:
                msg = f"step skipped: fp16 gradient overflow, static loss scale {self.scale:g} kept"
            elif self.hysteresis == 1 or self.hysteresis_left == 1:
                if self.scale == self.min_scale and self.raise_at_min:
                    raise LossScaleError(
                        f"fp16 gradient overflow at step {self.iter} with the loss scale already at its minimum "
                        f"loss_scale.min={self.min_scale:g} (hysteresis used up): the gradients overflow fp16 even "
                        f"at the smallest scale, so the run stops here (as DeepSpeed's does). Lower optimizer.lr, "
                        f"use precision=bf16, lower loss_scale.min, or set train.on_nonfinite=skip to keep "
                        f"skipping such steps")
                old = self.scale
                self.scale = max(self.scale / self.factor, self.min_scale)
                msg = f"step skipped: fp16 gradient overflow, loss scale {old:g} -> {self.scale:g}"
            else:
                self.hysteresis_left -= 1
                msg = (f"step skipped: fp16 gradient overflow, loss scale {self.scale:g} kept (hysteresis "
                       f"{self.hysteresis_left + 1} -> {self.hysteresis_left})")
            self.last_overflow = self.iter
            log.warning(msg)
        elif self.static is None:
            if self.consecutive_hysteresis:
                self.hysteresis_left = self.hysteresis
            stable = self.iter - self.last_overflow - 1
            if stable > 0 and stable % self.growth_interval == 0:
                if not self.consecutive_hysteresis:
                    self.hysteresis_left = self.hysteresis
                self.scale *= self.factor
        self.iter += 1
        return msg

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale, "iter": self.iter, "last_overflow": self.last_overflow,
                "hysteresis_left": self.hysteresis_left, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])
        if "iter" in sd:
            self.iter, self.last_overflow = int(sd["iter"]), int(sd["last_overflow"])
            self.hysteresis_left = int(sd["hysteresis_left"])
        else:                               # a checkpoint of the earlier scaler: {"good_steps": n}
            self.iter, self.last_overflow, self.hysteresis_left = int(sd["good_steps"]), -1, self.hysteresis
        self.skipped_steps = int(sd.get("skipped_steps", 0))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
