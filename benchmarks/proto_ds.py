"""What DeepSpeed's CPU engine does per step beyond what the planner prices for it (issue 18, the ds1/ds2/ds3 rows of
benchmarks/protocol.py): its own memory passes and the fresh pages its per-step buffers take from the OS, read from
DeepSpeed 0.19.8's source and checked against counts (benchmarks/proto_ds_bytes.py: bytes every aten operator moves,
page faults inside each; fp32, N = 2 ranks, 5M and 50M, one step of rank 0).

Already priced for these rows (benchmarks/proto_rows.UPDATE_MOVED, proto_read.py): DeepSpeedCPUAdam's fused pass (28 B
per owned element) + a 4 B norm, the copy of each gradient into the reduction bucket (12 B per gradient element) and
its division (8), the counted collectives (ZeRO-1/2: one gloo all-reduce of the flat gradient + one all-gather).
Counted at N = 2 beyond that (B per owned element, Ψ/N; :data:`PASSES`), all in runtime/zero/:

ZeRO-1/2 (stage_1_and_2.py), 96 B: ``allreduce_bucket`` flattens the whole bucket (``self.flatten``: a torch.cat into a
new tensor, 12 B per Ψ = 24); ``allreduce_and_copy_with_multiple_ranks`` copies the reduced own slices back into the
bucket (``buf.copy_(synced)``, 12) and ``copy_grads_in_partition`` copies them again into ``grads_in_partition`` (12);
``get_grad_norm_direct`` casts every owned gradient to fp64 first (``g.to(get_norm_dtype())``: read 4, write 8 +
8 write-allocate = 20, then the norm reads 8: 28 where 4 is priced, +24); ``step`` flattens the averaged gradients
into ``single_grad_partition`` (12) and copies the updated fp32 partition into the model's partition
(``bit16_partitions[partition_id].data.copy_``, 12). Counted: backward copy_ 48 and cat 24 (+ the model's own 3–6),
step cat 12, _to_copy 20, linalg_vector_norm 8, copy_ 12, at both sizes, ZeRO-1 and ZeRO-2 alike.
ZeRO-3 (stage3.py, partition_parameters.py), 132 B: the forward gather copies the own partitions into the gather
buffer (partition_parameters.py, ``_convert_to_deepspeed_param``'s ``_all_gather_dtype``: ``torch.cat(…,
out=partitions[rank])``, 12) and reassembles each parameter from the gathered partitions
(``AllGatherCoalescedHandle.wait``: ``param.data = torch.cat(partitions)``, 12 per Ψ; cat 40 counted in all);
``reduce_scatter_coalesced`` (runtime/comm/coalesced_collectives.py) interleaves the bucket's partitions with a
torch.cat (24) and ``partition_grads`` copies the reduced partition into the fp32 gradient buffer (copy_ 48 counted,
24 of it the bucket copy already priced); the step's fp64 norm (+24), ``_prepare_fp32_grad_for_sub_group``'s flatten
(12) and ``unscale_and_clip_grads``' mul_ (8, it runs at scale 1). The step's copy back to the "fp16" partition
(``_reassign_or_swap_out_partitioned_parameters``: copy_ 12 counted) moves nothing in fp32: that partition IS the
fp32 one (``_create_fp32_partitions`` aliases them when the dtypes agree) and copy_ of a tensor onto itself returns
at once. (ZeRO-1/2's ``single_partition_of_fp32_groups`` is a clone: its copy back is real.)

Fresh pages (:data:`FRESH`, bytes of per-step buffers whose pages the kernel maps and zeroes anew each step). glibc
serves a request of at least its largest dynamic mmap threshold (32 MiB: DEFAULT_MMAP_THRESHOLD_MAX on 64-bit) with a
fresh mmap and unmaps it on free; smaller ones come back from the heap. Per step: ZeRO-1/2's bucket
(``setup_buckets``: torch.empty(reduce_bucket_size = 5e8 elements), 2 GB, released in ``_release_ipg_buffers``: the
Ψ·4 bytes the gradients are copied into, at every size), the flatten for the all-reduce (Ψ·4), ``grads_in_partition``
(Ψ/N·4) and ZeRO-2's step flatten (Ψ/N·4) — ZeRO-1 instead keeps all of autograd's gradients alive until
``reduce_gradients`` after backward (Ψ·4 of heap grown anew, counted 47k / 30k faults in two runs, its step flatten
reusing that heap or not: 0 / 25k — the heap's state moves ±0.15 Ψ·4 between the two);
gloo's all-gather takes Ψ·4 bytes of fresh pages inside the call (counted outside aten operators, while the
call waits: a flat output gloo copies through) —
priced here only where the record has no ``flat.gloo.all_gather`` figure, which times exactly that call (its fresh
output included). ZeRO-3: the gather buffer (torch.empty(Ψ)) and gloo's all-gather output (Ψ·4 each), the
reduce-scatter's interleaving cat (Ψ·4), gloo's reduce-scatter buffer (Ψ·4, counted fresh at 5M too) and the step's
flatten (Ψ/N·4). Counted page faults per step at 50M (Ψ·4 = 49,802 pages): ds1 225k (4.5 Ψ), ds2 202k (4 Ψ), ds3 224k
(4.5 Ψ); at 5M (Ψ·4 = 4,772 pages): ds1 9,579, ds2 4,777, ds3 4,783. Each fresh page costs :data:`FRESH_PAGE_S`
(the trap, the kernel zeroing 4 KiB, the TLB fill) — priced from the record's ``fresh_page_s`` (benchmarks/
proto_calib.py since session 13: :func:`fresh_page_seconds`), else that default.

ZeRO-3's communication is priced as counted (:func:`ds3_comm`): DeepSpeed keeps every parameter gathered below
``stage3_max_reuse_distance`` (1e9 elements) and gathers in prefetch buckets of 5e7 elements, so ONE all-gather of Ψ
per step (2 calls at 50M, in forward; none in backward) and ONE reduce-scatter (reduce_bucket_size 5e8 holds the whole
gradient) — not the planner's per-module gathers in forward and again in backward (199 + 99 calls, twice the gather
wire at 50M), which the record's theory line (proto_rows._deepspeed: 2 gathers) also assumed. Not priced: ZeRO-3's
per-module hooks (Python, per submodule: fetch, release, pre-/post-backward), which no calibrated figure times —
23–30 ms of ds3's 5M step is left on every DS record (benchmarks/README.md).
"""
from __future__ import annotations

