"""The planner's calibrated CPU terms (issue 18), without ranks: stage 3's chained collectives
(parallel/planning/time_terms.py: chain_terms, chain_seconds, stage3_waits — from the calibrated back-to-back
ring pair, nothing fitted) and the zero-bubble I/W split (``Hardware.split_frac``, parallel/planning/cost.py)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from parallel.pipeline.actions import Action  # noqa: E402
from parallel.planning.cost import _split_frac, seconds  # noqa: E402
from parallel.planning.planner import predict  # noqa: E402
from parallel.planning.spec import Hardware, Layout, ModelSpec, TrainSpec  # noqa: E402
from parallel.planning.time_terms import (  # noqa: E402
    chain_seconds,
    chain_terms,
    exposed_dp,
    ring_chain_seconds,
    stage3_waits,
    tp_waits,
)

SPEC = ModelSpec(n_layer=4, hidden=64, heads=4, vocab=128, seq=32)


def test_chain_terms_by_hand():
    # pair: 3 ms tiny, 8 ms for 4 MB of wire (bus bw 0.5 GB/s); the ops alone 0.2 / 0.3 ms:
    # δ = 3 − 0.2 − 0.3 = 2.5 ms (1.25 ms per call), b = 4e6 / (8e-3 − 3e-3) = 0.8 GB/s
    wait, b = chain_terms(3e-3, 0.2e-3, 0.3e-3, 0.5e9, 4e6)
    assert wait == pytest.approx(1.25e-3, rel=1e-12) and b == pytest.approx(0.8e9, rel=1e-12)
    assert chain_terms(0.4e-3, 0.2e-3, 0.3e-3, 0.5e9, 4e6)[0] == 0.0          # no excess: no wait
    assert chain_terms(9e-3, 0.2e-3, 0.3e-3, 0.5e9, 4e6)[1] == 0.5e9          # no increment: the pair's bw


def test_stage3_exposes_its_chain():
    ops = {"all_gather": {"calls": 4, "wire_bytes": 8e6}, "reduce_scatter": {"calls": 3, "wire_bytes": 4e6},
           "all_reduce": {"calls": 1, "wire_bytes": 24.0}}
    hw = Hardware(bandwidth=1e9, latency_s=1e-4, op_bandwidth=(("all_gather", 0.5e9), ("reduce_scatter", 0.5e9)),
                  chain_bandwidth=(("all_gather", 0.8e9), ("reduce_scatter", 0.8e9)), chain_wait_s=1.25e-3,
                  comm_shares_core=True)
    want = 8 * 1e-4 + 12e6 / 0.8e9 + 24 / 1e9                 # latencies + the chain's bandwidth (gloo's for the norm)
    assert chain_seconds(ops, hw) == pytest.approx(want, rel=1e-12)
    assert exposed_dp(ops, 3, 1.0, 1.0, hw, seconds) == pytest.approx(want, rel=1e-12)
    assert stage3_waits(ops, 3, "block", hw) == pytest.approx(7 * 1.25e-3, rel=1e-12)   # per gather/scatter call
    assert stage3_waits(ops, 3, "module", hw) == stage3_waits(ops, 2, "block", hw) == 0.0
    from dataclasses import replace
    assert stage3_waits(ops, 3, "block", replace(hw, comm_shares_core=False)) == 0.0


def test_zero12_ring_buckets_read_as_chained_halves():
    # one bucket (K = 1): the reduce-scatter after backward and the all-gather after the update are exposed whole,
    # each at its latency + δ/2 + wire / b_chain (as a stage-3 unit's); the norm's gloo all-reduce at its own figures
    from dataclasses import replace
    ops = {"reduce_scatter": {"calls": 1, "wire_bytes": 8e6}, "all_gather": {"calls": 1, "wire_bytes": 8e6},
           "all_reduce": {"calls": 1, "wire_bytes": 32.0}}
    hw = Hardware(bandwidth=1e9, latency_s=1e-4, op_bandwidth=(("all_gather", 0.5e9), ("reduce_scatter", 0.5e9)),
                  chain_bandwidth=(("all_gather", 0.8e9), ("reduce_scatter", 0.8e9)), chain_wait_s=1.25e-3,
                  comm_shares_core=True)
    want = 3 * 1e-4 + 16e6 / 0.8e9 + 32 / 1e9 + 2 * 1.25e-3                 # 22.8 ms (the 4 MiB figure's: 32.3)
    assert ring_chain_seconds(ops, hw) == pytest.approx(want, rel=1e-12)
    for zero in (1, 2):
        assert exposed_dp(ops, zero, 1.0, 1.0, hw, seconds) == pytest.approx(want, rel=1e-12)
    plain = 3 * 1e-4 + 16e6 / 0.5e9 + 32 / 1e9                               # gloo's buckets (no chain figure)
    assert exposed_dp(ops, 2, 1.0, 1.0, replace(hw, chain_bandwidth=()), seconds) == pytest.approx(plain, rel=1e-12)
    gpu = replace(hw, comm_shares_core=False)                                 # separate copy engines: as before
    assert exposed_dp(ops, 2, 1.0, 1.0, gpu, seconds) == pytest.approx(plain, rel=1e-12)


def test_tp_collectives_wait_per_call():
    # tp = 2, no sp, one stage of L = 4 blocks: per micro-batch 4 all-reduces per block, the embedding's forward,
    # the head's backward and the loss's two: 4·4 + 4 = 20 blocking calls, each + call_wait_s on CPU ranks;
    # full activation checkpointing re-runs each block's forward: its 2 all-reduces again
    from dataclasses import replace
    ops = {"all_reduce": {"calls": 20, "wire_bytes": 1e6}}
    hw = Hardware(peak_flops=1e10, bandwidth=1e9, latency_s=1e-4, comm_shares_core=True, call_wait_s=2.5e-3)
    assert tp_waits(ops, hw) == pytest.approx(20 * 2.5e-3, rel=1e-12)
    assert tp_waits(ops, replace(hw, comm_shares_core=False)) == 0.0        # GPUs: no such wait
    m = 2
    for lay, tr, calls in ((Layout(tp=2, micro_batches=m), TrainSpec(8), 20),
                           (Layout(tp=2, micro_batches=m), TrainSpec(8, activation="full"), 20 + 2 * 4),
                           (Layout(tp=2, micro_batches=m, sp=True), TrainSpec(8), None),
                           (Layout(tp=2, micro_batches=m, sp=True), TrainSpec(8, activation="full"), None)):
        step = {w: predict(SPEC, lay, tr, replace(hw, call_wait_s=w)).step_s for w in (0.0, 2.5e-3)}
        pred = predict(SPEC, lay, tr, hw)        # the calls the planner counts: each waits (recomputed too)
        n = sum(c["calls"] for c in pred.comm[0]["tp"].values()) - 1       # − the step's grad-norm all-reduce
        assert calls is None or n == m * calls
        assert step[2.5e-3] - step[0.0] == pytest.approx(n * 2.5e-3, rel=1e-9)
    dp = {w: predict(SPEC, Layout(dp=2), tr, replace(hw, call_wait_s=w)).step_s for w in (0.0, 2.5e-3)}
    assert dp[0.0] == dp[2.5e-3]                                              # no tp collective: no wait


def test_tp_split_rate_moves_only_tp_compute():
    # Hardware.tp_flops: the rate per rank at the tp-split shapes, keyed (tp, tokens per micro-batch)
    free = dict(peak_flops=1e10, bandwidth=float("inf"), latency_s=0.0)
    tr, lay = TrainSpec(8), Layout(tp=2)                      # one micro-batch of 8 × 32 tokens
    base = predict(SPEC, lay, tr, Hardware(**free)).step_s
    half = predict(SPEC, lay, tr, Hardware(**free, tp_flops=(((2, 256), 5e9),))).step_s
    assert half == pytest.approx(2 * base, rel=1e-12)          # only compute: no bandwidth, latency or memory term
    assert predict(SPEC, lay, tr, Hardware(**free, tp_flops=(((2, 128), 5e9),))).step_s == base     # another size
    assert predict(SPEC, lay, tr, Hardware(**free, tp_flops=(((4, 256), 5e9),))).step_s == base     # another tp
    one = Layout(dp=1)
    assert predict(SPEC, one, tr, Hardware(**free, tp_flops=(((2, 256), 5e9),))).step_s == \
        predict(SPEC, one, tr, Hardware(**free)).step_s


def test_split_fractions_per_action():
    frac = {"F": 1 / 3, "B": 2 / 3, "I": 1 / 3, "W": 1 / 3}
    split = (0.6, 0.9)                                         # I and W seconds ÷ a plain B's
    assert _split_frac(Action("I", 0, 1), frac, split) == pytest.approx(2 / 3 * 0.6)
    assert _split_frac(Action("W", 0, 1), frac, split) == pytest.approx(2 / 3 * 0.9)
    assert _split_frac(Action("I", 0, 0), frac, split) == 0.0         # stage 0: token ids, no input gradient
    assert _split_frac(Action("W", 0, 0), frac, split) == frac["B"]   # ... its W is one plain backward
    assert _split_frac(Action("F", 0, 1), frac, split) == frac["F"]
    assert _split_frac(Action("I", 0, 1), frac, None) == 1 / 3         # uncalibrated: 1:2:1:1


def test_split_calibration_moves_only_zero_bubble_steps():
    free = dict(peak_flops=1e10, bandwidth=float("inf"), latency_s=0.0)
    tr = TrainSpec(8)
    zb, f1b = Layout(pp=2, micro_batches=8, schedule="zero_bubble"), Layout(pp=2, micro_batches=8)
    step = {k: predict(SPEC, zb, tr, Hardware(**free, split_frac=((32, f),))).step_s
            for k, f in (("cheap", (0.5, 0.5)), ("dear", (0.8, 1.0)))}
    assert step["dear"] > step["cheap"] * 1.1
    other = predict(SPEC, zb, tr, Hardware(**free, split_frac=((64, (0.8, 1.0)),))).step_s   # another size
    assert other == predict(SPEC, zb, tr, Hardware(**free)).step_s
    assert predict(SPEC, f1b, tr, Hardware(**free, split_frac=((32, (0.8, 1.0)),))).step_s == \
        predict(SPEC, f1b, tr, Hardware(**free)).step_s                                      # 1F1B has no I/W


def test_pipeline_message_wait_on_the_critical_path():
    """``Hardware.p2p_wait_s`` adds to each stage's micro-batch once per stage-boundary message (one per stage at
    pp = 2): 1F1B over p = 2 stages of equal cost and m micro-batches has makespan (m + p − 1) × the stage's F + B, so
    the step grows by (m + p − 1) · w; nothing without pipeline stages."""
    from dataclasses import replace
    hw = Hardware(peak_flops=1e10, bandwidth=1e9, latency_s=1e-4, comm_shares_core=True)
    tr, w = TrainSpec(8), 1.5e-3
    for m in (2, 8):
        lay = Layout(pp=2, micro_batches=m, schedule="1f1b")
        spec = ModelSpec(n_layer=4, hidden=64, heads=4, vocab=128, seq=32, tied=False)
        step = {x: predict(spec, lay, tr, replace(hw, p2p_wait_s=x)).step_s for x in (0.0, w)}
        assert step[w] - step[0.0] == pytest.approx((m + 2 - 1) * w, rel=1e-6), (m, step)
    dp = {x: predict(SPEC, Layout(dp=2), tr, replace(hw, p2p_wait_s=x)).step_s for x in (0.0, w)}
    assert dp[0.0] == dp[w]


def test_recorded_pipeline_rows_take_the_pairs_half_wait():
    """benchmarks/proto_report.hardware: one wait figure — p2p_wait_s per pipeline message = chain_wait_s per ring call
    = δ/2 of the record's ring pair (call_wait_s = δ per tp all-reduce), 0 without the pair. Session 9's 5m pp rows
    go from 0.83 (no wait) to 0.91–0.97, its 50m ones to 1.06–1.10; session 8's B part, which has no directly timed
    excess (the figure the rows read until session 11: 0 there, 0.87–0.90), to 0.98–1.06."""
    import json
    import statistics

    from benchmarks.proto_report import PAIR, calib_mean, hardware, predict_row
    got = {}
    for f in ("tests/data/bench_protocol.json", "benchmarks/results/protocol_2026-12-04_session8.json"):
        with open(os.path.join(ROOT, f)) as fh:
            recs = [r for r in json.load(fh)["records"] if "pp_1f1b_m8" in r["times"]]
        for rec in recs:
            cal = calib_mean(rec)
            hw = hardware(cal, "ring", rec["world"], rec["model"]["seq_len"])
            assert hw.p2p_wait_s == hw.chain_wait_s == hw.call_wait_s / 2 > 1e-3
            none = {k: v for k, v in cal.items() if k != PAIR}
            assert hardware(none).p2p_wait_s == 0.0
            for name in [n for n in rec["times"] if n.startswith("pp_")]:
                med = statistics.median(rec["times"][name])
                key = f"{'s9' if 'data' in f else 's8'}/{rec['size']}/{name}"
                got[key] = predict_row(rec, name, none).step_s / med, predict_row(rec, name, cal).step_s / med
    assert len(got) == 9 and sum(k.startswith("s9/5m") for k in got) == 3, got
    assert all(0.80 < a < 0.85 and b > 0.9 for k, (a, b) in got.items() if k.startswith("s9/5m")), got
    assert all(abs(b - 1) <= 0.15 and b > a for a, b in got.values()), got
