"""The wait δ read from interleaved repetitions (benchmarks/proto_wait.py) and how the planner takes it
(benchmarks/proto_report.py: pair_latency, ring_latencies, chain_hardware, hardware). Recorded figures and fixed
numbers only: no live timing (the 2-rank smoke in tests/test_bench_protocol.py checks the calibration records it)."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MS = 1e-3


def _rows():
    """20 repetitions (rs, ag, pair), milliseconds → seconds, the shape session 11's AMD calibrations show: an
    isolated tiny ring call in its fast mode (0.2 ms) or stalled (3.3 ms), the chained pair stalling once (3.9 ms)
    and now and then twice (7.2 ms)."""
    rs = [0.2, 3.3] * 10
    ag = [0.2] * 5 + [3.3] * 5 + [0.2] * 5 + [3.3] * 5
    pair = [3.9] * 16 + [7.2] * 4
    return [(a * MS, b * MS, c * MS) for a, b, c in zip(rs, ag, pair)]


def test_figures_of_bimodal_repetitions():
    from benchmarks.proto_wait import figures
    f = figures(_rows())
    assert f["wait.reps"] == 20
    assert f["wait.ring.pair_s"] == pytest.approx(3.9 * MS)                  # the pair's median: one stall
    assert f["wait.ring.pair_s.mean"] == pytest.approx((16 * 3.9 + 4 * 7.2) / 20 * MS)
    assert f["wait.ring.rs_fast"] == pytest.approx(0.2 * MS)                 # lower decile: the fast mode
    assert f["wait.ring.ag_fast"] == pytest.approx(0.2 * MS)
    assert f["wait.ring.rs_s"] == pytest.approx(1.75 * MS)                   # a median between the modes
    # per repetition pair − rs − ag: 3.5 (both fast), 0.4 / 0.6 (one stalled), −2.7 (both): its median 0.5 ms is
    # not the wait a chained call pays (the pair costs 3.9 ms where two fast calls cost 0.4)
    assert f["wait.ring.pair"] == pytest.approx(0.5 * MS)
    assert "wait.gloo.after_mm" not in f
    with pytest.raises(ValueError, match="at least 4|>= 4"):
        figures(_rows()[:3])


def test_tp_call_figures():
    from benchmarks.proto_wait import figures
    rows = [(0.2 * MS, 0.2 * MS, 3.9 * MS, 4.0 * MS, 0.5 * MS, (4.0 + 0.5 + w) * MS) for w in (1.0, 2.0, 3.0, 2.0)]
    f = figures(rows)
    assert f["wait.gloo.after_mm"] == pytest.approx(2.0 * MS)
    assert f["wait.gloo.call_s"] == pytest.approx(2.5 * MS)
    assert "wait.dtensor.call_s" not in f
    dt = [r + (r[3] + (x + 1.0) * MS,) for r, x in zip(rows, (1.0, 2.0, 3.0, 4.0))]   # + mm then DTensor's call
    f = figures(dt)
    assert f["wait.dtensor.call_s"] == pytest.approx(3.5 * MS)
    assert f["wait.dtensor.call_s.mean"] == pytest.approx(3.5 * MS)
    assert f["wait.gloo.call_s"] == pytest.approx(2.5 * MS)                   # the other figures as without it
    with pytest.raises(ValueError, match="one length"):
        figures(rows[:2] + dt[2:])


def _s11_mp_5m():
    with open(os.path.join(ROOT, "benchmarks", "results", "protocol_mp_2026-12-04_session11.json")) as f:
        return next(r for r in json.load(f)["records"] if r["size"] == "5m")


def test_planner_reads_the_robust_pair_where_the_record_has_it():
    """Session 11's 5m MP record: both isolated ring latencies sat in their stalled mode at both ends (rs 3.13,
    ag 3.39 ms, the smaller of start and end) and the pair at 7.25 ms, so the old δ came out 0.73 ms. Given
    (synthetic) interleaved figures, δ = the pair's median − the two fast modes, and the ring's chained calls are
    charged the fast modes: a chained reduce-scatter + all-gather costs the pair's median."""
    from benchmarks.proto_report import calib_mean, chain_hardware, hardware
    rec = _s11_mp_5m()
    cal = calib_mean(rec)
    old = 2 * chain_hardware(cal, "ring", 2)[0]
    assert old == pytest.approx(0.73 * MS, abs=0.01 * MS)                     # the fallback: records before it
    assert cal["lat.ring.reduce_scatter"] == pytest.approx(3.13 * MS, abs=0.01 * MS)
    new = {**cal, **_fig_keys()}
    delta = 2 * chain_hardware(new, "ring", 2)[0]
    assert delta == pytest.approx((3.9 - 0.2 - 0.2) * MS)
    hw = hardware(new, "ring", 2, rec["model"]["seq_len"])
    assert hw.lat("reduce_scatter") == pytest.approx(0.2 * MS) and hw.lat("all_gather") == pytest.approx(0.2 * MS)
    pair = hw.lat("reduce_scatter") + hw.lat("all_gather") + 2 * hw.chain_wait_s
    assert pair == pytest.approx(3.9 * MS)
    assert hw.call_wait_s == pytest.approx(delta) and hw.p2p_wait_s == pytest.approx(delta / 2)
    assert hw.lat("all_reduce") == pytest.approx(cal["lat.gloo.all_reduce"])   # gloo's ops keep their figures
    gloo = hardware(new, "gloo", 2, rec["model"]["seq_len"])                  # FSDP2's default rows: gloo rs/ag
    assert gloo.lat("reduce_scatter") == pytest.approx(cal["lat.gloo.reduce_scatter"])


