"""Optimizers from config: only the fields the user set are passed, so torch's defaults apply."""
from __future__ import annotations

import torch

from parallel.config import OptimizerConfig

_CLASSES = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def optimizer_factory(cfg: OptimizerConfig):
    """A function params → torch.optim.Optimizer built from ``optimizer.*``."""
    cls = _CLASSES[cfg.name]
    kwargs = {k: getattr(cfg, k) for k in ("lr", "weight_decay", "momentum", "eps") if getattr(cfg, k) is not None}
    if cfg.betas is not None:
        kwargs["betas"] = tuple(cfg.betas)
    if cls is torch.optim.SGD and "lr" not in kwargs:
        kwargs["lr"] = 1e-3                     # torch >= 2.4 default; older versions require it

    def build(params):
        return cls(params, **kwargs)
    build.kwargs = kwargs
    build.cls = cls
    return build
