"""The benchmark protocol (benchmarks/protocol.py): its statistics on hand-checked numbers, its
analysis and the planner's time model on a RECORDED run (tests/data/bench_protocol.json, written
by ``python benchmarks/protocol.py ... --json``), and a 2-rank smoke run of the whole protocol.

* paired ratios r_i = a_i / b_i and their median; the percentile bootstrap of a median on samples
  whose resampling distribution is known in closed form (Binomial counts of the odd value);
* the A/A band w = max(|lo − 1|, |hi − 1|, |median − 1|) and the tie rule |r − 1| ≤ w;
* the planner (fed the recorded calibration) within 15% of every recorded row's median step, except the
  rows listed in KNOWN_GAPS (held to their stated band), and no drift: no row's predicted step moves by
  more than 10% between the start and end calibrations.
"""
from __future__ import annotations

import json
import math
import os
import random
import statistics
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import proto_stats as st  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "data", "bench_protocol.json")


def test_paired_ratios_and_compare():
    a, b = [2.0, 4.0, 9.0, 3.0], [1.0, 2.0, 3.0, 3.0]
    assert st.paired_ratios(a, b) == [2.0, 2.0, 3.0, 1.0]
    c = st.compare(a, b, seed=3, n_boot=500)
    assert c["median"] == 2.0 and c["min"] == 1.0 and c["max"] == 3.0 and c["n"] == 4
    assert c["ci"][0] <= 2.0 <= c["ci"][1] and 1.0 <= c["ci"][0] and c["ci"][1] <= 3.0
    assert st.compare(a, b, seed=3, n_boot=500) == c                    # seeded: reproducible
    with pytest.raises(ValueError, match="do not pair"):
        st.paired_ratios([1.0], [1.0, 2.0])


def test_bootstrap_interval_matches_binomial_theory():
    # 4 × 1.0 and one 100: a resample's median is 100 iff ≥ 3 of its 5 draws hit the 100,
    # P = Σ_{j≥3} C(5,j) 0.2^j 0.8^(5−j) = 0.0579 > 0.025, so the 97.5% quantile is 100, the 2.5% one 1.
    p5 = sum(math.comb(5, j) * 0.2 ** j * 0.8 ** (5 - j) for j in range(3, 6))
    assert p5 == pytest.approx(0.05792)
    assert st.bootstrap_median([1.0] * 4 + [100.0], n=4000, seed=1) == (1.0, 100.0)
    # 9 × 1.0 and one 100 (n = 10): the median moves only when ≥ 5 draws hit the 100, P = 0.0016 < 0.025
    p10 = sum(math.comb(10, j) * 0.1 ** j * 0.9 ** (10 - j) for j in range(5, 11))
    assert p10 == pytest.approx(0.00163, rel=1e-2)
    assert st.bootstrap_median([1.0] * 9 + [100.0], n=4000, seed=1) == (1.0, 1.0)
    assert st.bootstrap_median([2.5] * 7, n=100) == (2.5, 2.5)


def test_noise_band_and_tie_rule():
    aa = {"median": 1.01, "ci": [0.97, 1.04]}
    w = st.noise_half_width(aa)
    assert w == pytest.approx(0.04)
    assert st.verdict(1.03, w) == "tie" and st.verdict(0.96 + 1e-12, w) == "tie"
    assert st.verdict(0.95, w) == "faster" and st.verdict(1.05, w) == "slower"
    assert st.noise_half_width({"median": 0.90, "ci": [0.95, 1.02]}) == pytest.approx(0.10)   # median outside


def test_drift_and_comm_floor():
    d = st.drift({"a": 1.0, "b": 2.0, "c": 0.0}, {"a": 1.05, "b": 2.5, "c": 3.0})
    assert d["change"] == pytest.approx({"a": 0.05, "b": 0.25}) and d["flag"] == ["b"]
    ops = {"all_reduce": {"calls": 2, "wire_bytes": 4e6}, "all_gather": {"calls": 0, "wire_bytes": 0.0}}
    t = st.comm_floor(ops, {"all_reduce": 1e-3, "all_gather": 5.0}, {"all_reduce": 1e9, "all_gather": 1.0})
    assert t == pytest.approx(2e-3 + 4e-3)