def _fig_keys():
    from benchmarks.proto_wait import figures
    return figures(_rows())


def test_old_records_keep_their_reading():
    """Without the wait.* figures (every record before session 12) the planner's Hardware is what it was."""
    from benchmarks.proto_read import FAST, PAIR_ROBUST, pair_latency, ring_latencies
    from benchmarks.proto_report import calib_mean, hardware
    cal = calib_mean(_s11_mp_5m())
    assert PAIR_ROBUST not in cal and not any(k in cal for k in FAST)
    assert pair_latency(cal) == cal["lat.ring.all_reduce"]
    assert ring_latencies(cal) == (cal["lat.ring.reduce_scatter"], cal["lat.ring.all_gather"])
    hw = hardware(cal, "ring", 2, 64)
    assert hw.lat("reduce_scatter") == cal["lat.ring.reduce_scatter"]


def _s11_ds_50m():
    with open(os.path.join(ROOT, "benchmarks", "results", "protocol_ds_2026-12-04_session11.json")) as f:
        return next(r for r in json.load(f)["records"] if r["size"] == "50m")


def test_deepspeed_flat_message_priced_at_its_own_bandwidth():
    """DeepSpeed ZeRO-1/2 make ONE gloo all-reduce (wire 2(N−1)/N·Ψ·4) and ONE all-gather ((N−1)/N·Ψ·4) per step
    (counted bytes in the record); given their bandwidth at that message (``flat.gloo.*``; synthetic figures
    here), the predicted step moves by exactly wire × (1/b_flat − 1/b_4MiB) per op, both exposed whole (after
    backward, one bucket); the other rows and records without the figures are priced as before."""
    from benchmarks.proto_report import calib_mean, hardware, predict_row
    rec = _s11_ds_50m()
    cal = calib_mean(rec)
    hw = hardware(cal, "gloo", 2, 64)
    comm = rec["rows"]["ds1"]["comm"]
    psi = rec["rows"]["ds1"]["owned"] * 2
    assert comm["all_reduce"] == {"calls": 1, "wire_bytes": psi * 4.0, "impl": "gloo"}     # 2(N−1)/N·Ψ·4, N = 2
    assert comm["all_gather"]["calls"] == 1 and comm["all_gather"]["wire_bytes"] == psi * 2.0
    flat = {"flat.gloo.all_reduce": 1.5e9, "flat.gloo.all_gather": 0.15e9, "flat_bytes": psi * 4.0}
    new = {**cal, **flat}
    want = sum(comm[op]["wire_bytes"] * (1 / flat[f"flat.gloo.{op}"] - 1 / hw.bw(op))
               for op in ("all_reduce", "all_gather"))
    # since session 13 (benchmarks/proto_ds.py) the fresh pages of gloo's all-gather output (Ψ·4 bytes) are priced
    # separately where the record has no flat.gloo.all_gather figure; the figure times that call, fresh output
    # included, so with it they leave the fresh-page term: the step moves by the bandwidth change less those pages
    from benchmarks.proto_ds import FRESH_PAGE_S, PAGE
    want -= psi * 4 / PAGE * FRESH_PAGE_S
    for name in ("ds1", "ds2"):
        got = predict_row(rec, name, new).step_s - predict_row(rec, name, cal).step_s
        assert got == pytest.approx(want, rel=1e-6)      # (the 32-byte norm all-reduce: 1e-8 s)
    assert want == pytest.approx(0.4508 - 0.0797, abs=1e-3)   # these synthetic figures: +451 ms at 50M, −80 ms pages
    for name in ("ds3", "zero1", "ddp"):
        assert predict_row(rec, name, new).step_s == predict_row(rec, name, cal).step_s


