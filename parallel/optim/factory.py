"""Optimizers from config: only the fields the user set are passed, so torch's defaults apply.

lamb: :class:`parallel.optim.lamb.Lamb` (DeepSpeed's FusedLamb defaults); muon:
:class:`parallel.optim.muon.MuonAdamW` (torch.optim.Muon on 2-D weights, AdamW on the rest; for it
``eps`` and ``betas`` are the AdamW part's, ``adamw_lr`` that part's lr). Both see whole tensors under
ZeRO and tp through :mod:`parallel.optim.tensorwise`. onebit_adam: :class:`parallel.optim.onebit_adam.OneBitAdam`
(``freeze_step`` Adam warm-up steps, then compressed momentum; ZeRO stages 0–2); onebit_lamb, zero_one_adam
likewise, with the keys of :mod:`parallel.config.onebit_keys`. ``state_dtype: int8``
with adam/adamw: :class:`parallel.optim.adam8bit.Adam8bit` (block-wise 8-bit moments).

``fused`` (adam/adamw/sgd): torch's fused kernel (one launch per tensor group: the update reads p, g, m, v
and writes p, m, v once, ≈ 28 bytes per fp32 element for Adam, against ≈ 2× that for the foreach path's
separate passes). Left unset it is on when every parameter handed to the optimizer lives on CUDA (what a
plain loop on a GPU should use, and what DeepSpeed's FusedAdam gives its users) and off elsewhere, so CPU
runs keep torch's default foreach/single-tensor arithmetic and their recorded numbers.
"""
from __future__ import annotations

import torch

from parallel.config import OptimizerConfig
from parallel.config.onebit_keys import onebit_kwargs
from parallel.optim.adam8bit import Adam8bit
from parallel.optim.lamb import Lamb
from parallel.optim.muon import MuonAdamW
from parallel.optim.onebit_adam import OneBitAdam
from parallel.optim.onebit_lamb import OneBitLamb
from parallel.optim.zero_one_adam import ZeroOneAdam

_CLASSES = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD, "lamb": Lamb,
            "muon": MuonAdamW, "onebit_adam": OneBitAdam, "onebit_lamb": OneBitLamb,
            "zero_one_adam": ZeroOneAdam}
_RENAME = {"muon": {"eps": "adamw_eps"}}


def optimizer_factory(cfg: OptimizerConfig):
    """A function params → torch.optim.Optimizer built from ``optimizer.*``."""
    cls = _CLASSES[cfg.name]
    keys = ("lr", "weight_decay", "momentum", "eps") + {"muon": ("adamw_lr",)}.get(cfg.name, ())
    rename = _RENAME.get(cfg.name, {})
    kwargs = {rename.get(k, k): getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None}
    kwargs.update(onebit_kwargs(cfg))           # freeze_step, update_bound, 0/1 Adam's and 1-bit LAMB's keys
    if cfg.betas is not None:
        kwargs["betas"] = tuple(cfg.betas)
    if cfg.state_dtype == "int8":                # adam/adamw with 8-bit moments; torch's defaults kept
        cls = Adam8bit
        kwargs["decoupled"] = cfg.name == "adamw"
        if cfg.name == "adamw":
            kwargs.setdefault("weight_decay", 0.01)
    if cls is torch.optim.SGD and "lr" not in kwargs:
        kwargs["lr"] = 1e-3                     # torch >= 2.4 default; older versions require it

    fusable = cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)

    def build(params):
        params = list(params)
        if fusable and cfg.fused is not False and "fused" not in kwargs:
            tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
            if cfg.fused or (tensors and all(t.is_cuda for t in tensors)):
                return cls(params, fused=True, **kwargs)
        return cls(params, **kwargs)
    build.kwargs = kwargs
    build.cls = cls
    return build
