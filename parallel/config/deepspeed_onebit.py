"""DeepSpeed's ``"OneBitLamb"`` and ``"ZeroOneAdam"`` optimizer types → ``optimizer.*`` (printed line by line).

OneBitLamb (deepspeed/runtime/fp16/onebit/lamb.py) → ``onebit_lamb`` (:mod:`parallel.optim.onebit_lamb`):
``freeze_step`` and the coefficients ``max_coeff, min_coeff, coeff_beta, factor_max, factor_min,
factor_threshold`` carry over with DeepSpeed's defaults (100000, 10.0, 0.01, 0.9, 4.0, 0.5, 0.1). One
difference is printed: our averaged trust ratio is bias-corrected (DeepSpeed's starts at 0 uncorrected).

ZeroOneAdam (deepspeed/runtime/fp16/onebit/zoadam.py) → ``zero_one_adam`` (:mod:`parallel.optim.zero_one_adam`):
``var_freeze_step, var_update_scaler, local_step_scaler, local_step_clipper`` with DeepSpeed's defaults
(100000, 16, 32678, 16). DeepSpeed's update has no bias correction whatever ``bias_correction`` says, so
``optimizer.bias_correction = false`` (its math); its first step only sets up buffers (not reproduced: said).

Both: ``eps_inside_sqrt`` and ``amsgrad`` only off, ``max_grad_norm`` only 0 (refused otherwise, naming the key);
``cuda_aware`` and ``comm_backend_name`` ignored (the dp group's backend); any other key refused by name.
``update_bound`` is not a DeepSpeed key: our clamp of the compressed step (1-bit Adam's guard) stays at the
native value, printed, with how to turn it off to match DeepSpeed.
"""
from __future__ import annotations

import json

from parallel.config import deepspeed_keys as K
from parallel.config.deepspeed_mapper import Mapper

__all__ = ["map_onebit"]

_LAMB = {"freeze_step": (100000, int), "max_coeff": (10.0, float), "min_coeff": (0.01, float),
         "coeff_beta": (0.9, float), "factor_max": (4.0, float), "factor_min": (0.5, float),
         "factor_threshold": (0.1, float)}
_ZO = {"var_freeze_step": (100000, int), "var_update_scaler": (16, int), "local_step_scaler": (32678, int),
       "local_step_clipper": (16, int)}


def map_onebit(m: Mapper, typ, t: str, p: dict):
    """The OneBitLamb / ZeroOneAdam branch of ``map_optimizer``: (known, off, ignored, weight-decay default)."""
    lamb = t == "onebitlamb"
    name, keys = ("onebit_lamb", _LAMB) if lamb else ("zero_one_adam", _ZO)
    m.set("optimizer.type", typ, "optimizer.name", name,
          "parallel.optim.onebit_lamb.OneBitLamb (LAMB warm-up, then 1-bit momentum with per-tensor scaling; "
          "trust-ratio average bias-corrected, DeepSpeed's is not)" if lamb else
          "parallel.optim.zero_one_adam.ZeroOneAdam (adaptive variance freezing, 1-bit exchanges, local steps; "
          "DeepSpeed's first step only sets up buffers, ours updates)")
    for k, (default, kind) in keys.items():
        v = m.number(f"optimizer.params.{k}", p.get(k, default), (int,) if kind is int else (int, float),
                     "an integer" if kind is int else "a number")
        m.set(f"optimizer.params.{k}", p.get(k, f"(unset: {default})"), f"optimizer.{k}", kind(v),
              "" if k in p else "DeepSpeed's default")
    if not lamb:
        m.set("optimizer.params.bias_correction", p.get("bias_correction", "(unset: true)"),
              "optimizer.bias_correction", False, "DeepSpeed's ZeroOneAdam ignores the flag: its update uses m and v "
              "uncorrected")
    ub = m.native("optimizer.update_bound", "adam")
    m.lines.append(f"optimizer.update_bound = {json.dumps(ub)} (not a DeepSpeed key; the clamp of the compressed "
                   f"step for elements whose frozen variance is ~0: set optimizer.update_bound=none to compute as "
                   f"DeepSpeed)")
    known = ("lr", "betas", "eps", "weight_decay", *keys, *(() if lamb else ("bias_correction",)))
    off = {"max_grad_norm": ((0, 0.0), "use the top-level gradient_clipping (refused with 1-bit optimizers: "
                                       "no global norm of the local gradients)"),
           "eps_inside_sqrt": ((False,), "only eps outside the square root (Adam's form) is available: remove it"),
           "amsgrad": ((False,), "AMSGrad is not available (DeepSpeed refuses it too): remove it")}
    ign = {"cuda_aware": K.PERF, "comm_backend_name": "parallel3d communicates on the dp group's backend"}
    return known, off, ign, (None, f"DeepSpeed's default 0.0 equals {name}'s")