def test_deepspeed_rows_priced_with_their_counted_collectives():
    """Every record: ds1/ds2 are planned with one bucket and their counted all-reduce (wire Ψ·4 at N = 2) replaces
    the planned reduce-scatter (Ψ·2), exposed whole. Session 11's 50m ds1 / ds2: 0.73 / 0.76 → 0.80 / 0.83; with
    DeepSpeed's own passes and fresh pages (benchmarks/proto_ds.py, session 13) 1.05 / 1.07, ds3 (its counted calls
    too) 0.925 → 1.046. The values without the session-13 terms are kept: the flat all-reduce alone gives them."""
    import statistics

    from benchmarks.proto_read import flat_reduce_seconds
    from benchmarks.proto_report import calib_mean, hardware, predict_row
    from parallel.planning.cost import seconds
    rec = _s11_ds_50m()
    cal = calib_mean(rec)
    from benchmarks.proto_ds import ds_seconds
    from benchmarks.proto_report import grad_elements
    got, before = {}, {}
    for n in ("ds1", "ds2", "ds3"):
        p, med = predict_row(rec, n, cal), statistics.median(rec["times"][n])
        extra = ds_seconds(n, grad_elements(rec, n), rec["rows"][n]["owned"], 2, p, hardware(cal, "gloo", 2, 64), cal)
        got[n], before[n] = p.step_s / med, (p.step_s - sum(extra.values())) / med
    assert before == pytest.approx({"ds1": 0.800, "ds2": 0.830, "ds3": 0.925}, abs=5e-3)
    assert got == pytest.approx({"ds1": 1.050, "ds2": 1.069, "ds3": 1.046}, abs=2e-3)
    pred, hw = predict_row(rec, "ds1", cal), hardware(cal, "gloo", 2, 64)
    rs = pred.comm[0]["dp"]["reduce_scatter"]
    assert rs["calls"] == 1 and pred.comm[0]["dp"]["all_gather"]["calls"] == 1
    ar = rec["rows"]["ds1"]["comm"]["all_reduce"]
    assert ar["wire_bytes"] == 2 * rs["wire_bytes"]
    want = ar["calls"] * hw.lat("all_reduce") + ar["wire_bytes"] / hw.bw("all_reduce")
    want -= seconds({"reduce_scatter": rs}, hw)
    assert flat_reduce_seconds(rec["rows"]["ds1"], "ds1", pred, hw) == pytest.approx(want)
    assert flat_reduce_seconds(rec["rows"]["ds3"], "ds3", pred, hw) == 0.0
    bad = {**rec["rows"]["ds1"], "comm": {"all_reduce": {"calls": 9, "wire_bytes": 1.0}, "all_gather": ar}}
    with pytest.raises(ValueError, match="recount it"):
        flat_reduce_seconds(bad, "ds1", pred, hw)
    bad = {**rec["rows"]["ds1"], "comm": {"all_reduce": ar}}
    with pytest.raises(ValueError, match="recount it"):
        flat_reduce_seconds(bad, "ds1", pred, hw)
