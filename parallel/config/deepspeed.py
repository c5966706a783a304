"""Reading DeepSpeed JSON configs: what each key means in parallel3d's config tree.

    ds = load_deepspeed_json("configs/deepspeed/zero2.json")
    overrides, report = map_deepspeed(ds, base=yaml_tree, dp_size=2)
    tree = merge_tree(yaml_tree, overrides)          # DeepSpeed's values replace the YAML's
    print(format_report(report))

Rules (https://www.deepspeed.ai/docs/config-json/):
- Only what the file states is mapped; a block that is present maps its meaning-bearing keys with
  DeepSpeed's defaults (e.g. an ``optimizer`` block without ``weight_decay`` means FusedAdam's 0.0).
  One top-level default changes the math and is applied when the key is absent: ``gradient_clipping``
  (1.0 in current DeepSpeed, 0 = off up to 0.19.1; the installed DeepSpeed's value wins, see
  :mod:`.deepspeed_defaults`) — unless the YAML sets ``train.grad_clip`` itself; the report says which.
- ``"auto"`` (the Hugging Face convention) takes the native value from ``base``, else our default.
- Batch: train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps × dp, the
  missing one derived as DeepSpeed derives it; an inconsistent triple is an error.
- A key that only tunes speed or logging is ignored with one report line saying why; a key whose
  meaning parallel3d cannot reproduce (other optimizers, both fp16 and bf16, quantized ZeRO, …) is a
  :class:`ConfigError` naming the key and the fix; an unknown key is an error too.
- DeepSpeed's optimizer ``"Adam"`` is AdamW unless ``adam_w_mode: false`` (``"AdamW"`` always is);
  FusedAdam and DeepSpeedCPUAdam default ``weight_decay`` to 0.0, torch's AdamW to 0.01.
- Schedulers map onto :mod:`parallel.optim.factory.lr_schedule` with ``convention: deepspeed`` (its exact formulas).
- Sections: precision, batch, clipping and feature flags here; :mod:`.deepspeed_optim` (optimizer,
  scheduler), :mod:`.deepspeed_zero` (ZeRO and offload), on the helpers of :mod:`.deepspeed_mapper`.
"""
from __future__ import annotations

import copy
import json
import os
import re

from parallel.config import deepspeed_keys as K
from parallel.config.deepspeed_activation import map_activation_checkpointing
from parallel.config.deepspeed_defaults import clip_default
from parallel.config.deepspeed_mapper import AUTO, Mapper
from parallel.config.deepspeed_optim import map_optimizer, map_pld, map_scheduler
from parallel.config.deepspeed_zero import KEPT, map_zero
from parallel.config.errors import ConfigError


def _run(m: Mapper):
    """Every section, then every other top-level key: ignored, accepted when off, a feature flag, or an error."""
    handled = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "fp16",
               "bf16", "bfloat16", "gradient_clipping", "optimizer", "scheduler", "zero_optimization",
               "activation_checkpointing", "progressive_layer_drop"}
    map_precision(m)
    map_batch(m)
    map_clipping(m)
    map_optimizer(m)
    map_scheduler(m)
    map_zero(m)
    map_activation_checkpointing(m)
    map_pld(m)
    for k, v in m.ds.items():
        if k in handled:
            continue
        if k in K.IGNORED:
            m.ignore(k, K.IGNORED[k])
        elif k in K.OFF_ONLY:
            m.off_only(k, v, *K.OFF_ONLY[k])
        elif k in K.FEATURES or k in K.PRESENT_MEANS_ON:
            map_feature(m, k, v)
        elif k == "data_types":
            map_data_types(m, v)
        else:
            m.fail(k, "unknown DeepSpeed key; parallel3d does not know what it means: remove it or fix the "
                      "spelling (see https://www.deepspeed.ai/docs/config-json/)")
    return m.out, m.lines


