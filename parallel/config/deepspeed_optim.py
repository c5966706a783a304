"""DeepSpeed's ``optimizer`` and ``scheduler`` blocks → ``optimizer.*`` and ``scheduler.*``.

DeepSpeed's optimizer ``"Adam"`` is AdamW unless ``adam_w_mode: false`` (``"AdamW"`` always is);
FusedAdam and DeepSpeedCPUAdam default ``weight_decay`` to 0.0, torch's AdamW to 0.01. Schedulers
map onto :mod:`parallel.optim.factory.lr_schedule` with ``convention: deepspeed`` (its exact formulas).
``"Lamb"`` (FusedLamb) is :class:`parallel.optim.lamb.Lamb` with the same defaults. ``"OneBitLamb"`` and
``"ZeroOneAdam"``: :mod:`parallel.config.deepspeed_onebit`.
"""
from __future__ import annotations

import json

from parallel.config import deepspeed_keys as K
from parallel.config.deepspeed_mapper import AUTO, Mapper
from parallel.config.deepspeed_onebit import map_onebit
from parallel.config.errors import ConfigError
from parallel.config.validate import check_schedule

__all__ = ["map_optimizer", "map_scheduler", "map_pld"]


def map_optimizer(m: Mapper):
    b = m.block("optimizer")
    if b is None:
        return
    m.sub_keys(b, "optimizer", {"type", "params"}, {"legacy_fusion": K.PERF})
    typ, p = b.get("type"), b.get("params") or {}
    if not isinstance(p, dict):
        m.fail("optimizer.params", f"expected a JSON object, got {json.dumps(p)}")
    t = str(typ).lower()
    if t in ("adam", "adamw"):
        torch_adam, w_mode = bool(p.get("torch_adam", False)), p.get("adam_w_mode", True)
        name = "adamw" if t == "adamw" or w_mode else "adam"
        m.set("optimizer.type", typ, "optimizer.name", name, "DeepSpeed's \"Adam\" is AdamW unless "
              "adam_w_mode is false" if t == "adam" else "")
        known = ("lr", "betas", "eps", "weight_decay")
        off = {"bias_correction": ((True,), "Adam without bias correction is not available: remove it"),
               "amsgrad": ((False,), "AMSGrad is not available: remove it"),
               "max_grad_norm": ((), "DeepSpeed rejects it too: use the top-level gradient_clipping")}
        ign = {k: K.PERF for k in ("foreach", "fused", "capturable", "differentiable", "set_grad_none")}
        for k, what in (("adam_w_mode", f"optimizer.name = {json.dumps(name)}"),
                        ("torch_adam", "torch.optim class: unset fields keep torch's defaults")):
            if k in p:
                m.lines.append(f"optimizer.params.{k} = {json.dumps(p[k])} -> {what}")
        wd = (None, "torch's default") if torch_adam else (0.0, "FusedAdam/DeepSpeedCPUAdam default; "
                                                                "torch's AdamW would use 0.01")
    elif t == "sgd":
        m.set("optimizer.type", typ, "optimizer.name", "sgd")
        known = ("lr", "momentum", "weight_decay")
        off = {"dampening": ((0, 0.0), "SGD dampening is not available: remove it"),
               "nesterov": ((False,), "Nesterov SGD is not available: remove it"),
               "maximize": ((False,), "remove it")}
        ign, wd = {k: K.PERF for k in ("foreach", "fused", "differentiable")}, (None, "torch's default")
    elif t == "lamb":
        m.set("optimizer.type", typ, "optimizer.name", "lamb", "parallel.optim.lamb.Lamb: FusedLamb's update "
              "and defaults, trust ratio over whole tensors under ZeRO and tp")
        known = ("lr", "betas", "eps", "weight_decay")
        off = {"bias_correction": ((True,), "LAMB without bias correction is not available: remove it"),
               "max_coeff": ((10, 10.0), "only FusedLamb's default 10.0 is available: remove it"),
               "min_coeff": ((0.01,), "only FusedLamb's default 0.01 is available: remove it"),
               "max_grad_norm": ((), "use the top-level gradient_clipping")}
        ign, wd = {}, (None, "FusedLamb's default 0.0 equals Lamb's")
    elif t == "onebitadam":
        m.set("optimizer.type", typ, "optimizer.name", "onebit_adam", "parallel.optim.onebit_adam.OneBitAdam "
              "(bias-corrected Adam warm-up, then 1-bit momentum with error feedback; zero.stage 0)")
        known = ("lr", "betas", "eps", "weight_decay", "freeze_step")
        off = {"max_grad_norm": ((), "use the top-level gradient_clipping")}
        ign = {"cuda_aware": K.PERF, "comm_backend_name": "parallel3d communicates on the dp group's backend"}
        wd = (None, "DeepSpeed's default 0.0 equals OneBitAdam's")
        fs = m.number("optimizer.params.freeze_step", p.get("freeze_step", 100000), (int,), "an integer")
        m.set("optimizer.params.freeze_step", p.get("freeze_step", "(unset: 100000)"), "optimizer.freeze_step", fs,
              "" if "freeze_step" in p else "DeepSpeed's default")
    elif t in ("onebitlamb", "zerooneadam"):
        known, off, ign, wd = map_onebit(m, typ, t, p)            # parallel/config/deepspeed_onebit.py
    else:
        m.fail("optimizer.type", f"{json.dumps(typ)} is not available in parallel3d (it has AdamW, Adam, SGD, "
                                 f"Lamb, OneBitAdam, OneBitLamb and ZeroOneAdam); another optimizer changes every "
                                 f"update: use \"AdamW\" or \"SGD\"")
    m.sub_keys(p, "optimizer.params", {*known, *(("adam_w_mode", "torch_adam") if t in ("adam", "adamw") else ())},
               ign, off)
    for k in ("lr", "betas", "eps", "momentum", "weight_decay"):
        ours = f"optimizer.{k}"
        if k not in known:
            if m.native(ours) is not None:
                m.set(f"optimizer.params.{k}", "(not used)", ours, None, f"{typ} has no {k}")
        elif k not in p:
            value, why = wd if k == "weight_decay" else (None, "DeepSpeed's default equals torch's")
            if value is not None or m.native(ours) is not None:
                m.set(f"optimizer.params.{k}", "(unset)", ours, value, why)
        else:
            v = m.value(p, k, ours)
            if k == "betas" and v is not None:
                if not (isinstance(v, (list, tuple)) and len(v) == 2):
                    m.fail("optimizer.params.betas", f"{json.dumps(v)} must be two numbers, e.g. [0.9, 0.999]")
                v = [float(m.number("optimizer.params.betas", x)) for x in v]
            elif v is not None:
                v = float(m.number(f"optimizer.params.{k}", v))
            m.set(f"optimizer.params.{k}", p[k], ours, v, "from the native config" if p[k] == AUTO else "")


