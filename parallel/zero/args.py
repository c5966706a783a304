"""ZeroOptimizer's constructor arguments checked before anything is built: each bad value named with the
config key it comes from and what it must be."""
from __future__ import annotations

import torch.nn as nn

from parallel.comm import Group
from parallel.zero.grad_norm import NONFINITE_POLICIES

__all__ = ["check_args"]


def check_args(module, optimizer_factory, dp_group, zero, grad_clip, on_nonfinite, norm_groups) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"ZeroOptimizer needs an nn.Module, got {type(module).__name__}")
    if not callable(optimizer_factory):
        raise TypeError("optimizer_factory must be a callable params -> torch.optim.Optimizer, "
                        "e.g. lambda ps: torch.optim.AdamW(ps, lr=1e-3)")
    if not isinstance(dp_group, Group):
        raise TypeError(f"dp_group must be a parallel.comm.Group (mesh.group('dp')), got {type(dp_group).__name__}")
    if not all(hasattr(zero, k) for k in ("stage", "bucket_mb", "prefetch", "offload")):
        raise TypeError(f"zero= needs a parallel.config.ZeroConfig (the config's zero section), "
                        f"got {type(zero).__name__}")
    if zero.stage not in (0, 1, 2, 3):
        raise ValueError(f"zero.stage={zero.stage!r} must be 0, 1, 2 or 3")
    if not zero.bucket_mb > 0:
        raise ValueError(f"zero.bucket_mb={zero.bucket_mb!r} must be positive")
    unit_mb, reuse = getattr(zero, "unit_mb", 0), getattr(zero, "max_reuse_distance", None)
    if isinstance(unit_mb, bool) or not isinstance(unit_mb, (int, float)) or not 0 <= unit_mb < float("inf"):
        raise ValueError(f"zero.unit_mb={unit_mb!r} must be a finite number >= 0 (MiB per merged stage-3 unit; 0: "
                         f"one unit per module or block)")
    if reuse is not None and (isinstance(reuse, bool) or not isinstance(reuse, (int, float)) or not reuse >= 0):
        raise ValueError(f"zero.max_reuse_distance={reuse!r} must be a number >= 0 (elements) or None")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"train.grad_clip={grad_clip!r} must be positive (or None for no clipping)")
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"train.on_nonfinite={on_nonfinite!r} must be one of {list(NONFINITE_POLICIES)}")
    for g in norm_groups:
        if not isinstance(g, Group):
            raise TypeError(f"norm_groups must hold parallel.comm.Group objects, got {type(g).__name__}")