def map_feature(m: Mapper, k, v):
    if k in K.PRESENT_MEANS_ON:
        on = True
    elif k == "tensor_parallel":
        on = isinstance(v, dict) and v.get("autotp_size", 1) not in (0, 1, AUTO)
    else:
        on = v.get("enabled", False) if isinstance(v, dict) else v
        if isinstance(v, dict) and not isinstance(on, bool) and on not in (None, AUTO):
            m.fail(f"{k}.enabled", f"expected true or false, got {json.dumps(on)}: write it without quotes")
        on = on not in (False, None, AUTO)
    if not on:
        m.ignore(k, "disabled")
        return
    fix = "use parallel.tp instead" if k == "tensor_parallel" else "remove the block (or set enabled: false)"
    m.fail(k, f"DeepSpeed's {k} changes the model, the data or the math, and parallel3d does not have it: {fix}")


def map_data_types(m: Mapper, v):
    if not isinstance(v, dict):
        m.fail("data_types", f"expected a JSON object, got {json.dumps(v)}")
    for k, val in v.items():
        allowed = (None, "fp32", "float32", "float") if k == "grad_accum_dtype" else (None,)
        m.off_only(f"data_types.{k}", val, allowed, "parallel3d accumulates gradients in fp32 and casts "
                                                    "parameters as `precision` says: remove the key")


def map_precision(m: Mapper):
    if "bf16" in m.ds and "bfloat16" in m.ds:
        m.fail("bfloat16", "both bf16 and its old name bfloat16 are given: keep only bf16")
    bname = "bfloat16" if "bfloat16" in m.ds else "bf16"
    fp16, bf16 = m.block("fp16"), m.block(bname)
    if fp16 is None and bf16 is None:
        return                                    # the native precision stays

    def enabled(blk, which):
        v = (blk or {}).get("enabled", False)
        if v == AUTO:
            return m.native("precision") == which
        if not isinstance(v, bool):     # bool("false") is True: a quoted "false" would turn the precision on
            m.fail(f"{which if which == 'fp16' else bname}.enabled",
                   f"expected true, false or \"auto\", got {json.dumps(v)}: write it without quotes")
        return v
    f_on, b_on = enabled(fp16, "fp16"), enabled(bf16, "bf16")
    if f_on and b_on:
        m.fail("fp16.enabled and bf16.enabled", "both are on; a run has one precision: enable only one")
    m.precision = "fp16" if f_on else "bf16" if b_on else "fp32"
    src = "fp16" if f_on or (not b_on and fp16 is not None) else bname
    m.set(f"{src}.enabled", (fp16 if src == "fp16" else bf16).get("enabled", False), "precision", m.precision)
    if bf16 is not None:
        if src != bname:
            m.ignore(f"{bname}.enabled", f"{json.dumps(bf16.get('enabled', False))}: bf16 is off")
        m.sub_keys(bf16, bname, {"enabled"}, {"immediate_grad_update": K.PERF}, K.BF16_OFF_ONLY)
    if fp16 is not None:
        map_fp16(m, fp16, f_on, src)


