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
too large: the step is skipped and S halves; after ``growth_interval`` clean steps S doubles
(the schedule of ``torch.amp.GradScaler``: init 2**16, growth 2, backoff 0.5, interval 2000).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("parallel.precision")

__all__ = ["Precision", "LossScaler", "PRECISIONS"]

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

    def scaler(self) -> "LossScaler":
        return LossScaler(enabled=self.name == "fp16")


class LossScaler:
    """Dynamic loss scale. ``scale`` is 1.0 when disabled (fp32, bf16).

    ``update(found_inf)`` after every step: on overflow the scale is multiplied by ``backoff`` and a
    message "step skipped: fp16 gradient overflow, loss scale X -> Y" is logged and returned;
    otherwise, after ``growth_interval`` consecutive clean steps, it is multiplied by ``growth``.
    """

    def __init__(self, enabled: bool = True, init_scale: float = 2.0 ** 16, growth: float = 2.0,
                 backoff: float = 0.5, growth_interval: int = 2000, min_scale: float = 1.0):
        if enabled and not (init_scale > 0 and growth > 1 and 0 < backoff < 1 and growth_interval >= 1):
            raise ValueError(f"LossScaler: need init_scale > 0, growth > 1, 0 < backoff < 1, growth_interval >= 1; "
                             f"got {init_scale}, {growth}, {backoff}, {growth_interval}")
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth, self.backoff, self.growth_interval = growth, backoff, growth_interval
        self.min_scale = min_scale
        self.good_steps = 0
        self.skipped_steps = 0

    def update(self, found_inf: bool) -> str | None:
        if not self.enabled:
            return None
        if found_inf:
            old = self.scale
            self.scale = max(self.scale * self.backoff, self.min_scale)
            self.good_steps = 0
            self.skipped_steps += 1
            msg = f"step skipped: fp16 gradient overflow, loss scale {old:g} -> {self.scale:g}"
            log.warning(msg)
            return msg
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth
            self.good_steps = 0
        return None

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.scale, self.good_steps = float(sd["scale"]), int(sd["good_steps"])
        self.skipped_steps = int(sd.get("skipped_steps", 0))