def map_scheduler(m: Mapper):
    b = m.block("scheduler")
    if b is None:
        return
    m.sub_keys(b, "scheduler", {"type", "params"})
    typ, p, pre = b.get("type"), b.get("params") or {}, "scheduler.params"
    name = {"WarmupLR": "warmup", "WarmupDecayLR": "warmup_linear", "WarmupCosineLR": "warmup_cosine"}.get(typ)
    if name is None:
        m.fail("scheduler.type", f"{json.dumps(typ)} cannot be reproduced exactly (parallel3d has WarmupLR, "
                                 f"WarmupDecayLR and WarmupCosineLR): use one of those or drop the block")
    known = {"warmup_num_steps", "warmup_type"} | (
        {"total_num_steps", "warmup_min_ratio", "cos_min_ratio"} if name == "warmup_cosine" else
        {"warmup_min_lr", "warmup_max_lr"} | ({"total_num_steps"} if name == "warmup_linear" else set()))
    m.sub_keys(p, pre, known, {"last_batch_iteration": "resume position; restored from the checkpoint"})
    m.set("scheduler.type", typ, "scheduler.name", name)
    m.set("scheduler.type", typ, "scheduler.convention", "deepspeed", "DeepSpeed's step indexing")
    wt = m.value(p, "warmup_type", "scheduler.warmup_type", "log")
    if wt not in ("linear", "log"):
        m.fail(f"{pre}.warmup_type", f"{json.dumps(wt)} is not linear or log (DeepSpeed would silently use "
                                     f"log): set \"linear\" or \"log\"")
    m.set(f"{pre}.warmup_type", p.get("warmup_type", "(unset: log)"), "scheduler.warmup_type", wt)
    n = m.number(f"{pre}.warmup_num_steps", m.value(p, "warmup_num_steps", "scheduler.warmup_steps", 1000),
                 (int,), "an integer")
    m.set(f"{pre}.warmup_num_steps", p.get("warmup_num_steps", "(unset: 1000)"), "scheduler.warmup_steps",
          max(2, n), "DeepSpeed warms up over max(2, n) steps")
    if name != "warmup":
        if "total_num_steps" not in p:
            m.fail(f"{pre}.total_num_steps", f"{typ} needs it (DeepSpeed requires it too): add it")
        T = m.value(p, "total_num_steps", "scheduler.total_steps") or m.native("train.steps")
        m.set(f"{pre}.total_num_steps", p["total_num_steps"], "scheduler.total_steps",
              m.number(f"{pre}.total_num_steps", T, (int,), "an integer"))
    lr = m.mapped("optimizer.lr")
    if name == "warmup_cosine":
        for k, ours, d in (("warmup_min_ratio", "warmup_start_ratio", 0.0),
                           ("cos_min_ratio", "min_lr_ratio", 1e-4)):
            v = m.number(f"{pre}.{k}", m.value(p, k, f"scheduler.{ours}", d))
            m.set(f"{pre}.{k}", p.get(k, f"(unset: {d})"), f"scheduler.{ours}", float(v))
        m.lines.append(f"scheduler: WarmupCosineLR scales optimizer.lr = {json.dumps(lr)} by these ratios")
    else:
        hi = m.value(p, "warmup_max_lr", "optimizer.lr")
        hi = m.number(f"{pre}.warmup_max_lr", hi if hi is not None else lr if lr is not None else 1e-3,
                      what="one number (parallel3d has one param group)")
        lo = m.value(p, "warmup_min_lr", None, 0.0) or 0.0
        lo = m.number(f"{pre}.warmup_min_lr", lo, what="one number (parallel3d has one param group)")
        if hi <= 0 or not 0 <= lo <= hi:
            m.fail(f"{pre}.warmup_min_lr", f"needs 0 <= warmup_min_lr ({lo}) <= warmup_max_lr ({hi}) and "
                                           f"warmup_max_lr > 0: fix the two values")
        note = "DeepSpeed's scheduler sets the lr" + (f"; replaces {lr}" if lr is not None and lr != hi else "")
        m.set(f"{pre}.warmup_max_lr", p.get("warmup_max_lr", "(unset: the optimizer's lr)"), "optimizer.lr",
              float(hi), note)
        for ours, why in (("warmup_start_ratio", "warmup_min_lr / warmup_max_lr"),
                          ("min_lr_ratio", "DeepSpeed decays to warmup_min_lr" if name == "warmup_linear" else
                           "equal to the start ratio; unused without decay")):
            m.set(f"{pre}.warmup_min_lr", p.get("warmup_min_lr", "(unset: 0)"), f"scheduler.{ours}",
                  lo / hi, why)
    try:
        check_schedule(**{"total_steps": 2 ** 31, **m.out["scheduler"]})
    except ConfigError as e:
        m.fail(f"{pre}.total_num_steps / warmup_num_steps", f"{e}; adjust the {typ} params")


def map_pld(m: Mapper):
    """``progressive_layer_drop`` {enabled, theta, gamma} → ``pld.*`` (:mod:`parallel.layer_drop`)."""
    b = m.block("progressive_layer_drop")
    if b is None:
        return
    m.sub_keys(b, "progressive_layer_drop", {"enabled", "theta", "gamma"})
    on = m.value(b, "enabled", "pld.enabled", False)
    if not isinstance(on, bool):
        m.fail("progressive_layer_drop.enabled", f"{json.dumps(on)} must be true or false")
    m.set("progressive_layer_drop.enabled", b.get("enabled", "(unset: false)"), "pld.enabled", on)
    for k, d in (("theta", 0.5), ("gamma", 0.001)):
        v = float(m.number(f"progressive_layer_drop.{k}", m.value(b, k, f"pld.{k}", d)))
        m.set(f"progressive_layer_drop.{k}", b.get(k, f"(unset: {d})"), f"pld.{k}", v)