def map_fp16(m: Mapper, fp16, on, src):
    if src != "fp16":
        m.ignore("fp16.enabled", f"{json.dumps(fp16.get('enabled', False))}: fp16 is off")
    scale_keys = ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale",
                  "consecutive_hysteresis")
    m.sub_keys(fp16, "fp16", {"enabled", *scale_keys}, None, K.FP16_OFF_ONLY)
    if not on:
        for k in scale_keys:
            if k in fp16:
                m.ignore(f"fp16.{k}", "fp16 is off")
        return
    raw = fp16.get("loss_scale", "(unset: 0)")
    static = m.value(fp16, "loss_scale", "loss_scale.static", 0) or 0
    if m.number("fp16.loss_scale", static) < 0:
        m.fail("fp16.loss_scale", f"{static} must be 0 (dynamic) or a positive static scale")
    m.set("fp16.loss_scale", raw, "loss_scale.static", float(static) if static else None,
          "static scale" if static else "0 means dynamic scaling")
    power = fp16.get("initial_scale_power", 16)
    initial = m.native("loss_scale.initial") if power == AUTO else float(2 ** m.number(
        "fp16.initial_scale_power", power, (int,), "an integer"))
    m.set("fp16.initial_scale_power", fp16.get("initial_scale_power", "(unset: 16)"), "loss_scale.initial",
          initial, "2**power")
    for k, ours, d, cast in (("loss_scale_window", "loss_scale.growth_interval", 1000, int),
                             ("hysteresis", "loss_scale.hysteresis", 2, int),
                             ("min_loss_scale", "loss_scale.min", 1, float)):
        v = m.number(f"fp16.{k}", m.value(fp16, k, ours, d))
        m.set(f"fp16.{k}", fp16.get(k, f"(unset: {d})"), ours, cast(v))
    ch = m.value(fp16, "consecutive_hysteresis", "loss_scale.consecutive_hysteresis", False)
    if not isinstance(ch, bool):
        m.fail("fp16.consecutive_hysteresis", f"expected true or false, got {json.dumps(ch)}")
    m.set("fp16.consecutive_hysteresis", fp16.get("consecutive_hysteresis", "(unset: false)"),
          "loss_scale.consecutive_hysteresis", ch)


