"""DeepSpeed's ``zero_optimization`` block → ``zero.*``: the stage, bucket sizes in MiB, and
``offload_optimizer`` / ``offload_param`` → ``zero.offload.*``.

Stage 3 (:func:`map_stage3`): DeepSpeed fetches up to ``stage3_prefetch_bucket_size`` parameter elements at once
and keeps a parameter gathered when it is reused within ``stage3_max_reuse_distance`` elements (DeepSpeedZeroConfig,
deepspeed/runtime/zero/config.py, DeepSpeed 0.19.8: "Maximum number of parameter elements to fetch ahead of use";
"Do not release a parameter if it will be reused within this threshold of parameters"; defaults 5e7 and 1e9, which
apply when the keys are absent). They map to ``zero.unit_mb`` (elements × bytes per element / 2**20: consecutive
units merged into one gather and one reduce-scatter) and ``zero.max_reuse_distance`` (the kept units:
parallel/zero/unit_life.py states the rule). An absent key does not override the YAML's ``zero.unit_mb`` /
``zero.max_reuse_distance`` / ``zero.keep_after_forward`` (as an absent ``gradient_clipping``): a model whose ZeRO-3
regions refuse merged units (parallel/zero/regions.py) can set ``zero.unit_mb: 0`` in its YAML. Below stage 3 the
prefetch bucket is ignored with a reason, as DeepSpeed accepts and ignores it there."""
from __future__ import annotations

import json

from parallel.config import deepspeed_keys as K
from parallel.config.deepspeed_mapper import AUTO, Mapper