import mmap
import time

import torch

from parallel.planning.cost import seconds
from parallel.planning.time_terms import memory_seconds

__all__ = ["PASSES", "FRESH", "FRESH_PAGE_S", "MMAP_MIN", "PAGE", "passes_bytes", "fresh_bytes",
           "fresh_page_seconds", "ds3_comm", "ds_seconds", "calibrate_fresh_page"]

PAGE = 4096
MMAP_MIN = 32 * 2 ** 20          # glibc's DEFAULT_MMAP_THRESHOLD_MAX (64-bit): at least this is always a fresh mmap
# seconds per fresh 4 KiB page (CPU, user + system) for records without ``fresh_page_s``: a copy into a fresh
# torch.empty of 204 MB minus the same copy into a touched buffer, 6 repetitions, two processes at once pinned one
# core each, AMD EPYC (the machine of sessions 10–12), 2026-12-04 21:52 UTC, loaded (load average 6–8): 1.60 and
# 1.65 µs per page (49,805 faults each); wall, the fastest of 12: 1.84 µs; calibrate_fresh_page (wall, the fastest of
# 7, 64 MiB) read 1.82 / 1.91 / 2.77 µs there. The CPU figure is taken: it holds under load, the wall ones do not
FRESH_PAGE_S = 1.6e-6
# bytes moved per owned element (N = 2) beyond what is priced, by stage: (what, DeepSpeed function, bytes)
PASSES = {
    1: (("flatten of the bucket for the all-reduce (12 B per Ψ)", "stage_1_and_2.allreduce_bucket", 24),
        ("reduced own slices copied back into the bucket", "allreduce_and_copy_with_multiple_ranks", 12),
        ("own gradients copied into grads_in_partition", "copy_grads_in_partition", 12),
        ("fp64 cast before the norm (20) and the fp64 norm (8) where 4 is priced", "get_grad_norm_direct", 24),
        ("flatten of the averaged gradients for the update", "step: single_grad_partition", 12),
        ("updated fp32 partition copied into the model's partition", "step: bit16_partitions copy_", 12)),
    3: (("own partitions into the gather buffer + parameters reassembled",
         "partition_parameters._all_gather_dtype + AllGatherCoalescedHandle.wait", 40),
        ("interleaving cat of the reduce-scatter (12 B per Ψ)", "coalesced_collectives.reduce_scatter_coalesced", 24),
        ("reduced partition copied into the fp32 gradient buffer (+ one more owned copy, counted)",
         "stage3.partition_grads", 24),
        ("fp64 cast before the norm and the fp64 norm where 4 is priced", "stage3.get_grad_norm_direct", 24),
        ("flatten of the averaged gradients for the update", "_prepare_fp32_grad_for_sub_group", 12),
        ("scale of the fp32 gradient (at 1)", "unscale_and_clip_grads", 8)),
}
PASSES[2] = PASSES[1]
# per-step buffers whose pages are fresh: (what, elements as (per Ψ, per owned), fresh at any size?)
FRESH = {
    1: (("reduction bucket (torch.empty of 5e8 elements)", (1, 0), True), ("flatten for the all-reduce", (1, 0), False),
        ("grads_in_partition", (0, 1), False),
        ("autograd's gradients, all alive until reduce_gradients", (1, 0), False)),
    2: (("reduction bucket (torch.empty of 5e8 elements)", (1, 0), True), ("flatten for the all-reduce", (1, 0), False),
        ("grads_in_partition", (0, 1), False), ("flatten for the update", (0, 1), False)),
    3: (("gather buffer", (1, 0), False), ("gloo's all-gather output", (1, 0), False),
        ("interleaving cat of the reduce-scatter", (1, 0), False), ("gloo's reduce-scatter buffer", (1, 0), True),
        ("flatten for the update", (0, 1), False)),
}
GLOO_AG = ("gloo's all-gather output", (1, 0), False)      # ZeRO-1/2: only without a flat.gloo.all_gather figure


