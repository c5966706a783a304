"""Tiered tensor store (device / CPU / NVMe) with asynchronous IO and prefetch; ZeRO never sees the medium.

    store = make_store("nvme", cfg.zero.offload, name=f"optim-rank{rank}.bin")
    store.reserve(total_state_bytes)                        # fail before training, not mid-run
    h = store.put("p0", t); store.prefetch(["p1"]); x = store.get("p1"); store.release("p1")
    stream_update(store, [("p0", "m0", "v0"), ...], fn, buffers=4, prefetch_depth=1)
    store.begin(); ...puts...; store.prepare(); store.commit()   # or abort(): all-or-nothing (NVMe)

ZeRO puts its partition here (parallel/zero/offload.py: the streamed CPU Adam step over sub-groups;
parallel/zero/param_offload.py: stage-3 parameter shards fetched per unit); parallel/zero/inference.py
streams whole models.
"""
from __future__ import annotations

from parallel.offload.cpu_adam import AdamWKernel, cpu_adamw_candidates, fastest_cpu_adamw
from parallel.offload.errors import BuffersExhaustedError, StoreConfigError, StoreError, StoreFullError
from parallel.offload.nvme import NvmeStore
from parallel.offload.store import DONE, CpuStore, DeviceStore, Handle, StoreStats, TensorMeta, TensorStore
from parallel.offload.stream import StreamStats, stream_read, stream_update

__all__ = [
    "TensorStore", "DeviceStore", "CpuStore", "NvmeStore", "Handle", "DONE", "StoreStats", "TensorMeta",
    "StoreError", "StoreConfigError", "StoreFullError", "BuffersExhaustedError", "stream_update", "stream_read",
    "StreamStats",
    "AdamWKernel", "cpu_adamw_candidates", "fastest_cpu_adamw", "make_store",
]


def make_store(medium: str, offload=None, name: str | None = None) -> TensorStore:
    """The store for ``medium`` ∈ {none, device, cpu, nvme}, sized from an ``OffloadConfig``
    (``nvme_path``, ``buffer_count``, ``buffer_mb``). ``name`` names the file on NVMe; give each rank
    its own (e.g. f"optim-rank{rank}.bin")."""
    if medium in ("none", "device"):
        return DeviceStore()
    if medium == "cpu":
        return CpuStore()
    if medium == "nvme":                                  # fields of an OffloadConfig, its defaults when absent
        return NvmeStore(getattr(offload, "nvme_path", None), buffer_count=getattr(offload, "buffer_count", 4),
                         buffer_bytes=int(getattr(offload, "buffer_mb", 64.0) * 2**20), name=name)  # checks the path
    raise StoreConfigError(f"unknown offload medium {medium!r}; use one of none, cpu, nvme")
