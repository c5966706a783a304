"""DeepSpeed's own per-step work, priced by benchmarks/proto_ds.py, on the recorded DeepSpeed protocol runs
(benchmarks/results/protocol_ds_2026-12-04_session1{1,2}.json, read as recorded) and against the counts of
benchmarks/proto_ds_bytes.py (benchmarks/results/ds_bytes_*_loaded_2026-12-04_session13.txt: fp32, N = 2).

Every ds row's planner ÷ measured in [0.85, 1.15] but :data:`KNOWN_GAPS`, asserted at its value with the reason:
* ds 50m part 1 of session 12, ds2 0.783 (0.63 before session 13): that record measured ds2 2.33 s, 190 ms SLOWER
  than ds1 (2.14 s), in every third round above 2.4 s, while DeepSpeed's counts give ZeRO-2 less work than ZeRO-1
  (202k fresh pages a step against 225k, the same passes) and session 11 measured ds2 70 ms faster than ds1. The
  priced terms (passes 114 ms + fresh pages 239 ms on that record) leave 507 ms of ds2 unpriced there against 275
  of ds1 and 278 of ds3 (session 11: all three over-priced by 90–120 ms): nothing counted accounts for ds2's
  difference, so it is not priced. (All three left ~370 ms more on session 12 than on session 11: a fresh page
  costing ~2.5 µs there instead of 1.6 would be it — records since session 13 calibrate ``fresh_page_s``.)
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FILES = [os.path.join(ROOT, "benchmarks", "results", f"protocol_ds_2026-12-04_session{s}.json") for s in (11, 12, 13)]
KNOWN_GAPS = {"session12/50m/ds2": 0.783}
PSI_50M, PSI_5M = 50_996_224, 4_886_528          # the GPT's Ψ at 50M and 5M (the records' local rows)


def _ratios() -> dict:
    from benchmarks.proto_report import calib_mean, predict_row
    got = {}
    for path in FILES:
        with open(path) as f:
            for rec in json.load(f)["records"]:
                cal = calib_mean(rec)
                for n in ("ds1", "ds2", "ds3"):
                    key = f"{os.path.basename(path)[-14:-5]}/{rec['size']}/{n}"
                    got[key] = predict_row(rec, n, cal).step_s / statistics.median(rec["times"][n])
    return got


def test_deepspeed_rows_within_15_percent_on_recorded_runs():
    """Sessions 11, 12 and 13, 5M and 50M: ds1/ds2/ds3 in [0.85, 1.15] (before session 13's pricing, 50M
    0.80/0.83/0.92 and 0.69/0.63/0.77; session 13's run, the first with ``fresh_page_s`` calibrated: 5M
    0.93/0.93/0.92, 50M 0.90/0.89/0.94 — 0.82/0.83/0.86 with the start/end mean of a fresh page, see
    test_fresh_page_takes_the_larger_reading)."""
    got = _ratios()
    assert len(got) == 18
    bad = {k: round(v, 3) for k, v in got.items() if not 0.85 <= v <= 1.15 and k not in KNOWN_GAPS}
    assert not bad, f"planner ÷ measured outside [0.85, 1.15]: {bad} (all: {got})"
    assert {k: got[k] for k in KNOWN_GAPS} == pytest.approx(KNOWN_GAPS, abs=2e-3)


def test_extra_passes_as_counted():
    """Bytes per owned element beyond what was priced, from the counted operator tables at N = 2 (module docstring of
    benchmarks/proto_ds.py): ZeRO-1/2 backward copy_ 48 − 24 priced + the all-reduce's flatten 24, step cat 12 +
    fp64 cast 20 + fp64 norm 8 − 4 priced + copy_ 12 = 96; ZeRO-3 132 (its counted copy back is onto itself);
    other world sizes are refused (not counted)."""
    from benchmarks.proto_ds import passes_bytes
    own = PSI_50M // 2
    assert passes_bytes("ds1", own, 2) == passes_bytes("ds2", own, 2) == (48 - 24 + 24 + 12 + 20 + 8 - 4 + 12) * own
    assert passes_bytes("ds3", own, 2) == (40 + (48 - 24) + 24 + (20 + 8 - 4) + 12 + 8) * own   # its copy_ 12: a no-op
    with pytest.raises(ValueError, match="counted at N = 2"):
        passes_bytes("ds2", own, 4)


def test_fresh_pages_match_the_counted_faults():
    """The fresh bytes the model gives ÷ 4 KiB against the page faults counted per step on rank 0 (session 13, see
    the results files; two runs at 50M): 50M ds1 225k / 230k (model 3.5 Ψ·4 + gloo's all-gather output Ψ·4 = 224k;
    the heap's state moves ±0.15 Ψ·4 between autograd's gradients and the step's flatten), ds2 202k / 200k (3 Ψ·4 +
    Ψ·4 = 199k), ds3 224k / 232k (4.5 Ψ·4 = 224k); 5M ds2 4,777 and ds3 4,783 (Ψ·4 = 4,772: the 2 GB bucket, gloo's
    reduce-scatter buffer), ds1 9,579 (model 4,772: its flatten below 32 MiB came fresh too, by the heap's state).
    With a ``flat.gloo.all_gather`` figure (it times that call, fresh output included) ZeRO-1/2 leave gloo's output
    out."""
    from benchmarks.proto_ds import PAGE, fresh_bytes
    counted = {("50m", "ds1"): (225_000, 229_988), ("50m", "ds2"): (202_000, 199_501),
               ("50m", "ds3"): (224_000, 231_685), ("5m", "ds1"): (9_579,), ("5m", "ds2"): (4_777,),
               ("5m", "ds3"): (4_783,)}
    for (size, n), runs in counted.items():
        psi = PSI_50M if size == "50m" else PSI_5M
        pages = fresh_bytes(n, psi, psi // 2, {}) / PAGE
        tol = 0.51 if (size, n) == ("5m", "ds1") else 0.04
        for faults in runs:
            assert pages == pytest.approx(faults, rel=tol), (size, n, pages, faults)
    flat = {"flat.gloo.all_gather": 1.0}
    assert fresh_bytes("ds2", PSI_50M, PSI_50M // 2, {}) - fresh_bytes("ds2", PSI_50M, PSI_50M // 2, flat) == \
        PSI_50M * 4
    assert fresh_bytes("ds3", PSI_50M, PSI_50M // 2, {}) == fresh_bytes("ds3", PSI_50M, PSI_50M // 2, flat)


def test_zero3_comm_as_counted():
    """DeepSpeed ZeRO-3 at these sizes: one all-gather of Ψ in prefetch buckets of 5e7 elements (2 calls at 50M, counted
    in forward only) and one reduce-scatter, wire (N−1)/N·Ψ·4 each; its priced step replaces the planner's per-module
    calls (199 all-gathers, twice the wire, + 99 reduce-scatters at 50M) by these."""
    from benchmarks.proto_ds import ds3_comm
    c = ds3_comm(PSI_50M, 2)
    assert c == {"all_gather": {"calls": 2, "wire_bytes": PSI_50M * 2.0},
                 "reduce_scatter": {"calls": 1, "wire_bytes": PSI_50M * 2.0}}
    assert ds3_comm(PSI_5M, 2)["all_gather"]["calls"] == 1


def test_fresh_page_figure_read_from_the_record_where_calibrated():
    """Records since session 13 carry ``fresh_page_s``; older ones take FRESH_PAGE_S, and the term scales with it."""
    from benchmarks.proto_ds import FRESH_PAGE_S, fresh_page_seconds
    from benchmarks.proto_report import calib_mean, hardware, predict_row
    with open(FILES[0]) as f:
        rec = next(r for r in json.load(f)["records"] if r["size"] == "50m")
    cal = calib_mean(rec)
    assert "fresh_page_s" not in cal and fresh_page_seconds(cal) == FRESH_PAGE_S
    from benchmarks.proto_ds import PAGE, fresh_bytes
    for n in ("ds1", "ds2", "ds3"):
        a = predict_row(rec, n, cal).step_s
        b = predict_row(rec, n, {**cal, "fresh_page_s": 2 * FRESH_PAGE_S}).step_s
        assert b - a == pytest.approx(fresh_bytes(n, PSI_50M, rec["rows"][n]["owned"], cal) / PAGE * FRESH_PAGE_S)
    assert hardware(cal).mem_bandwidth == cal["mem_bw"]


def test_fresh_page_takes_the_larger_reading():
    """Session 13's DS 50m part read a fresh page 0.028 µs at the start (the calibration's fresh buffer came back
    already mapped: a reading can only be low; the calibration maps anonymously since) and 1.77 µs at the end:
    proto_report.calib_mean takes the larger, which puts ds1/ds2/ds3 at 0.90/0.89/0.94 (the mean 0.82/0.83/0.86)."""
    from benchmarks.proto_report import calib_mean, predict_row
    with open(FILES[2]) as f:
        rec = next(r for r in json.load(f)["records"] if r["size"] == "50m")
    a, b = rec["calib_start"]["fresh_page_s"], rec["calib_end"]["fresh_page_s"]
    assert a < 0.1e-6 < 1.5e-6 < b
    cal = calib_mean(rec)
    assert cal["fresh_page_s"] == b
    mean = {**cal, "fresh_page_s": (a + b) / 2}
    larger = {n: predict_row(rec, n, cal).step_s / statistics.median(rec["times"][n]) for n in ("ds1", "ds2", "ds3")}
    meaned = {n: predict_row(rec, n, mean).step_s / statistics.median(rec["times"][n]) for n in larger}
    assert larger == pytest.approx({"ds1": 0.90, "ds2": 0.89, "ds3": 0.94}, abs=0.006)
    assert meaned == pytest.approx({"ds1": 0.82, "ds2": 0.83, "ds3": 0.86}, abs=0.006)