def _recorded():
    if not os.path.exists(FIXTURE):
        pytest.fail(f"{FIXTURE} is missing: write it with python benchmarks/protocol.py --sizes 5m --json {FIXTURE}")
    with open(FIXTURE) as f:
        return json.load(f)


def test_analysis_of_the_recorded_run():
    from benchmarks.proto_report import analyse, bytes_check, calib_mean, floors, predict_row
    data = _recorded()
    full = [rec for rec in data["records"] if {"ddp", "ddp_aa", "ddp_tuned", "local", "zero0", "zero1", "zero2",
                                               "zero3"} <= set(rec["times"])]
    # the refresh writes two invocations (benchmarks/proto_merge.py); the first carries these rows at every size
    assert {rec["size"] for rec in full} == {rec["size"] for rec in data["records"]}, [r["size"] for r in full]
    for rec in full:
        an = analyse(rec, n_boot=300)
        t = rec["times"]
        r = [x / y for x, y in zip(t["ddp_aa"], t["ddp"])]
        assert an["aa"]["median"] == statistics.median(r) and an["aa"]["min"] == min(r)
        assert an["noise_w"] >= abs(statistics.median(r) - 1)
        z = an["rows"]["zero1"]
        want = statistics.median([x / y for x, y in zip(t["zero1"], t["ddp_tuned"])])
        assert z["vs"]["ddp_tuned"]["median"] == want
        assert z["vs"]["ddp_tuned"]["verdict"] == st.verdict(want, an["noise_w"])
        # floors from the recorded calibration: compute F / R, optimizer 28 B × owned / memory bandwidth
        cal, kw = an["calib"], rec["model"]
        f = floors(rec, "local", cal)
        n_mm = 12 * kw["n_layer"] * kw["n_embd"] ** 2 + kw["vocab_size"] * kw["n_embd"]
        tokens = rec["per_rank_batch"] * kw["seq_len"]
        flops = tokens * (6 * n_mm + 12 * kw["n_layer"] * kw["n_embd"] * kw["seq_len"])
        assert f["compute"] == pytest.approx(flops / cal["matmul_flops"], rel=1e-12)
        assert f["optimizer"] == pytest.approx(28 * rec["rows"]["local"]["owned"] / cal["mem_bw"], rel=1e-12)
    for rec in data["records"]:                                     # bytes: CommStats == planner, same run
        for name in ("zero0", "zero1", "zero2", "zero3", "pp_1f1b_m8", "pp_zbh1_m8", "pp_zbv_m8"):
            if name in rec["times"]:
                b = bytes_check(rec, name, predict_row(rec, name, calib_mean(rec)))
                assert b["equal"] or _before_loss_slot(b, name), (rec["size"], name, b)


def _before_loss_slot(b: dict, name: str) -> bool:
    """This record predates parallel/zero/norm_carry.py (session 12): ZeRO ≥ 1's dp norm all-reduce carried 4
    float64 (32 B) then and carries the step's loss in a 5th now (40 B, what the planner predicts for today's
    code); every other op and byte must still agree."""
    got, want = b["measured"], b["planner"]
    return (name in ("zero1", "zero2", "zero3") and got.keys() == want.keys() and got.get("all_reduce") == 32.0
            and want["all_reduce"] == 40.0 and all(got[k] == want[k] for k in got if k != "all_reduce"))


