"""DeepSpeed's ``zero_optimization`` block → ``zero.*``: the stage, bucket sizes in MiB, and
``offload_optimizer`` / ``offload_param`` → ``zero.offload.*``."""
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
    mapped = {"stage", "reduce_bucket_size", "stage3_prefetch_bucket_size", "prefetch_bucket_size",
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
        if key in z:
            v = (m.native("zero.prefetch") if z[key] == AUTO
                 else m.number(f"zero_optimization.{key}", z[key]) > 0)
            m.set(f"zero_optimization.{key}", z[key], "zero.prefetch", v,
                  "from the native config" if z[key] == AUTO else "a positive size prefetches")
    map_offload(m, z, stage, elem)


def sized(m: Mapper, block, pre, key, ours, elem):
    """A DeepSpeed size in elements → our MiB (elements × bytes per element / 2**20)."""
    if key in block:
        v = block[key]
        mb = m.native(ours) if v == AUTO else m.number(f"{pre}.{key}", v) * elem / 2 ** 20
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
            if not path:
                m.fail(f"{pre}.nvme_path", "device is nvme but nvme_path is not set: give a directory on a "
                                           "local NVMe disk")
            paths[f"{pre}.nvme_path"] = path
        elif "nvme_path" in blk:
            m.ignore(f"{pre}.nvme_path", f"device is {dev}")
        if "buffer_count" in blk:
            v = blk["buffer_count"]
            counts.append((f"{pre}.buffer_count", m.native("zero.offload.buffer_count") if v == AUTO
                           else m.number(f"{pre}.buffer_count", v, (int,))))
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
