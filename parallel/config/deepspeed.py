"""Reading DeepSpeed JSON configs: what each key means in parallel3d's config tree.

    ds = load_deepspeed_json("configs/deepspeed/zero2.json")
    overrides, report = map_deepspeed(ds, base=yaml_tree, dp_size=2)
    tree = merge_tree(yaml_tree, overrides)          # DeepSpeed's values replace the YAML's
    print(format_report(report))

Rules (https://www.deepspeed.ai/docs/config-json/):
- Only what the file states is mapped; a block that is present maps its meaning-bearing keys with
  DeepSpeed's defaults (e.g. an ``optimizer`` block without ``weight_decay`` means FusedAdam's 0.0).
- ``"auto"`` (the Hugging Face convention) takes the native value from ``base``, else our default.
- Batch: train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps × dp, the
  missing one derived as DeepSpeed derives it; an inconsistent triple is an error.
- A key that only tunes speed or logging is ignored with one report line saying why; a key whose
  meaning parallel3d cannot reproduce (other optimizers, both fp16 and bf16, quantized ZeRO, …) is a
  :class:`ConfigError` naming the key and the fix; an unknown key is an error too.
- DeepSpeed's optimizer ``"Adam"`` is AdamW unless ``adam_w_mode: false`` (``"AdamW"`` always is);
  FusedAdam and DeepSpeedCPUAdam default ``weight_decay`` to 0.0, torch's AdamW to 0.01.
- Schedulers map onto :mod:`parallel.optim.factory.lr_schedule` with ``convention: deepspeed`` (its exact formulas).
"""
from __future__ import annotations

import copy
import json
import os

from parallel.config import deepspeed_keys as K
from parallel.config.errors import ConfigError
from parallel.config.schema import Config
from parallel.config.validate import check_schedule