__all__ = ["map_zero"]

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def map_zero(m: Mapper):
    z = m.ds.get("zero_optimization")
    if z is None:
        return
    if isinstance(z, bool):                                        # DeepSpeed's deprecated form
        m.set("zero_optimization", z, "zero.stage", 1 if z else 0)
        return
    if not isinstance(z, dict):
        m.fail("zero_optimization", f"expected a JSON object, got {json.dumps(z)}")
    mapped = {"stage", "reduce_bucket_size", "stage3_prefetch_bucket_size", "prefetch_bucket_size", STAGE3_REUSE,
              "offload_optimizer", "offload_param", "cpu_offload", "cpu_offload_param"}
    m.sub_keys(z, "zero_optimization", mapped, K.ZERO_IGNORED, K.ZERO_OFF_ONLY)
    stage = m.value(z, "stage", "zero.stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        m.fail("zero_optimization.stage", f"{json.dumps(stage)} must be 0, 1, 2 or 3 (there is no stage "
                                          f"above 3): set one of them")
    m.set("zero_optimization.stage", z.get("stage", "(unset: 0)"), "zero.stage", stage)
    elem = _DTYPE_BYTES[m.precision]
    sized(m, z, "zero_optimization", "reduce_bucket_size", "zero.bucket_mb", elem)
    for key in ("stage3_prefetch_bucket_size", "prefetch_bucket_size"):
        if key in z and stage != 3:                    # DeepSpeed reads it at stage 3 only, accepts it elsewhere
            m.ignore(f"zero_optimization.{key}", f"stage {stage}: parameters are not sharded, nothing is fetched")
        elif key in z:
            v = (m.native("zero.prefetch") if z[key] == AUTO
                 else m.number(f"zero_optimization.{key}", z[key]) > 0)
            m.set(f"zero_optimization.{key}", z[key], "zero.prefetch", v,
                  "from the native config" if z[key] == AUTO else "a positive size prefetches")
    map_stage3(m, z, stage, elem)
    map_offload(m, z, stage, elem)


STAGE3_REUSE = "stage3_max_reuse_distance"
DS_PREFETCH_DEFAULT, DS_REUSE_DEFAULT = 50_000_000, 1_000_000_000     # DeepSpeedZeroConfig's defaults (0.19.8)


def map_stage3(m: Mapper, z: dict, stage: int, elem: int):
    """The prefetch bucket → ``zero.unit_mb``, the reuse distance → ``zero.max_reuse_distance`` (stage 3 only)."""
    key = next((k for k in ("stage3_prefetch_bucket_size", "prefetch_bucket_size") if k in z), None)
    if stage != 3:
        if STAGE3_REUSE in z:
            m.ignore(f"zero_optimization.{STAGE3_REUSE}", f"stage {stage}: parameters are not sharded")
        return
    pre = "zero_optimization"
    native = m.base.get("zero") if isinstance(m.base.get("zero"), dict) else {}
    if key is None and "unit_mb" in native:    # an absent key does not override the YAML (as gradient_clipping)
        m.lines.append(f"{pre}.stage3_prefetch_bucket_size = (unset; DeepSpeed's default would be "
                       f"{DS_PREFETCH_DEFAULT:.0e}) -> zero.unit_mb = {json.dumps(native['unit_mb'])} {KEPT}")
    else:
        _unit_mb(m, z, key, elem)
    if STAGE3_REUSE not in z and ({"max_reuse_distance", "keep_after_forward"} & set(native)):
        ours = "max_reuse_distance" if "max_reuse_distance" in native else "keep_after_forward"
        m.lines.append(f"{pre}.{STAGE3_REUSE} = (unset; DeepSpeed's default would be {DS_REUSE_DEFAULT:.0e}) -> "
                       f"zero.{ours} = {json.dumps(native[ours])} {KEPT}")
        return
    v = z.get(STAGE3_REUSE, DS_REUSE_DEFAULT)
    shown = v if STAGE3_REUSE in z else f"(unset: DeepSpeed's default {DS_REUSE_DEFAULT:.0e})"
    d = m.native("zero.max_reuse_distance") if v == AUTO else m.number(f"{pre}.{STAGE3_REUSE}", v)
    if d is not None and not d >= 0:
        m.fail(f"{pre}.{STAGE3_REUSE}", f"{json.dumps(v)} must be >= 0 elements")
    m.set(f"{pre}.{STAGE3_REUSE}", shown, "zero.max_reuse_distance", d,
          "from the native config" if v == AUTO else "elements: units whose reuse distance 2 x (elements of the "
          "units freed after them in forward) is below it stay gathered into backward (parallel/zero/unit_life.py)")


KEPT = "kept (the YAML sets it)"


def _unit_mb(m: Mapper, z: dict, key, elem: int):
    pre = "zero_optimization"
    v = z[key] if key else DS_PREFETCH_DEFAULT
    shown = z[key] if key else f"(unset: DeepSpeed's default {DS_PREFETCH_DEFAULT:.0e})"
    mb = m.native("zero.unit_mb") if v == AUTO else m.number(f"{pre}.{key}", v) * elem / 2 ** 20
    if not mb >= 0:
        m.fail(f"{pre}.{key}", f"{json.dumps(v)} must be >= 0 elements")
    m.set(f"{pre}.{key or 'stage3_prefetch_bucket_size'}", shown, "zero.unit_mb", mb,
          "from the native config" if v == AUTO else f"elements x {elem} bytes ({m.precision}) / 2**20: consecutive "
          f"stage-3 units merged up to this size, one all-gather and one reduce-scatter each")


def sized(m: Mapper, block, pre, key, ours, elem):
    """A DeepSpeed size in elements → our MiB (elements × bytes per element / 2**20)."""
    if key in block:
        v = block[key]
        mb = m.native(ours) if v == AUTO else m.number(f"{pre}.{key}", v) * elem / 2 ** 20
        if not mb > 0:                                 # else the native check names zero.bucket_mb=-3.8e-06
            m.fail(f"{pre}.{key}", f"{json.dumps(v)} must be a positive number of elements")
        m.set(f"{pre}.{key}", v, ours, mb, "from the native config" if v == AUTO else
              f"elements x {elem} bytes ({m.precision}) / 2**20")


def map_offload(m: Mapper, z, stage, elem):
    legacy = {"offload_optimizer": "cpu_offload", "offload_param": "cpu_offload_param"}
    blocks, paths, counts = {}, {}, []
    for name, ours in (("offload_optimizer", "optimizer"), ("offload_param", "params")):
        pre, blk = f"zero_optimization.{name}", z.get(name)
        if blk is None and z.get(legacy[name]):
            blk = {"device": "cpu"}
            m.lines.append(f"zero_optimization.{legacy[name]} = true -> read as {name}.device = \"cpu\"")
        elif legacy[name] in z:
            m.ignore(f"zero_optimization.{legacy[name]}", f"{json.dumps(z[legacy[name]])}: no legacy offload")
        if blk is None:
            m.set(pre, "(unset)", f"zero.offload.{ours}", "none")
            continue
        if not isinstance(blk, dict):
            m.fail(pre, f"expected a JSON object, got {json.dumps(blk)}")
        blocks[name] = blk
        known = {"device", "nvme_path", "buffer_count"} | ({"buffer_size"} if name == "offload_param" else set())
        m.sub_keys(blk, pre, known, K.OFFLOAD_IGNORED)
        dev = m.value(blk, "device", f"zero.offload.{ours}", "none") or "none"
        if dev not in ("none", "cpu", "nvme"):
            m.fail(f"{pre}.device", f"{json.dumps(dev)} must be \"cpu\", \"nvme\" or \"none\"")
        if dev != "none" and name == "offload_param" and stage != 3:
            m.fail(f"{pre}.device", f"parameter offload needs ZeRO stage 3 (got stage {stage}), as in "
                                    f"DeepSpeed: set zero_optimization.stage to 3 or the device to \"none\"")
        if dev != "none" and stage == 0:
            m.fail(f"{pre}.device", "optimizer offload needs ZeRO stage 1, 2 or 3 (got 0): set "
                                    "zero_optimization.stage")
        m.set(f"{pre}.device", blk.get("device", "(unset)"), f"zero.offload.{ours}", dev)
        if dev == "nvme":
            path = m.value(blk, "nvme_path", "zero.offload.nvme_path")
            if not path and blk.get("nvme_path") == AUTO:
                m.fail(f"{pre}.nvme_path", "\"auto\" takes zero.offload.nvme_path from the YAML, which does not set "
                                           "it: give a directory on a local NVMe disk in either")
            if not path:
                m.fail(f"{pre}.nvme_path", "device is nvme but nvme_path is not set: give a directory on a "
                                           "local NVMe disk")
            if not isinstance(path, str):
                m.fail(f"{pre}.nvme_path", f"expected the path of a directory (a string), got {json.dumps(path)}")
            paths[f"{pre}.nvme_path"] = path
        elif "nvme_path" in blk:
            m.ignore(f"{pre}.nvme_path", f"device is {dev}")
        if "buffer_count" in blk:
            v = blk["buffer_count"]
            n = m.native("zero.offload.buffer_count") if v == AUTO else m.number(f"{pre}.buffer_count", v, (int,),
                                                                                   "an integer")
            if not n >= 1:
                m.fail(f"{pre}.buffer_count", f"{json.dumps(v)} must be 1 or more buffers")
            counts.append((f"{pre}.buffer_count", n))
    if len(set(paths.values())) > 1:
        m.fail(" and ".join(paths), f"differ ({' vs '.join(map(str, paths.values()))}); parallel3d has one "
                                    f"zero.offload.nvme_path: use one directory")
    for k, v in paths.items():
        m.set(k, v, "zero.offload.nvme_path", v)
    for k, v in counts:
        best = max(c for _, c in counts)
        if v == best:
            m.set(k, v, "zero.offload.buffer_count", v, "the larger of the two" if len(counts) > 1 else "")
        else:
            m.ignore(k, f"{v}: the larger count {best} is used for both")
    sized(m, blocks.get("offload_param", {}), "zero_optimization.offload_param", "buffer_size",
             "zero.offload.buffer_mb", elem)