def _stage(name: str) -> int:
    return int(name[-1])


def passes_bytes(name: str, owned: int, world: int) -> float:
    """Bytes DeepSpeed row ``name`` moves per step beyond what is priced (:data:`PASSES`, counted at N = 2)."""
    if world != 2:
        raise ValueError(f"proto_ds: DeepSpeed's extra passes are counted at N = 2 ranks "
                         f"(benchmarks/proto_ds_bytes.py), not {world}: count them at that size first")
    return owned * sum(b for _, _, b in PASSES[_stage(name)])


def fresh_bytes(name: str, psi: int, owned: int, cal: dict) -> float:
    """Bytes of per-step buffers of row ``name`` the kernel maps anew (:data:`FRESH`): a buffer counts when it is
    fresh at any size or at least :data:`MMAP_MIN`."""
    items = FRESH[_stage(name)] + ((GLOO_AG,) if _stage(name) < 3 and "flat.gloo.all_gather" not in cal else ())
    out = 0.0
    for _, (a, b), always in items:
        size = (a * psi + b * owned) * 4
        out += size if always or size >= MMAP_MIN else 0.0
    return out


def fresh_page_seconds(cal: dict) -> float:
    """Seconds per fresh page: the record's ``fresh_page_s`` where calibrated, else :data:`FRESH_PAGE_S`."""
    return cal.get("fresh_page_s", FRESH_PAGE_S)


def ds3_comm(psi: int, world: int) -> dict:
    """DeepSpeed ZeRO-3's collectives per step as counted at these sizes (module docstring): one all-gather of Ψ
    (in prefetch buckets of 5e7 elements) and one reduce-scatter of Ψ, fp32."""
    wire = (world - 1) / world * psi * 4
    return {"all_gather": {"calls": max(1, -(-psi // 50_000_000)), "wire_bytes": wire},
            "reduce_scatter": {"calls": 1, "wire_bytes": wire}}


def ds_seconds(name: str, psi: int, owned: int, world: int, pred, hw, cal: dict) -> dict:
    """Seconds to add to the planner's step of DeepSpeed row ``name``, by term: its extra memory passes at the
    calibrated memory bandwidth, its fresh pages at :func:`fresh_page_seconds`, and for ZeRO-3 its counted
    collectives in place of the planned ones (both exposed whole: a stage-3 step on one core)."""
    out = {"passes": memory_seconds(passes_bytes(name, owned, world), hw),
           "fresh pages": fresh_bytes(name, psi, owned, cal) / PAGE * fresh_page_seconds(cal)}
    if _stage(name) == 3:
        out["comm as counted"] = seconds(ds3_comm(psi, world), hw) - seconds(pred.comm[0]["dp"], hw)
    return out


def calibrate_fresh_page(mb: int = 64, reps: int = 7) -> float:
    """``fresh_page_s``: seconds per fresh 4 KiB page — a copy of ``mb`` MiB into a fresh anonymous mapping (mmap:
    every page faults on first touch, as glibc's fresh mmap of a buffer ≥ :data:`MMAP_MIN` does; a torch.empty here
    could come back already mapped — session 13's DS 50m start read 0.028 µs a page) minus the same copy into a
    touched buffer, the fastest of ``reps`` each (interference only adds: a loaded core read 17 µs a page from
    medians where the fastest gave 1.8), per page."""
    n = mb * 2 ** 20 // 4
    src, warm = torch.ones(n), torch.empty(n)
    warm.copy_(src)

    def fresh_copy():
        m = mmap.mmap(-1, n * 4)
        t = torch.frombuffer(m, dtype=torch.float32)
        t0 = time.perf_counter()
        t.copy_(src)
        dt = time.perf_counter() - t0
        del t
        m.close()
        return dt

    def timed_warm():
        t0 = time.perf_counter()
        warm.copy_(src)
        return time.perf_counter() - t0
    fresh = min(fresh_copy() for _ in range(reps))
    return max(0.0, fresh - min(timed_warm() for _ in range(reps))) / (n * 4 / PAGE)
