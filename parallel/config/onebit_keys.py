"""``optimizer.*`` keys of the compressed-communication optimizers: which optimizer each applies to, and
their values checked before anything is built (parallel/optim/onebit_adam.py, onebit_lamb.py, zero_one_adam.py).

    freeze_step                          onebit_adam, onebit_lamb   Adam / LAMB warm-up steps (100)
    update_bound                         all three                  clamp R of the compressed step: a number > 0,
                                                                    "adam" (default, max(1, (1−β1)/√(1−β2))) or "none"
    var_freeze_step, var_update_scaler,  zero_one_adam              DeepSpeed's ZeroOneAdam keys (100000, 16,
    local_step_scaler, local_step_clipper                           32678, 16): ints >= 1
    bias_correction                      zero_one_adam              true (default) or false
    max_coeff, min_coeff, coeff_beta,    onebit_lamb                1-bit LAMB's coefficients (10.0, 0.01, 0.9,
    factor_max, factor_min, factor_threshold                        4.0, 0.5, 0.1)
"""
from __future__ import annotations

from parallel.config.errors import ConfigError

__all__ = ["ONEBIT_KEYS", "check_onebit_keys", "onebit_kwargs"]

_ALL = ("onebit_adam", "onebit_lamb", "zero_one_adam")
_ZO = ("var_freeze_step", "var_update_scaler", "local_step_scaler", "local_step_clipper")
_LAMB = ("max_coeff", "min_coeff", "coeff_beta", "factor_max", "factor_min", "factor_threshold")
ONEBIT_KEYS = {"freeze_step": ("onebit_adam", "onebit_lamb"), "update_bound": _ALL,
               **{k: ("zero_one_adam",) for k in (*_ZO, "bias_correction")}, **{k: ("onebit_lamb",) for k in _LAMB}}


def _bound(v):
    if isinstance(v, str) and v.strip().lower() in ("adam", "none", "null"):
        return None if v.strip().lower() != "adam" else "adam"
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
        return float(v)
    raise ConfigError(f"optimizer.update_bound={v!r} must be a number > 0, \"adam\" (Adam's own bound, the default) "
                      f"or \"none\" (no clamp)")


def check_onebit_keys(o) -> None:
    """Each key only with an optimizer that reads it, with a valid value."""
    for k, names in ONEBIT_KEYS.items():
        v = getattr(o, k, None)
        if v is None:
            continue
        if o.name not in names:
            raise ConfigError(f"optimizer.{k} applies to {' / '.join(names)}, not {o.name}: remove it")
        if k == "update_bound":
            _bound(v)
        elif k in (*_ZO, "freeze_step") and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ConfigError(f"optimizer.{k}={v!r} must be an integer >= 1")
    lo, hi = o.min_coeff, o.max_coeff
    if lo is not None and hi is not None and not 0 < lo <= hi:
        raise ConfigError(f"optimizer.min_coeff={lo} and max_coeff={hi} need 0 < min_coeff <= max_coeff")
    for k, ok, what in (("coeff_beta", lambda x: 0 <= x < 1, "in [0, 1)"), ("factor_min", lambda x: 0 < x <= 1,
                        "in (0, 1]"), ("factor_max", lambda x: x >= 1, ">= 1"), ("factor_threshold", lambda x: x >= 0,
                        ">= 0"), ("min_coeff", lambda x: x > 0, "> 0"), ("max_coeff", lambda x: x > 0, "> 0")):
        v = getattr(o, k, None)
        if v is not None and not ok(v):
            raise ConfigError(f"optimizer.{k}={v} must be {what}")


def onebit_kwargs(o) -> dict:
    """The constructor arguments the user set (unset ones keep the class defaults)."""
    out = {k: getattr(o, k) for k, names in ONEBIT_KEYS.items() if o.name in names and getattr(o, k) is not None}
    if "update_bound" in out:
        out["update_bound"] = _bound(out["update_bound"])
    return out