# Rows the time model does not reach within 15% on the recorded idle run, with the band they are held to.
# Nothing in the model is fitted to this record: the stage-3 terms come from its calibrated ring pair
# (parallel/planning/time_terms.py, chain_terms), the ZB split from its calibrated split_i/split_w.
# 5m/fsdp2_ring: FSDP2 pays more per collective than its bytes and the chain terms explain — at 5M it
# measured 173.2 ms on our ring and 171.3 ms on gloo's collectives (session 7 idle record), though the
# calibration makes its 29 MB of wire 33 ms cheaper on the ring: the step is not bound by the bytes there.
# Solving step − compute − update = calls·a + wire/b at 5M and 50M of that record: zero3 a = 2.35 ms,
# b = 1.17 GB/s; fsdp2_ring a = 3.44 ms, b = 1.22 GB/s — the same bandwidth (the chain model's 0.9–1.0 GB/s
# is near), 1.1 ms more per call (20 calls: 22 ms) of FSDP2's own per-unit work, which no calibrated
# figure holds. Predicted ÷ measured 0.80 (16:12 record), 0.84 (20:40), 0.81 (session 7), 0.82 (session 8,
# 2026-12-04 03:26, commit 0a5d118), 0.73 (session 9, this fixture); at 50M 0.92–1.07.
# Session 9's refresh (2026-12-04 10:35–10:49, commit c1d3e26; its first 5m parts drifted and were re-run): the
# machine calibrated faster than in session 8 (5m: matmul 165 → 185 GFLOP/s, model forward+backward 115 → 137,
# memory 15.2 → 22.3 GB/s) while the 5m steps fell less (zero3 155 → 144 ms, fsdp2 178 → 167, pp_1f1b_m8 135 →
# 115). With the ring pair's latency at the smaller of start and end (δ = 0.00 / 0.02 ms at 5m: its fast mode) the
# planner gave zero3 0.82 / 0.88, fsdp2 0.80, fsdp2_prefetch 0.80, fsdp2_ring 0.73; with the larger (2.18 / 3.27 ms,
# the waiting mode that the directly timed chained call confirms: proto_report.calib_mean, and
# test_ring_pair_takes_the_waiting_mode) 0.89 / 0.92, 0.94, 0.93, 0.77 — every 50m row 0.90–1.08.
# Counted per step on this code (benchmarks/proto_pair.py --count, 5m, rank 0 / 1): aten calls local 1402,
# zero1 1416 / 1383, zero3 2180 / 1883, fsdp2 1910, fsdp2_ring 2060, pp_1f1b_m8 2996 / 3248; at the measured host
# cost of a tiny aten call (2.8 µs, loaded) the calls beyond local's are 1.4–2.2 ms of the 16–33 ms the 5m rows
# missed: per-op dispatch is not what the model lacks. The 5m pipeline rows (0.83 each) come to 0.97 / 0.96 / 1.05
# (50m 1.07 / 1.07 / 1.11) with the directly timed excess of a blocking call after compute per pipeline message
# (Hardware.p2p_wait_s, parallel/planning/time_terms.py). Still open (issue 18): fsdp2_ring, 0.77 — its update runs
# over 76 DTensor parameters (8 DTensor calls each: benchmarks/proto_host.py, 1.43 ms a parameter in situ, loaded),
# which records from session 10 on calibrate (host.dtensor_adamw_s) and the planner charges; this record has no
# such figure, so the band stays until a fresh idle run replaces it (session 10's AMD record has it: 0.88 there,
# tests/test_bench_protocol_s10.py, which needs no KNOWN_GAPS). Session 11 (one wait figure, time_terms.py): zero1 /
# zero2 5M 0.96 / 0.95, 50M 0.98 / 0.99; pp 5M 0.92 / 0.91 / 0.97; B's ddp 0.89 / 0.88 (its bookkeeping counted once).
KNOWN_GAPS: dict = {"5m/fsdp2_ring": 0.25}