def map_batch(m: Mapper):
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    if not any(k in m.ds for k in keys):
        return
    dp = m.dp
    n_tbs, n_mbs = m.native("data.global_batch_size"), m.native("data.micro_batch_size")
    n_gas = n_tbs // (dp * n_mbs) if n_tbs % (dp * n_mbs) == 0 else None
    tbs, mbs, gas = (m.ds.get(k) for k in keys)
    tbs, mbs, gas = (n if v == AUTO else v for v, n in ((tbs, n_tbs), (mbs, n_mbs), (gas, n_gas)))
    for k, v in zip(keys, (tbs, mbs, gas)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            m.fail(k, f"{json.dumps(m.ds.get(k))} must be a positive integer")
    if tbs is None and mbs is None:
        m.fail("train_batch_size", "neither train_batch_size nor train_micro_batch_size_per_gpu is given "
                                   "(DeepSpeed needs one of them): add one")
    if gas is None:                                # DeepSpeed's _set_batch_related_parameters
        gas = 1 if tbs is None or mbs is None else tbs // mbs // dp
    if mbs is None:
        mbs = tbs // dp // gas
    if tbs is None:
        tbs = mbs * gas * dp
    if mbs < 1 or gas < 1 or tbs != mbs * gas * dp:
        m.fail("train_batch_size", f"train_batch_size={tbs} must equal train_micro_batch_size_per_gpu={mbs} "
                                   f"x gradient_accumulation_steps={gas} x dp={dp} (= {mbs * gas * dp}): "
                                   f"fix one of the three numbers")
    for k, ours, v in ((keys[0], "data.global_batch_size", tbs), (keys[1], "data.micro_batch_size", mbs)):
        m.set(k, m.ds.get(k, "(derived)"), ours, v)
    shown = json.dumps(m.ds[keys[2]]) if keys[2] in m.ds else "(derived)"
    m.lines.append(f"{keys[2]} = {shown} -> {gas} micro-batches "
                   f"per dp rank per step (data.global_batch_size / (parallel.dp x data.micro_batch_size))")


def map_clipping(m: Mapper):
    if "gradient_clipping" not in m.ds:
        map_clipping_default(m)
        return
    raw = m.ds["gradient_clipping"]
    v = m.native("train.grad_clip") if raw == AUTO else raw
    if v is not None and m.number("gradient_clipping", v) < 0:
        m.fail("gradient_clipping", f"{v} must be 0 (off) or a positive max gradient norm")
    m.set("gradient_clipping", raw, "train.grad_clip", float(v) if v else None,
          "max global L2 norm" if v else "0 means no clipping")


ONEBIT_TYPES = ("onebitadam", "zerooneadam", "onebitlamb")


def map_clipping_default(m: Mapper):
    """No ``gradient_clipping`` key: DeepSpeed's default applies (version-dependent, see
    :mod:`.deepspeed_defaults`), unless the native YAML (or a CLI override) sets ``train.grad_clip`` itself."""
    value, why = clip_default()
    meaning = f"max global L2 norm {value:g}" if value else "no clipping"
    train = m.base.get("train") if isinstance(m.base.get("train"), dict) else {}
    if "grad_clip" in train:
        m.lines.append(f"gradient_clipping = (unset; DeepSpeed's default would be {value:g}: {meaning}, from {why}) "
                       f"-> train.grad_clip = {json.dumps(train['grad_clip'])} kept (the YAML sets it)")
        return
    opt = m.ds.get("optimizer") if isinstance(m.ds.get("optimizer"), dict) else {}
    if value and str(opt.get("type", "")).lower() in ONEBIT_TYPES:
        m.lines.append(f"gradient_clipping = (unset; DeepSpeed's default would be {value:g}, from {why}) -> NOT "
                       f"applied: {opt['type']} keeps each rank's own gradient after warm-up, so there is no global "
                       f"norm to clip by (DeepSpeed would clip each rank's local gradient: a different update); "
                       f"write \"gradient_clipping\": 0.0 to state that")
        return
    other = "no clipping" if value else "clipping"
    m.set("gradient_clipping", f"(unset: DeepSpeed's default {value:g}, from {why})", "train.grad_clip",
          float(value) if value else None, f"{meaning}; for {other} write \"gradient_clipping\": "
                                           f"{'0.0' if value else 'X'} in the JSON, or set train.grad_clip in the YAML "
                                           f"({'null' if value else 'X'})")


def map_deepspeed(ds: dict, base: dict | None = None, dp_size: int = 1) -> tuple[dict, list[str]]:
    """Map a DeepSpeed config onto parallel3d's config tree.

    ``base`` is the native YAML tree (plain dict, CLI overrides applied) that ``"auto"`` values read;
    ``dp_size`` is parallel.dp (DeepSpeed's data-parallel world size). Returns the nested overrides
    to merge into the YAML tree (:func:`merge_tree`) and one report line per mapped or ignored key.
    Raises :class:`ConfigError` for a key whose meaning parallel3d cannot reproduce.
    """
    return _run(Mapper(ds, base, dp_size))


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


_MAPPED = re.compile(r"^(\S+) = (.*?) -> ([A-Za-z_][\w.]*) = ")


def deepspeed_hint(message: str, lines: list[str]) -> str:
    """For an error raised after the mapping (validation, pre-flight, training) whose ``message`` names native keys
    (``zero.unit_mb``): which DeepSpeed keys set them, per the mapping's report ``lines``; "" when none did. The
    mapping is merged over the YAML, so a YAML value for such a key is overridden by the JSON: the fix goes into
    the JSON (or on the command line, where overrides win)."""
    found: dict = {}
    for line in lines:
        hit = _MAPPED.match(line)
        named = hit and re.search(r"(?<![\w.])" + re.escape(hit.group(3)) + r"(?![\w])", message)
        if named and not line.endswith(KEPT):
            found.setdefault(hit.group(3), []).append(f"{hit.group(1)} = {hit.group(2)}")
    return "".join(f"\n  ({ours} came from the DeepSpeed config: {' and '.join(src)}; change "
                   f"{' / '.join(x.split(' = ')[0] for x in src)} in the JSON, since a YAML {ours} is overridden by "
                   f"it, or pass {ours}=... on the command line)" for ours, src in found.items())


def format_report(lines: list[str], source: str = "DeepSpeed config") -> str:
    return "\n".join([f"{source}: {sum(not l.startswith('ignored:') for l in lines)} mapped, "
                      f"{sum(l.startswith('ignored:') for l in lines)} ignored"] + [f"  {l}" for l in lines])


__all__ = ["map_deepspeed", "load_deepspeed_json", "merge_tree", "format_report", "resolve_path", "AUTO",
           "deepspeed_hint"]
