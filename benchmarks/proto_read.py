"""How benchmarks/proto_report.py reads calibration figures that only newer records have, each with the reading older
records keep (their fixtures, tests/data/bench_protocol*.json, are analysed as they were):

* the wait δ from interleaved repetitions (``wait.*``, benchmarks/proto_wait.py; since session 12):
  :func:`pair_latency`, :func:`ring_latencies`;
* gloo's bandwidth at DeepSpeed ZeRO-1/2's one flat message (``flat.gloo.*``, benchmarks/proto_calib.py; since
  session 12): :func:`flat_hardware`.

DeepSpeed ZeRO-1/2's communication is priced as the record counts it (every record): ONE gloo all-reduce of the whole
flat gradient after backward (wire 2(N−1)/N·Ψ·4: DeepSpeed's reduce_bucket_size, 5e8 elements, holds the whole
gradient, and on CPU/gloo it all-reduces it and keeps its partition) and ONE all-gather of the parameters
((N−1)/N·Ψ·4), both exposed whole — not our engine's 25 MB buckets of reduce-scatters (half the wire) that overlap
backward, as the planner priced the rows before session 12 (:func:`flat_bucket_mb`, :func:`flat_reduce_seconds`).
ds1 / ds2 planner ÷ measured at 50M: session 11 0.73 / 0.76 → 0.80 / 0.83, session 10 0.73 / 0.71 → 0.82 / 0.79,
session 8 0.68 / 0.67 → 0.77 / 0.76, session 7 0.65 / 0.69 → 0.75 / 0.79; at 5M within 0.03 of before (0.85–0.96).
What is left at 50M (≈ 300–350 ms of 1.7–1.8 s) fits gloo's all-gather at that message: 0.12 GB/s bus against 0.41 at
4 MiB (loaded, benchmarks/proto_calib.py's bw figures at both sizes on this session's machine), 3.4× the 180 ms the
4 MiB figure charges its 102 MB — which records since session 12 calibrate (``flat.gloo.*``). Since session 13 the
rest is priced from counts: DeepSpeed's own memory passes and the fresh pages of its per-step buffers (benchmarks/
proto_ds.py, called by proto_report.predict_row): session 11 50M ds1 / ds2 1.05 / 1.07, session 12 0.87 / 0.78.
"""
from __future__ import annotations

import dataclasses

from benchmarks.proto_rows import FLAT_ROWS
from parallel.planning.cost import seconds
from parallel.planning.spec import Hardware

__all__ = ["PAIR_ROBUST", "FAST", "pair_latency", "ring_latencies", "flat_hardware", "flat_bucket_mb",
           "flat_reduce_seconds"]

PAIR_ROBUST = "wait.ring.pair_s"  # the pair's median over interleaved repetitions (benchmarks/proto_wait.py)
FAST = ("wait.ring.rs_fast", "wait.ring.ag_fast")    # the isolated calls' fast mode, same repetitions


def pair_latency(cal: dict) -> float:
    """The tiny ring pair's time l_pair that δ = l_pair − l_rs − l_ag is read from: the median over the interleaved
    repetitions (:data:`PAIR_ROBUST`, calibrations since session 12; start and end averaged by proto_report.calib_mean)
    where the record has it, else the separately timed median ``lat.ring.all_reduce`` (the larger of start and
    end: records before session 12 keep their reading)."""
    return cal.get(PAIR_ROBUST, cal["lat.ring.all_reduce"])


def ring_latencies(cal: dict) -> tuple:
    """(l_rs, l_ag) of the ring's tiny isolated calls that δ is taken beyond and the planner charges each chained
    ring call (proto_report.hardware): their fast mode in the interleaved repetitions (:data:`FAST`, the lower decile)
    where the record has it, else the medians ``lat.ring.*`` (calib_mean: the smaller of start and end). With the
    new figures a chained reduce-scatter + all-gather is priced l_rs + δ/2 + l_ag + δ/2 = the pair's median, and a
    tp call or pipeline message the same δ, however the isolated calls' medians fell into their modes (0.2 or
    2–3.9 ms each on session 11's AMD machine: benchmarks/proto_wait.py)."""
    if all(k in cal for k in FAST):
        return cal[FAST[0]], cal[FAST[1]]
    return cal["lat.ring.reduce_scatter"], cal["lat.ring.all_gather"]


def flat_hardware(hw: Hardware, cal: dict, name: str) -> Hardware:
    """DeepSpeed ZeRO-1/2 (:data:`FLAT_ROWS`) all-reduce the whole flat gradient and all-gather the parameters in
    ONE gloo call each per step: their bandwidth at that message (``flat.gloo.*``, benchmarks/proto_calib.py)
    where the record has it; ``hw`` as it is for other rows and records before the figures (their 4 MiB ones)."""
    figs = {op: cal.get(f"flat.gloo.{op}") for op in ("all_reduce", "all_gather")}
    if name not in FLAT_ROWS or None in figs.values():
        return hw
    return dataclasses.replace(hw, op_bandwidth=tuple((op, figs.get(op, b)) for op, b in hw.op_bandwidth))


def flat_bucket_mb(name: str, psi: int, bucket_mb: float) -> float:
    """The planner's bucket size for row ``name``: one bucket over the whole gradient (``psi`` fp32 elements) for
    :data:`FLAT_ROWS`, else ``bucket_mb``."""
    return psi * 4 / 2 ** 20 + 1 if name in FLAT_ROWS else bucket_mb


def flat_reduce_seconds(meta: dict, name: str, pred, hw: Hardware) -> float:
    """Seconds to add to the planner's step of row ``name`` (record metadata ``meta``, the planner's :class:`Prediction`
    ``pred`` with one bucket): its counted all-reduce in place of the planned reduce-scatter, both exposed whole
    (the module docstring); 0 for other rows."""
    if name not in FLAT_ROWS:
        return 0.0
    reduce = [op for op in meta["comm"] if op != "all_gather"]
    if len(reduce) != 1 or reduce[0] not in ("all_reduce", "reduce_scatter") or "all_gather" not in meta["comm"] \
            or meta["comm"][reduce[0]]["calls"] != 1:
        raise ValueError(f"proto_read: row {name} counts {meta['comm']}, not one gradient reduction and one "
                         f"all-gather per step as DeepSpeed ZeRO-1/2 make: recount it (benchmarks/proto_profile.py) "
                         f"and price what it counts")
    planned = pred.comm[0]["dp"]["reduce_scatter"]
    if planned["calls"] != 1:
        raise ValueError(f"proto_read: the planner priced {name} with {planned['calls']} reduce-scatter buckets, not "
                         f"one: plan it with flat_bucket_mb")       # records of 2026-12-03 counted a reduce-scatter
    return seconds({reduce[0]: meta["comm"][reduce[0]]}, hw) - seconds({"reduce_scatter": planned}, hw)