def test_ring_pair_takes_the_waiting_mode():
    """calib_mean takes the ring pair's latency (a chain of two calls, read as the wait δ) at the larger of start and
    end, every other latency at the smaller; the evidence for the waiting mode: the chained gloo all-reduce timed
    after compute (proto_report.tp_wait) exceeds the isolated call by more than 1 ms at both ends of every record."""
    from benchmarks.proto_report import PAIR, calib_mean, hardware, step_drift, tp_wait
    data = _recorded()
    for rec in data["records"]:
        a, b, cal = rec["calib_start"], rec["calib_end"], calib_mean(rec)
        assert cal[PAIR] == max(a[PAIR], b[PAIR])
        assert cal["lat.ring.reduce_scatter"] == min(a["lat.ring.reduce_scatter"], b["lat.ring.reduce_scatter"])
        assert all(tp_wait(c, rec["world"])[0] > 1e-3 for c in (a, b)), rec["size"]
        delta = cal[PAIR] - cal["lat.ring.reduce_scatter"] - cal["lat.ring.all_gather"]
        assert hardware(cal, "ring").call_wait_s == pytest.approx(delta, rel=1e-12) and delta > 2e-3
        assert not step_drift(rec)["flag"]
    five = [rec for rec in data["records"] if rec["size"] == "5m"]
    assert [round(min(r["calib_start"][PAIR], r["calib_end"][PAIR]) * 1e3, 2) for r in five] == [0.26, 0.22]   # fast


def test_planner_time_model_on_the_recorded_run():
    from benchmarks.proto_report import analyse
    data = _recorded()
    gaps, drifted, bad = [], [], {}
    for rec in data["records"]:
        an = analyse(rec, n_boot=50)
        drifted += [f"{rec['size']}: {k}" for k in an["drift"]["flag"]]
        for name, r in an["rows"].items():
            key, v = f"{rec['size']}/{name}", round(r["pred_over_measured"], 3)
            gaps.append((key, v))
            if abs(v - 1) > KNOWN_GAPS.get(key, 0.15):
                bad[f"{key}@part{rec.get('part', 0)}"] = v
    # drift = a row's predicted step moving > 10% between the start and end calibrations: not on an idle run
    assert not drifted, f"the recorded run ({data['header']['date']}) drifted: {drifted}"
    assert not bad, f"planner ÷ measured step outside its band (1 ± 0.15 unless in KNOWN_GAPS): {bad} (all: {gaps})"
    assert len({k for k, _ in gaps}) >= 20


FIXTURE_MP = os.path.join(ROOT, "tests", "data", "bench_protocol_mp.json")


