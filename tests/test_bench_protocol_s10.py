"""The planner's time model on the second machine: session 10's idle protocol runs on the AMD EPYC machine
(tests/data/bench_protocol_s10.json = benchmarks/results/protocol_2026-12-04_session10.json, rows A and B at 5M
and 50M, B's 50m part run three times; tests/data/bench_protocol_mp_s10.json = benchmarks/results/
protocol_mp_2026-12-04_session10.json, the model-parallel rows). Session 9's Intel records are checked by
tests/test_bench_protocol.py; here every row of both AMD records is held to 1 ± 0.15, with no KNOWN_GAPS.

What brought the last two rows in (nothing fitted to a row; before → after on these records):
* 5m zero2 1.153 → 0.993 (zero1 1.108 → 0.955): our ZeRO-1/2 buckets on the ring are read as chained halves of the
  calibrated ring pair — latency + δ/2 + wire / b_chain per reduce-scatter and all-gather, the reading stage 3's
  units already had (parallel/planning/time_terms.py, ring_chain_seconds). At 5M the whole model is one bucket, so
  both calls are exposed whole: at the 4 MiB bus bandwidth (0.53–0.59 GB/s: one call's fixed wait included in its
  time) they cost 36.7 ms, the step showed 21 ms (zero2 − local + the update it saves);
* 5m part-1 ddp 1.173 → 1.127: a peer's gradient bookkeeping was charged over 2Ψ on the parts without a local row
  (benchmarks/proto_report.py, grad_elements).
The pipeline rows read the same wait as the ring calls (δ/2 per message, was the directly timed gloo excess): 0.98–1.06.
Drift: step_drift flags B's 50m part 1 (fsdp2, fsdp2_prefetch: −12%) and part 3 (ddp, zero3, fsdp2*: −12…−14%);
those rows are still within the band, so none is excluded — the flags are asserted as recorded.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FIX = {"ab": os.path.join(ROOT, "tests", "data", "bench_protocol_s10.json"),
       "mp": os.path.join(ROOT, "tests", "data", "bench_protocol_mp_s10.json")}


def _load(kind: str) -> dict:
    with open(FIX[kind]) as f:
        return json.load(f)


def _key(rec: dict) -> str:
    return f"{rec['size']}@part{rec.get('part', 0)}"


def test_planner_within_15_percent_on_the_amd_records():
    from benchmarks.proto_report import analyse
    got, flagged = {}, {}
    for kind in ("ab", "mp"):
        data = _load(kind)
        assert data["header"]["machine"].startswith("AMD EPYC"), data["header"]["machine"]
        for rec in data["records"]:
            an = analyse(rec, n_boot=20)
            if an["drift"]["flag"]:
                flagged[f"{kind}/{_key(rec)}"] = sorted(an["drift"]["flag"])
            got.update({f"{kind}/{_key(rec)}/{n}": r["pred_over_measured"] for n, r in an["rows"].items()})
    assert len(got) == 8 + 8 + 4 * 8 + 2 * 6                       # A: 2 parts, B: 4 parts, MP: 2 sizes
    bad = {k: round(v, 3) for k, v in got.items() if abs(v - 1) > 0.15}
    assert not bad, f"planner ÷ measured outside 1 ± 0.15: {bad} (all: {got})"
    # the rows named in the issue, as the model now reads them
    assert got["ab/5m@part0/zero2"] == pytest.approx(0.993, abs=5e-3)
    assert got["ab/5m@part1/ddp"] == pytest.approx(1.127, abs=5e-3)
    assert flagged == {"ab/50m@part1": ["fsdp2", "fsdp2_prefetch"],
                       "ab/50m@part3": ["ddp", "fsdp2", "fsdp2_prefetch", "fsdp2_ring", "zero3"]}, flagged


def test_zero2_buckets_pay_the_pairs_wait_per_counted_call():
    """5M: one bucket (CommStats counted 1 reduce-scatter and 1 all-gather over dp in the run), exposed whole, so
    δ/2 of the run's ring pair shows once per call in the predicted step, and the wire at the pair's incremental
    bandwidth b_chain (time_terms.chain_terms) instead of the 4 MiB bus figure."""
    import dataclasses

    from benchmarks.proto_report import calib_mean, hardware, model_spec
    from parallel.planning.planner import predict
    from parallel.planning.spec import Layout, TrainSpec
    rec = next(r for r in _load("ab")["records"] if r["size"] == "5m" and "zero2" in r["times"])
    meta, cal = rec["rows"]["zero2"], calib_mean(rec)
    dp = meta["comm_axes"]["dp"]
    assert dp["reduce_scatter"]["calls"] == dp["all_gather"]["calls"] == 1
    hw = hardware(cal, "ring", rec["world"], rec["model"]["seq_len"])
    delta = cal["lat.ring.all_reduce"] - cal["lat.ring.reduce_scatter"] - cal["lat.ring.all_gather"]
    assert 2 * hw.chain_wait_s == pytest.approx(delta, rel=1e-12)                  # 3.19 ms on this record
    lay, tr = Layout(**meta["layout"]), TrainSpec(global_batch=2 * rec["per_rank_batch"], bucket_mb=25.0)

    def step(h):
        return predict(model_spec(rec["model"]), lay, tr, h, ranks="worst").step_s
    no_wait = step(dataclasses.replace(hw, chain_wait_s=0.0))
    assert step(hw) - no_wait == pytest.approx(2 * hw.chain_wait_s, rel=1e-9)
    b_chain = dict(hw.chain_bandwidth)["all_gather"]
    assert dict(hw.chain_bandwidth)["reduce_scatter"] == b_chain and b_chain > 1.5 * hw.bw("all_gather")
    bus = step(dataclasses.replace(hw, chain_wait_s=0.0, chain_bandwidth=()))       # the isolated-call reading
    saved = sum(dp[op]["wire_bytes"] * (1 / hw.bw(op) - 1 / b_chain) for op in ("reduce_scatter", "all_gather"))
    assert bus - no_wait == pytest.approx(saved, rel=1e-9) and saved > 15e-3      # 24 ms of the 36.7


def test_peer_bookkeeping_counts_the_gradient_once():
    """B parts have no local row: DDP's (replicated) gradient bookkeeping is over Ψ, FSDP2's over its dp × owned
    shard = Ψ as well; the prediction equals the one with the A part's local row present."""
    from benchmarks.proto_report import calib_mean, grad_elements, predict_row
    recs = [r for r in _load("ab")["records"] if r["size"] == "5m"]
    a, b = (next(r for r in recs if ("local" in r["rows"]) == has) for has in (True, False))
    psi = a["rows"]["local"]["owned"]
    assert psi == 4886528
    assert grad_elements(b, "ddp") == grad_elements(b, "fsdp2") == grad_elements(a, "ddp") == psi
    cal = calib_mean(b)
    with_local = {**b, "rows": {**b["rows"], "local": a["rows"]["local"]}}
    assert predict_row(b, "ddp", cal).step_s == predict_row(with_local, "ddp", cal).step_s
    got = predict_row(b, "ddp", cal).step_s / statistics.median(b["times"]["ddp"])
    assert got == pytest.approx(1.127, abs=5e-3)