AUTO = "auto"
_MISSING = object()
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class _Mapper:
    def __init__(self, ds: dict, base: dict | None, dp: int):
        if not isinstance(ds, dict):
            raise ConfigError(f"a DeepSpeed config must be a JSON object at the top level, got {type(ds).__name__}")
        if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
            raise ConfigError(f"map_deepspeed: dp_size={dp!r} must be a positive int (parallel.dp)")
        self.ds, self.base, self.dp = ds, base or {}, dp
        self.out: dict = {}
        self.lines: list[str] = []
        self.precision = self.native("precision", "fp32")

    # -- helpers -------------------------------------------------------------------------------
    def native(self, dotted: str, default=None):
        """The value in ``base`` (the native YAML tree), else Config's default, else ``default``."""
        for node in (self.base, Config()):
            for k in dotted.split("."):
                if isinstance(node, dict):
                    node = node.get(k, _MISSING)
                else:
                    node = getattr(node, k, _MISSING)
                if node is _MISSING:
                    break
            if node is not _MISSING:
                return default if node is None else node
        return default

    def mapped(self, dotted: str, default=None):
        """What this DeepSpeed config already mapped ``dotted`` to, else the native value."""
        node = self.out
        for k in dotted.split("."):
            if not isinstance(node, dict) or k not in node:
                return self.native(dotted, default)
            node = node[k]
        return default if node is None else node

    def fail(self, key: str, msg: str):
        raise ConfigError(f"deepspeed config: {key}: {msg}")

    def ignore(self, key: str, why: str):
        self.lines.append(f"ignored: {key} ({why})")

    def set(self, key: str, ds_value, ours: str, value, note: str = ""):
        node = self.out
        parts = ours.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        shown = ds_value if isinstance(ds_value, str) and ds_value.startswith("(") else json.dumps(ds_value)
        self.lines.append(f"{key} = {shown} -> {ours} = {json.dumps(value)}" + (f" ({note})" if note else ""))

    def value(self, block: dict, key: str, ours: str | None, default=None):
        """A block's value: "auto" → the native value of ``ours`` (else ``default``); absent → ``default``."""
        v = block.get(key, default)
        if v == AUTO:
            return self.mapped(ours, default) if ours else default
        return v

    def off_only(self, key: str, v, allowed, why_fix: str):
        if v == AUTO or v in allowed:
            self.ignore(key, f"{json.dumps(v)}: the default meaning, nothing to do")
        else:
            self.fail(key, f"{json.dumps(v)} is not supported: {why_fix}")

    def number(self, key: str, v, kinds=(int, float), what="a number"):
        if kinds == (int,) and isinstance(v, float) and v.is_integer():
            v = int(v)                                 # JSON 1e5
        if isinstance(v, bool) or not isinstance(v, kinds):
            self.fail(key, f"expected {what}, got {json.dumps(v)}")
        return v

    def sub_keys(self, block, prefix, known, ignored=None, off_only=None):
        for k, v in block.items():
            key = f"{prefix}.{k}"
            if k in known:
                continue
            if ignored and k in ignored:
                self.ignore(key, ignored[k])
            elif off_only and k in off_only:
                self.off_only(key, v, *off_only[k])
            else:
                names = sorted(set(known) | set(ignored or ()) | set(off_only or ()))
                self.fail(key, f"unknown key here (known: {names}); parallel3d does not know what it means: "
                               f"remove it or fix the spelling")

    def block(self, name: str) -> dict | None:
        b = self.ds.get(name)
        if b is None:
            return None
        if not isinstance(b, dict):
            self.fail(name, f"expected a JSON object, got {json.dumps(b)}")
        return b

    # -- sections ------------------------------------------------------------------------------
    def run(self):
        handled = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "fp16",
                   "bf16", "bfloat16", "gradient_clipping", "optimizer", "scheduler", "zero_optimization"}
        self.map_precision()
        self.map_batch()
        self.map_clipping()
        self.map_optimizer()
        self.map_scheduler()
        self.map_zero()
        for k, v in self.ds.items():
            if k in handled:
                continue
            if k in K.IGNORED:
                self.ignore(k, K.IGNORED[k])
            elif k in K.OFF_ONLY:
                self.off_only(k, v, *K.OFF_ONLY[k])
            elif k in K.FEATURES or k in K.PRESENT_MEANS_ON:
                self.map_feature(k, v)
            elif k == "data_types":
                self.map_data_types(v)
            else:
                self.fail(k, "unknown DeepSpeed key; parallel3d does not know what it means: remove it or fix the "
                             "spelling (see https://www.deepspeed.ai/docs/config-json/)")
        return self.out, self.lines

    def map_feature(self, k, v):
        if k in K.PRESENT_MEANS_ON:
            on = True
        elif k == "tensor_parallel":
            on = isinstance(v, dict) and v.get("autotp_size", 1) not in (0, 1, AUTO)
        else:
            on = v.get("enabled", False) if isinstance(v, dict) else v
            on = on not in (False, None, AUTO)
        if not on:
            self.ignore(k, "disabled")
            return
        fix = "use parallel.tp instead" if k == "tensor_parallel" else "remove the block (or set enabled: false)"
        self.fail(k, f"DeepSpeed's {k} changes the model, the data or the math, and parallel3d does not have it: {fix}")

    def map_data_types(self, v):
        if not isinstance(v, dict):
            self.fail("data_types", f"expected a JSON object, got {json.dumps(v)}")
        for k, val in v.items():
            allowed = (None, "fp32", "float32", "float") if k == "grad_accum_dtype" else (None,)
            self.off_only(f"data_types.{k}", val, allowed, "parallel3d accumulates gradients in fp32 and casts "
                                                           "parameters as `precision` says: remove the key")

    def map_precision(self):
        if "bf16" in self.ds and "bfloat16" in self.ds:
            self.fail("bfloat16", "both bf16 and its old name bfloat16 are given: keep only bf16")
        bname = "bfloat16" if "bfloat16" in self.ds else "bf16"
        fp16, bf16 = self.block("fp16"), self.block(bname)
        if fp16 is None and bf16 is None:
            return                                    # the native precision stays

        def enabled(blk, which):
            v = (blk or {}).get("enabled", False)
            return self.native("precision") == which if v == AUTO else bool(v)
        f_on, b_on = enabled(fp16, "fp16"), enabled(bf16, "bf16")
        if f_on and b_on:
            self.fail("fp16.enabled and bf16.enabled", "both are on; a run has one precision: enable only one")
        self.precision = "fp16" if f_on else "bf16" if b_on else "fp32"
        src = "fp16" if f_on or (not b_on and fp16 is not None) else bname
        self.set(f"{src}.enabled", (fp16 if src == "fp16" else bf16).get("enabled", False), "precision", self.precision)
        if bf16 is not None:
            if src != bname:
                self.ignore(f"{bname}.enabled", f"{json.dumps(bf16.get('enabled', False))}: bf16 is off")
            self.sub_keys(bf16, bname, {"enabled"}, {"immediate_grad_update": K.PERF}, K.BF16_OFF_ONLY)
        if fp16 is not None:
            self.map_fp16(fp16, f_on, src)

    def map_fp16(self, fp16, on, src):
        if src != "fp16":
            self.ignore("fp16.enabled", f"{json.dumps(fp16.get('enabled', False))}: fp16 is off")
        scale_keys = ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale",
                      "consecutive_hysteresis")
        self.sub_keys(fp16, "fp16", {"enabled", *scale_keys}, None, K.FP16_OFF_ONLY)
        if not on:
            for k in scale_keys:
                if k in fp16:
                    self.ignore(f"fp16.{k}", "fp16 is off")
            return
        raw = fp16.get("loss_scale", "(unset: 0)")
        static = self.value(fp16, "loss_scale", "loss_scale.static", 0) or 0
        if self.number("fp16.loss_scale", static) < 0:
            self.fail("fp16.loss_scale", f"{static} must be 0 (dynamic) or a positive static scale")
        self.set("fp16.loss_scale", raw, "loss_scale.static", float(static) if static else None,
                 "static scale" if static else "0 means dynamic scaling")
        power = fp16.get("initial_scale_power", 16)
        initial = self.native("loss_scale.initial") if power == AUTO else float(2 ** self.number(
            "fp16.initial_scale_power", power, (int,), "an integer"))
        self.set("fp16.initial_scale_power", fp16.get("initial_scale_power", "(unset: 16)"), "loss_scale.initial",
                 initial, "2**power")
        for k, ours, d, cast in (("loss_scale_window", "loss_scale.growth_interval", 1000, int),
                                 ("hysteresis", "loss_scale.hysteresis", 2, int),
                                 ("min_loss_scale", "loss_scale.min", 1, float)):
            v = self.number(f"fp16.{k}", self.value(fp16, k, ours, d))
            self.set(f"fp16.{k}", fp16.get(k, f"(unset: {d})"), ours, cast(v))
        ch = self.value(fp16, "consecutive_hysteresis", "loss_scale.consecutive_hysteresis", False)
        if not isinstance(ch, bool):
            self.fail("fp16.consecutive_hysteresis", f"expected true or false, got {json.dumps(ch)}")
        self.set("fp16.consecutive_hysteresis", fp16.get("consecutive_hysteresis", "(unset: false)"),
                 "loss_scale.consecutive_hysteresis", ch)

    def map_batch(self):
        keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
        if not any(k in self.ds for k in keys):
            return
        dp = self.dp
        n_tbs, n_mbs = self.native("data.global_batch_size"), self.native("data.micro_batch_size")
        n_gas = n_tbs // (dp * n_mbs) if n_tbs % (dp * n_mbs) == 0 else None
        tbs, mbs, gas = (self.ds.get(k) for k in keys)
        tbs, mbs, gas = (n if v == AUTO else v for v, n in ((tbs, n_tbs), (mbs, n_mbs), (gas, n_gas)))
        for k, v in zip(keys, (tbs, mbs, gas)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                self.fail(k, f"{json.dumps(self.ds.get(k))} must be a positive integer")
        if tbs is None and mbs is None:
            self.fail("train_batch_size", "neither train_batch_size nor train_micro_batch_size_per_gpu is given "
                                          "(DeepSpeed needs one of them): add one")
        if gas is None:                                # DeepSpeed's _set_batch_related_parameters
            gas = 1 if tbs is None or mbs is None else tbs // mbs // dp
        if mbs is None:
            mbs = tbs // dp // gas
        if tbs is None:
            tbs = mbs * gas * dp
        if mbs < 1 or gas < 1 or tbs != mbs * gas * dp:
            self.fail("train_batch_size", f"train_batch_size={tbs} must equal train_micro_batch_size_per_gpu={mbs} "
                                          f"x gradient_accumulation_steps={gas} x dp={dp} (= {mbs * gas * dp}): "
                                          f"fix one of the three numbers")
        for k, ours, v in ((keys[0], "data.global_batch_size", tbs), (keys[1], "data.micro_batch_size", mbs)):
            self.set(k, self.ds.get(k, "(derived)"), ours, v)
        shown = json.dumps(self.ds[keys[2]]) if keys[2] in self.ds else "(derived)"
        self.lines.append(f"{keys[2]} = {shown} -> {gas} micro-batches "
                          f"per dp rank per step (data.global_batch_size / (parallel.dp x data.micro_batch_size))")

    def map_clipping(self):
        if "gradient_clipping" not in self.ds:
            return
        raw = self.ds["gradient_clipping"]
        v = self.native("train.grad_clip") if raw == AUTO else raw
        if v is not None and self.number("gradient_clipping", v) < 0:
            self.fail("gradient_clipping", f"{v} must be 0 (off) or a positive max gradient norm")
        self.set("gradient_clipping", raw, "train.grad_clip", float(v) if v else None,
                 "max global L2 norm" if v else "0 means no clipping")

    def map_optimizer(self):
        b = self.block("optimizer")
        if b is None:
            return
        self.sub_keys(b, "optimizer", {"type", "params"}, {"legacy_fusion": K.PERF})
        typ, p = b.get("type"), b.get("params") or {}
        if not isinstance(p, dict):
            self.fail("optimizer.params", f"expected a JSON object, got {json.dumps(p)}")
        t = str(typ).lower()
        if t in ("adam", "adamw"):
            torch_adam, w_mode = bool(p.get("torch_adam", False)), p.get("adam_w_mode", True)
            name = "adamw" if t == "adamw" or w_mode else "adam"
            self.set("optimizer.type", typ, "optimizer.name", name, "DeepSpeed's \"Adam\" is AdamW unless "
                     "adam_w_mode is false" if t == "adam" else "")
            known = ("lr", "betas", "eps", "weight_decay")
            off = {"bias_correction": ((True,), "Adam without bias correction is not available: remove it"),
                   "amsgrad": ((False,), "AMSGrad is not available: remove it"),
                   "max_grad_norm": ((), "DeepSpeed rejects it too: use the top-level gradient_clipping")}
            ign = {k: K.PERF for k in ("foreach", "fused", "capturable", "differentiable", "set_grad_none")}
            for k, what in (("adam_w_mode", f"optimizer.name = {json.dumps(name)}"),
                            ("torch_adam", "torch.optim class: unset fields keep torch's defaults")):
                if k in p:
                    self.lines.append(f"optimizer.params.{k} = {json.dumps(p[k])} -> {what}")
            wd = (None, "torch's default") if torch_adam else (0.0, "FusedAdam/DeepSpeedCPUAdam default; "
                                                                    "torch's AdamW would use 0.01")
        elif t == "sgd":
            self.set("optimizer.type", typ, "optimizer.name", "sgd")
            known = ("lr", "momentum", "weight_decay")
            off = {"dampening": ((0, 0.0), "SGD dampening is not available: remove it"),
                   "nesterov": ((False,), "Nesterov SGD is not available: remove it"),
                   "maximize": ((False,), "remove it")}
            ign, wd = {k: K.PERF for k in ("foreach", "fused", "differentiable")}, (None, "torch's default")
        else:
            self.fail("optimizer.type", f"{json.dumps(typ)} is not available in parallel3d (it has AdamW, Adam and "
                                        f"SGD); another optimizer changes every update: use \"AdamW\" or \"SGD\"")
        self.sub_keys(p, "optimizer.params", {*known, *(("adam_w_mode", "torch_adam") if t != "sgd" else ())}, ign, off)
        for k in ("lr", "betas", "eps", "momentum", "weight_decay"):
            ours = f"optimizer.{k}"
            if k not in known:
                if self.native(ours) is not None:
                    self.set(f"optimizer.params.{k}", "(not used)", ours, None, f"{typ} has no {k}")
            elif k not in p:
                value, why = wd if k == "weight_decay" else (None, "DeepSpeed's default equals torch's")
                if value is not None or self.native(ours) is not None:
                    self.set(f"optimizer.params.{k}", "(unset)", ours, value, why)
            else:
                v = self.value(p, k, ours)
                if k == "betas" and v is not None:
                    if not (isinstance(v, (list, tuple)) and len(v) == 2):
                        self.fail("optimizer.params.betas", f"{json.dumps(v)} must be two numbers, e.g. [0.9, 0.999]")
                    v = [float(self.number("optimizer.params.betas", x)) for x in v]
                elif v is not None:
                    v = float(self.number(f"optimizer.params.{k}", v))
                self.set(f"optimizer.params.{k}", p[k], ours, v, "from the native config" if p[k] == AUTO else "")

    def map_scheduler(self):
        b = self.block("scheduler")
        if b is None:
            return
        self.sub_keys(b, "scheduler", {"type", "params"})
        typ, p, pre = b.get("type"), b.get("params") or {}, "scheduler.params"
        name = {"WarmupLR": "warmup", "WarmupDecayLR": "warmup_linear", "WarmupCosineLR": "warmup_cosine"}.get(typ)
        if name is None:
            self.fail("scheduler.type", f"{json.dumps(typ)} cannot be reproduced exactly (parallel3d has WarmupLR, "
                                        f"WarmupDecayLR and WarmupCosineLR): use one of those or drop the block")
        known = {"warmup_num_steps", "warmup_type"} | (
            {"total_num_steps", "warmup_min_ratio", "cos_min_ratio"} if name == "warmup_cosine" else
            {"warmup_min_lr", "warmup_max_lr"} | ({"total_num_steps"} if name == "warmup_linear" else set()))
        self.sub_keys(p, pre, known, {"last_batch_iteration": "resume position; restored from the checkpoint"})
        self.set("scheduler.type", typ, "scheduler.name", name)
        self.set("scheduler.type", typ, "scheduler.convention", "deepspeed", "DeepSpeed's step indexing")
        wt = self.value(p, "warmup_type", "scheduler.warmup_type", "log")
        if wt not in ("linear", "log"):
            self.fail(f"{pre}.warmup_type", f"{json.dumps(wt)} is not linear or log (DeepSpeed would silently use "
                                            f"log): set \"linear\" or \"log\"")
        self.set(f"{pre}.warmup_type", p.get("warmup_type", "(unset: log)"), "scheduler.warmup_type", wt)
        n = self.number(f"{pre}.warmup_num_steps", self.value(p, "warmup_num_steps", "scheduler.warmup_steps", 1000),
                        (int,), "an integer")
        self.set(f"{pre}.warmup_num_steps", p.get("warmup_num_steps", "(unset: 1000)"), "scheduler.warmup_steps",
                 max(2, n), "DeepSpeed warms up over max(2, n) steps")
        if name != "warmup":
            if "total_num_steps" not in p:
                self.fail(f"{pre}.total_num_steps", f"{typ} needs it (DeepSpeed requires it too): add it")
            T = self.value(p, "total_num_steps", "scheduler.total_steps") or self.native("train.steps")
            self.set(f"{pre}.total_num_steps", p["total_num_steps"], "scheduler.total_steps",
                     self.number(f"{pre}.total_num_steps", T, (int,), "an integer"))
        lr = self.mapped("optimizer.lr")
        if name == "warmup_cosine":
            for k, ours, d in (("warmup_min_ratio", "warmup_start_ratio", 0.0),
                               ("cos_min_ratio", "min_lr_ratio", 1e-4)):
                v = self.number(f"{pre}.{k}", self.value(p, k, f"scheduler.{ours}", d))
                self.set(f"{pre}.{k}", p.get(k, f"(unset: {d})"), f"scheduler.{ours}", float(v))
            self.lines.append(f"scheduler: WarmupCosineLR scales optimizer.lr = {json.dumps(lr)} by these ratios")
        else:
            hi = self.value(p, "warmup_max_lr", "optimizer.lr")
            hi = self.number(f"{pre}.warmup_max_lr", hi if hi is not None else lr if lr is not None else 1e-3,
                             what="one number (parallel3d has one param group)")
            lo = self.value(p, "warmup_min_lr", None, 0.0) or 0.0
            lo = self.number(f"{pre}.warmup_min_lr", lo, what="one number (parallel3d has one param group)")
            if hi <= 0 or not 0 <= lo <= hi:
                self.fail(f"{pre}.warmup_min_lr", f"needs 0 <= warmup_min_lr ({lo}) <= warmup_max_lr ({hi}) and "
                                                  f"warmup_max_lr > 0: fix the two values")
            note = "DeepSpeed's scheduler sets the lr" + (f"; replaces {lr}" if lr is not None and lr != hi else "")
            self.set(f"{pre}.warmup_max_lr", p.get("warmup_max_lr", "(unset: the optimizer's lr)"), "optimizer.lr",
                     float(hi), note)
            for ours, why in (("warmup_start_ratio", "warmup_min_lr / warmup_max_lr"),
                              ("min_lr_ratio", "DeepSpeed decays to warmup_min_lr" if name == "warmup_linear" else
                               "equal to the start ratio; unused without decay")):
                self.set(f"{pre}.warmup_min_lr", p.get("warmup_min_lr", "(unset: 0)"), f"scheduler.{ours}",
                         lo / hi, why)
        try:
            check_schedule(**{"total_steps": 2 ** 31, **self.out["scheduler"]})
        except ConfigError as e:
            self.fail(f"{pre}.total_num_steps / warmup_num_steps", f"{e}; adjust the {typ} params")

    def map_zero(self):
        z = self.ds.get("zero_optimization")
        if z is None:
            return
        if isinstance(z, bool):                                        # DeepSpeed's deprecated form
            self.set("zero_optimization", z, "zero.stage", 1 if z else 0)
            return
        if not isinstance(z, dict):
            self.fail("zero_optimization", f"expected a JSON object, got {json.dumps(z)}")
        mapped = {"stage", "reduce_bucket_size", "stage3_prefetch_bucket_size", "prefetch_bucket_size",
                  "offload_optimizer", "offload_param", "cpu_offload", "cpu_offload_param"}
        self.sub_keys(z, "zero_optimization", mapped, K.ZERO_IGNORED, K.ZERO_OFF_ONLY)
        stage = self.value(z, "stage", "zero.stage", 0)
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
            self.fail("zero_optimization.stage", f"{json.dumps(stage)} must be 0, 1, 2 or 3 (there is no stage "
                                                 f"above 3): set one of them")
        self.set("zero_optimization.stage", z.get("stage", "(unset: 0)"), "zero.stage", stage)
        elem = _DTYPE_BYTES[self.precision]
        self.sized(z, "zero_optimization", "reduce_bucket_size", "zero.bucket_mb", elem)
        for key in ("stage3_prefetch_bucket_size", "prefetch_bucket_size"):
            if key in z:
                v = (self.native("zero.prefetch") if z[key] == AUTO
                     else self.number(f"zero_optimization.{key}", z[key]) > 0)
                self.set(f"zero_optimization.{key}", z[key], "zero.prefetch", v,
                         "from the native config" if z[key] == AUTO else "a positive size prefetches")
        self.map_offload(z, stage, elem)

    def sized(self, block, pre, key, ours, elem):
        """A DeepSpeed size in elements → our MiB (elements × bytes per element / 2**20)."""
        if key in block:
            v = block[key]
            mb = self.native(ours) if v == AUTO else self.number(f"{pre}.{key}", v) * elem / 2 ** 20
            self.set(f"{pre}.{key}", v, ours, mb, "from the native config" if v == AUTO else
                     f"elements x {elem} bytes ({self.precision}) / 2**20")

    def map_offload(self, z, stage, elem):
        legacy = {"offload_optimizer": "cpu_offload", "offload_param": "cpu_offload_param"}
        blocks, paths, counts = {}, {}, []
        for name, ours in (("offload_optimizer", "optimizer"), ("offload_param", "params")):
            pre, blk = f"zero_optimization.{name}", z.get(name)
            if blk is None and z.get(legacy[name]):
                blk = {"device": "cpu"}
                self.lines.append(f"zero_optimization.{legacy[name]} = true -> read as {name}.device = \"cpu\"")
            elif legacy[name] in z:
                self.ignore(f"zero_optimization.{legacy[name]}", f"{json.dumps(z[legacy[name]])}: no legacy offload")
            if blk is None:
                self.set(pre, "(unset)", f"zero.offload.{ours}", "none")
                continue
            if not isinstance(blk, dict):
                self.fail(pre, f"expected a JSON object, got {json.dumps(blk)}")
            blocks[name] = blk
            known = {"device", "nvme_path", "buffer_count"} | ({"buffer_size"} if name == "offload_param" else set())
            self.sub_keys(blk, pre, known, K.OFFLOAD_IGNORED)
            dev = self.value(blk, "device", f"zero.offload.{ours}", "none") or "none"
            if dev not in ("none", "cpu", "nvme"):
                self.fail(f"{pre}.device", f"{json.dumps(dev)} must be \"cpu\", \"nvme\" or \"none\"")
            if dev != "none" and name == "offload_param" and stage != 3:
                self.fail(f"{pre}.device", f"parameter offload needs ZeRO stage 3 (got stage {stage}), as in "
                                           f"DeepSpeed: set zero_optimization.stage to 3 or the device to \"none\"")
            if dev != "none" and stage == 0:
                self.fail(f"{pre}.device", "optimizer offload needs ZeRO stage 1, 2 or 3 (got 0): set "
                                           "zero_optimization.stage")
            self.set(f"{pre}.device", blk.get("device", "(unset)"), f"zero.offload.{ours}", dev)
            if dev == "nvme":
                path = self.value(blk, "nvme_path", "zero.offload.nvme_path")
                if not path:
                    self.fail(f"{pre}.nvme_path", "device is nvme but nvme_path is not set: give a directory on a "
                                                  "local NVMe disk")
                paths[f"{pre}.nvme_path"] = path
            elif "nvme_path" in blk:
                self.ignore(f"{pre}.nvme_path", f"device is {dev}")
            if "buffer_count" in blk:
                v = blk["buffer_count"]
                counts.append((f"{pre}.buffer_count", self.native("zero.offload.buffer_count") if v == AUTO
                               else self.number(f"{pre}.buffer_count", v, (int,))))
        if len(set(paths.values())) > 1:
            self.fail(" and ".join(paths), f"differ ({' vs '.join(map(str, paths.values()))}); parallel3d has one "
                                           f"zero.offload.nvme_path: use one directory")
        for k, v in paths.items():
            self.set(k, v, "zero.offload.nvme_path", v)
        for k, v in counts:
            best = max(c for _, c in counts)
            if v == best:
                self.set(k, v, "zero.offload.buffer_count", v, "the larger of the two" if len(counts) > 1 else "")
            else:
                self.ignore(k, f"{v}: the larger count {best} is used for both")
        self.sized(blocks.get("offload_param", {}), "zero_optimization.offload_param", "buffer_size",
                   "zero.offload.buffer_mb", elem)


def map_deepspeed(ds: dict, base: dict | None = None, dp_size: int = 1) -> tuple[dict, list[str]]:
    """Map a DeepSpeed config onto parallel3d's config tree.

    ``base`` is the native YAML tree (plain dict, CLI overrides applied) that ``"auto"`` values read;
    ``dp_size`` is parallel.dp (DeepSpeed's data-parallel world size). Returns the nested overrides
    to merge into the YAML tree (:func:`merge_tree`) and one report line per mapped or ignored key.
    Raises :class:`ConfigError` for a key whose meaning parallel3d cannot reproduce.
    """
    return _Mapper(ds, base, dp_size).run()


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ConfigError(f"duplicate key {k!r} in the DeepSpeed config: keep one (DeepSpeed rejects it too)")
        out[k] = v
    return out


def load_deepspeed_json(path: str) -> dict:
    """Read a DeepSpeed JSON config; a clear :class:`ConfigError` for a missing file or bad JSON."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config file {path!r} does not exist: pass --deepspeed (or the YAML key "
                          f"deepspeed:) with the path of a DeepSpeed JSON file") from None
    except IsADirectoryError:
        raise ConfigError(f"DeepSpeed config path {path!r} is a directory: give the JSON file inside it") from None
    try:
        ds = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config file {path!r} is not valid JSON: {e.msg} at line {e.lineno} column "
                          f"{e.colno}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config file {path!r} must hold a JSON object, got {type(ds).__name__}")
    return ds


def resolve_path(path: str, relative_to: str | None = None) -> str:
    """A ``deepspeed:`` path from a YAML file is relative to that file's directory (if it exists there)."""
    if relative_to and not os.path.isabs(path):
        cand = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
        if os.path.exists(cand):
            return cand
    return path


def merge_tree(tree: dict, overrides: dict) -> dict:
    """A deep copy of ``tree`` with ``overrides`` merged in (nested dicts merge, values replace)."""
    out = copy.deepcopy(tree)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("kwargs",):
            out[k] = merge_tree(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def format_report(lines: list[str], source: str = "DeepSpeed config") -> str:
    return "\n".join([f"{source}: {sum(not l.startswith('ignored:') for l in lines)} mapped, "
                      f"{sum(l.startswith('ignored:') for l in lines)} ignored"] + [f"  {l}" for l in lines])


__all__ = ["map_deepspeed", "load_deepspeed_json", "merge_tree", "format_report", "resolve_path", "AUTO"]