def test_planner_time_model_on_the_model_parallel_run():
    """Session 8's idle model-parallel run (tests/data/bench_protocol_mp.json = benchmarks/results/
    protocol_mp_2026-12-04_session8.json; ddp, tp_dtensor, tp_ours, pp_torch, pp_ours at 5M and 50M): every row
    within 15%. The tp rows get there through δ per blocking tp collective (parallel/planning/time_terms.py,
    tp_waits), δ = l_pair − l_rs − l_ag of the same run's calibrated ring pair; with δ = 0 they were 0.49–0.84 ×.
    Its 5M end calibration drifted (train_flops 1.30e11 → 1.16e11: ddp and pp steps +11%); the tp rows did not."""
    import dataclasses

    from benchmarks.proto_report import analyse, calib_mean, hardware, model_spec, predict_row
    from parallel.planning.cost import step_time
    from parallel.planning.spec import TrainSpec
    with open(FIXTURE_MP) as f:
        data = json.load(f)
    got, without = {}, {}
    for rec in data["records"]:
        an = analyse(rec, n_boot=20)
        assert not [k for k in an["drift"]["flag"] if k.startswith("tp")], an["drift"]
        got.update({f"{rec['size']}/{n}": r["pred_over_measured"] for n, r in an["rows"].items()})
        cal, L = calib_mean(rec), rec["model"]["n_layer"]
        delta = cal["lat.ring.all_reduce"] - cal["lat.ring.reduce_scatter"] - cal["lat.ring.all_gather"]
        assert delta > 0 and hardware(cal).call_wait_s == pytest.approx(delta, rel=1e-12)   # 2.89 / 2.29 ms here
        # our tp row's collectives, counted by CommStats in the run: 4 per block, embedding forward, head
        # backward, the loss's 2 (one micro-batch) and the step's grad-norm all-reduce
        assert rec["rows"]["tp_ours"]["comm_axes"]["tp"]["all_reduce"]["calls"] == 4 * L + 5
        no_wait = {**cal, "lat.ring.all_reduce": cal["lat.ring.reduce_scatter"] + cal["lat.ring.all_gather"]}
        for name, calls in (("tp_ours", 4 * L + 4), ("tp_dtensor", 4 * L)):     # DTensor: its 4 per block only
            with_, wo = predict_row(rec, name, cal).step_s, predict_row(rec, name, no_wait).step_s
            assert with_ - wo == pytest.approx(delta * calls, rel=1e-9)      # δ per call of the micro-batch
            without[f"{rec['size']}/{name}"] = wo / statistics.median(rec["times"][name])
        hw = hardware(cal, "ring", rec["world"], rec["model"]["seq_len"])     # the same term through step_time
        lay, spec = predict_row(rec, "tp_ours", cal).layout, model_spec(rec["model"])
        tr = TrainSpec(global_batch=rec["per_rank_batch"] * 2)
        a = step_time(spec, lay, tr, hw, [(0, L)], tr.global_batch, {})[0]
        b = step_time(spec, lay, tr, dataclasses.replace(hw, comm_shares_core=False), [(0, L)], tr.global_batch, {})
        assert a - b[0] == pytest.approx(delta * (4 * L + 4), rel=1e-9)
    assert len(got) == 12
    bad = {k: round(v, 3) for k, v in got.items() if abs(v - 1) > 0.15}
    assert not bad, f"planner ÷ measured outside 1 ± 0.15: {bad} (all: {got})"
    # the term is what brings tp in: without it 0.56 / 0.84 (tp_ours), 0.49 / 0.75 (tp_dtensor) on this record
    assert all(got[k] - v > 0.1 for k, v in without.items()), (got, without)


def test_tp_wait_out_of_sample():
    """δ is the run's own figure, not fitted: the MP record's tp rows predicted with the δ of each other idle
    session-7/8 record (benchmarks/results/, ring pair calibrated at its start and end; δ 1.97–3.30 ms) stay within
    15%: tp_ours 0.98–1.12, tp_dtensor 0.87–0.99 (the 2026-12-03 18:06 / 18:38 records, whose ring all-gather /
    reduce-scatter latency sat in its slow 2–3 ms mode at both ends, give δ 0.6–1.3 ms and tp_ours 0.74–0.94)."""
    from benchmarks.proto_report import calib_mean, predict_row
    with open(FIXTURE_MP) as f:
        mp = {rec["size"]: rec for rec in json.load(f)["records"]}
    got = {}
    for f in ("protocol_2026-12-04_session7.json", "protocol_ds_2026-12-04_session7.json",
              "protocol_2026-12-04_session8.json", "protocol_ds_2026-12-04_session8.json"):
        with open(os.path.join(ROOT, "benchmarks", "results", f)) as fh:
            for rec in json.load(fh)["records"]:
                c = calib_mean(rec)
                delta = c["lat.ring.all_reduce"] - c["lat.ring.reduce_scatter"] - c["lat.ring.all_gather"]
                m = mp[rec["size"]]
                cal = calib_mean(m)
                cal["lat.ring.all_reduce"] = cal["lat.ring.reduce_scatter"] + cal["lat.ring.all_gather"] + delta
                for name in ("tp_ours", "tp_dtensor"):
                    key = f"{f[:-5]}/{rec['size']}/{rec.get('part', 0)}/{name}"
                    got[key] = predict_row(m, name, cal).step_s / statistics.median(m["times"][name])
    assert len(got) == 2 * 9, got                    # 9 records: session 8 has a second 5M part
    assert all(abs(v - 1) <= 0.15 for v in got.values()), got


def test_stage3_chain_terms_out_of_sample():
    """The stage-3 terms on the session-7 idle records (never fitted to): ZeRO-3 and FSDP2 within 15% but
    5m/fsdp2_ring (KNOWN_GAPS); the fitted constant they replace gave zero3 50m 1.20."""
    from benchmarks.proto_report import calib_mean, predict_row
    got = {}
    for f in ("protocol_2026-12-04_session7.json", "protocol_ds_2026-12-04_session7.json"):
        with open(os.path.join(ROOT, "benchmarks", "results", f)) as fh:
            for rec in json.load(fh)["records"]:
                for name in ("zero3", "fsdp2_prefetch", "fsdp2_ring"):
                    if name in rec["times"]:
                        pred = predict_row(rec, name, calib_mean(rec)).step_s
                        got[f"{f[:11]}/{rec['size']}/{name}"] = pred / statistics.median(rec["times"][name])
    assert len(got) == 8                     # zero3 + both FSDP2 rows (protocol run), zero3 (DeepSpeed run) × 2 sizes
    for k, v in got.items():
        band = KNOWN_GAPS.get(k.split("/", 1)[1], 0.15)
        assert abs(v - 1) <= band, (k, v, got)


def test_tp_replica_has_one_tp_ranks_shapes():
    """The calibration's tp=2 compute replica (proto_calib.tp_replica) holds 1/t of every matmul weight of the
    GPT (N/t = (12·L·h² + V·h)/t, the head tied to the V/t embedding slice) and its rate runs without ranks."""
    from benchmarks.proto_calib import tp_replica, tp_train_rate
    kw = {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 64, "seq_len": 16}
    m, t = tp_replica(kw, 2), 2
    h, L, V = kw["n_embd"], kw["n_layer"], kw["vocab_size"]
    mats = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and n != "wpe.weight")
    assert mats == (12 * L * h * h + V * h) // t and m.lm_head.weight is m.wte.weight
    assert all(b.attn.n_head == kw["n_head"] // t for b in m.blocks)
    assert tp_train_rate(kw, 2, t, reps=1) > 0


def _smoke(rank, world):
    sys.path.insert(0, ROOT)
    from benchmarks.proto_run import run_rank
    opts = {"size": "tiny", "per_rank_batch": 2, "rounds": 2, "warmup": 2, "seed": 5, "pin": False,
            "rows": ["local", "ddp", "ddp_aa", "fsdp2_ring", "zero1", "zero3", "zero3_keep", "zero3_ds", "ds1"],
            "calib_reps": 1,
            "mem_mb": 4,
            "comm_mb": 0.5}
    return run_rank(rank, world, opts)


def test_protocol_smoke_two_ranks():
    from harness import run_ranks

    from benchmarks.proto_report import analyse, markdown, text
    rec, rec1 = run_ranks(_smoke, 2)
    assert rec["times"] == rec1["times"]                       # the slowest rank's time, the same everywhere
    names = list(rec["times"])
    assert all(len(v) == 2 and min(v) > 0 for v in rec["times"].values())
    for r, order in enumerate(rec["orders"]):                  # shuffled by the recorded seed
        want = list(range(len(names)))
        random.Random(5 + r).shuffle(want)
        assert order == [names[i] for i in want]
    try:
        import deepspeed  # noqa: F401
    except Exception:
        assert "ds1" in rec["skipped"] and "deepspeed" in rec["skipped"]["ds1"]
    assert max(rec["loss_gap"].values()) <= 1e-5
    assert rec["losses"]["ddp"][0] == pytest.approx(math.log(128), abs=0.2)    # untrained: ≈ ln V
    psi = rec["rows"]["ddp"]["comm"]["all_reduce"]["wire_bytes"] / (2 * (2 - 1) / 2 * 4)
    kw = rec["model"]
    h, L, V, s = kw["n_embd"], kw["n_layer"], kw["vocab_size"], kw["seq_len"]
    assert psi == V * h + s * h + L * (12 * h * h + 13 * h) + 2 * h    # DDP theory bytes 2(N−1)/N·Ψ·4, Ψ of the GPT
    # FSDP2 (blocks resharded after forward, the root not): all-gathers 2L + 1, reduce-scatters L + 1,
    # counted by our CommStats through FSDP2's custom-collective hooks
    ring = rec["rows"]["fsdp2_ring"]["comm"]
    root = V * h + s * h + 2 * h
    assert ring["all_gather"]["calls"] == 2 * L + 1 and ring["reduce_scatter"]["calls"] == L + 1
    assert ring["all_gather"]["wire_bytes"] == 1 / 2 * (2 * (psi - root) + root) * 4
    assert ring["reduce_scatter"]["wire_bytes"] == 1 / 2 * psi * 4
    # zero3_keep keeps every unit from forward into backward (DeepSpeed ZeRO-3's default at this size): each of the
    # L + 1 units is all-gathered once a step, Ψ/2 · 4 bytes in all; zero3 (keep 2) gathers L − 1 blocks again
    keep = rec["rows"]["zero3_keep"]["comm_axes"]["dp"]["all_gather"]
    assert keep["calls"] == L + 1 and keep["wire_bytes"] == 1 / 2 * psi * 4
    # zero3_ds merges the units up to DeepSpeed's prefetch bucket (5e7 elements: the whole tiny model) and keeps it:
    # one all-gather and one reduce-scatter a step, the same Ψ/2 · 4 bytes each (padded to an even Ψ)
    ds = rec["rows"]["zero3_ds"]["comm_axes"]["dp"]
    assert ds["all_gather"]["calls"] == 1 and ds["reduce_scatter"]["calls"] == 1
    assert ds["all_gather"]["wire_bytes"] == ds["reduce_scatter"]["wire_bytes"] == (psi + psi % 2) // 2 * 4
    assert rec["rows"]["zero3_keep"]["comm_axes"]["dp"]["reduce_scatter"]["calls"] == L + 1
    z3 = rec["rows"]["zero3"]["comm_axes"]["dp"]["all_gather"]
    assert z3["calls"] == 2 * L and z3["wire_bytes"] > keep["wire_bytes"]
    an = analyse(rec, n_boot=100)
    assert an["rows"]["zero1"]["bytes"]["equal"] and an["rows"]["zero3"]["bytes"]["equal"]
    assert an["rows"]["zero3_keep"]["bytes"]["equal"] and "ds3" not in an["rows"]
    assert an["rows"]["zero3_ds"]["bytes"]["equal"], an["rows"]["zero3_ds"]["bytes"]   # the planner prices 1 unit
    assert an["aa"] is not None and an["rows"]["zero3"]["vs"]["ddp"]["verdict"] in ("tie", "faster", "slower")
    assert "noise band" in text(rec, an) and "host work per call" in text(rec, an)
    assert rec["calib_start"]["host.op_s"] > 0                   # fsdp2_ring's DTensor parameters: DTensor's figures
    assert rec["calib_start"]["host.dtensor_adamw_s"] > 0 and rec["calib_end"]["host.dtensor_op_s"] > 0   # (no tp row)
    # the tp chain figure (proto_calib.chained_all_reduce): one tp activation, per · world sequences × s × h fp32
    assert rec["calib_start"]["chain_bytes"] == 2 * 2 * s * h * 4 and "right after compute" in text(rec, an)
    # δ per interleaved repetition (benchmarks/proto_wait.py), in the normal calibration; no tp rows: no tp figure
    from benchmarks.proto_wait import WAIT_REPS
    assert rec["calib_start"]["wait.reps"] == rec["calib_end"]["wait.reps"] == WAIT_REPS
    assert "wait.gloo.call_s" not in rec["calib_start"] and "interleaved repetitions" in text(rec, an)
    # ds1/ds2 in the rows: gloo timed at their one flat message, Ψ·4 bytes (proto_calib, flat.gloo.*)
    assert rec["calib_start"]["flat_bytes"] == psi * 4 and rec["calib_start"]["flat.gloo.all_gather"] > 0
    assert "flat message" in text(rec, an)
    # and a fresh page's cost with them (DeepSpeed's per-step buffers: benchmarks/proto_ds.py; a figure, not asserted)
    assert "fresh_page_s" in rec["calib_start"] and "fresh_page_s" in rec["calib_end"]
    md = markdown([rec], [an], {"date": "d", "machine": "m", "commit": "c", "versions": "v", "command": "x"})
    assert "| zero1 |" in md and "gloo-specific" in md


def _smoke_mp(rank, world):
    sys.path.insert(0, ROOT)
    from benchmarks.proto_run import run_rank
    opts = {"size": "tiny", "per_rank_batch": 2, "rounds": 1, "warmup": 2, "seed": 5, "pin": False,
            "rows": ["ddp", "tp_dtensor", "tp_ours", "pp_torch", "pp_ours"], "calib_reps": 1, "mem_mb": 4,
            "comm_mb": 0.25}
    return run_rank(rank, world, opts)


@pytest.mark.slow
def test_model_parallel_peer_rows_two_ranks():
    """DTensor TP vs ours, torch Schedule1F1B vs our 1F1B: the same losses as DDP over the warm-up (the
    protocol asserts 1e-5), theory bytes for torch's rows, CommStats = planner bytes per axis for ours."""
    from harness import run_ranks

    from benchmarks.proto_report import analyse
    rec = run_ranks(_smoke_mp, 2, timeout=600)[0]
    assert not rec["skipped"] and max(rec["loss_gap"].values()) <= 1e-5, rec["loss_gap"]
    assert rec["calib_start"]["train_flops.tp2@4"] > 0            # the tp rows' compute rate: 2 × 2 sequences
    assert rec["calib_start"]["host.dtensor_adamw_s"] > 0 and rec["calib_end"]["host.dtensor_op_s"] > 0  # proto_host
    assert all(c["wait.dtensor.call_s.mean"] > 0 for c in (rec["calib_start"], rec["calib_end"]))  # DTensor's call
    kw = rec["model"]
    act = 2 * 2 * kw["seq_len"] * kw["n_embd"] * 4                  # the global batch's activations, fp32
    tp = rec["rows"]["tp_dtensor"]["comm"]["all_reduce"]
    assert tp["calls"] == 4 * kw["n_layer"] and tp["wire_bytes"] == 4 * kw["n_layer"] * act   # 2(N−1)/N = 1
    pp = rec["rows"]["pp_torch"]["comm"]["send_recv"]
    assert pp["calls"] == 2 and pp["wire_bytes"] == act              # 2 micro-batches of half the batch sent
    an = analyse(rec, n_boot=20)
    for name in ("tp_ours", "pp_ours"):
        b = an["rows"][name]["bytes"]
        assert b["equal"] and b["measured"], b


@pytest.mark.slow
def test_gpu_check_runs_as_a_cpu_smoke():
    import subprocess
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--size", "tiny",
                          "--steps", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    import torch
    if not torch.cuda.is_available():
        assert "no GPU was used" in out.stdout
    ok = 4 + 4 + torch.cuda.is_available()              # + gpu_check_cp's (its host-sync check: CUDA only)
    assert out.stdout.count("[ok]") == ok and "FAILED" not in out.stdout, out.stdout
