"""The price of a tp all-reduce on session 12's recorded MP runs (benchmarks/results/protocol_mp_2026-12-04_session12
.json and ..._session12b.json, idle, AMD EPYC, 2 ranks × 1 pinned core; not fixtures: read as recorded).

Until session 13 the planner charged each blocking tp all-reduce the ring pair's δ beyond the isolated call (3.2–5.0
ms on these records): tp_ours came out 1.27–1.28 × the measured step at 5m on both records and 1.28 at 50m on the
first. The calibration also times that call directly — a gloo all-reduce of the tp message right after a tp-split
matmul, 48 interleaved repetitions — and its mean is 1.3–2.2 ms above the isolated call (benchmarks/proto_tp.py,
parallel/planning/time_terms.py, tp_waits). Priced at that figure, and with the tp-split rate at the faster of start
and end (proto_report.calib_mean), both tp rows land within 1 ± 0.15 on both records at both sizes.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MS = 1e-3
FILES = [os.path.join(ROOT, "benchmarks", "results", f"protocol_mp_2026-12-04_session1{s}.json")
         for s in ("2", "2b", "3")]       # session 13: the first idle run with tp_dtensor's own call figure


def _records():
    for path in FILES:
        with open(path) as f:
            for rec in json.load(f)["records"]:
                yield os.path.basename(path), rec


def test_tp_rows_within_the_band_on_session_12_mp_records():
    from benchmarks.proto_report import calib_mean, predict_row
    got = {}
    for name, rec in _records():
        cal = calib_mean(rec)
        for row in ("tp_ours", "tp_dtensor"):
            med = statistics.median(rec["times"][row])
            got[f"{name}/{rec['size']}/{row}"] = predict_row(rec, row, cal).step_s / med
    assert len(got) == 12
    bad = {k: round(v, 3) for k, v in got.items() if not 0.85 <= v <= 1.15}
    assert not bad, f"tp rows' planner ÷ measured outside [0.85, 1.15]: {bad}"


def test_tp_call_is_priced_at_the_call_timed_after_a_tp_matmul(monkeypatch):
    """Our tp call: the interleaved mean of the call after a tp matmul minus the isolated call (what cost.py charges
    already); 29 calls a step at 5m and 69 at 50m (CommStats: 4 per block + the embedding's, the head's, the loss's
    two and the gradient norm's), the 4L + 4 of forward + backward waited (time_terms.tp_waits; the norm's call runs
    in the update). tp_dtensor keeps the ring pair's δ (no DTensor call figure in these records): its step is the
    same with every row's call priced at δ, while tp_ours's grows by (δ − wait) per waited call."""
    import dataclasses

    from benchmarks import proto_report as pr
    from benchmarks.proto_report import calib_mean, chain_hardware, hardware, predict_row
    from benchmarks.proto_tp import CALL, isolated_call
    charged, at_delta = {}, {}
    for name, rec in _records():
        cal, L = calib_mean(rec), rec["model"]["n_layer"]
        assert rec["rows"]["tp_ours"]["comm"]["all_reduce"]["calls"] == 4 * L + 5
        delta = 2 * chain_hardware(cal, "gloo", rec["world"])[0]
        w = hardware(cal, "gloo", rec["world"], rec["model"]["seq_len"]).call_wait_s
        assert w == pytest.approx(cal[CALL] - isolated_call(cal, rec["world"]), rel=1e-12)
        at_delta[name, rec["size"]] = {r: predict_row(rec, r, cal).step_s for r in ("tp_ours", "tp_dtensor")}
        at_delta[name, rec["size"]]["w"] = w
        charged[f"{name}/{rec['size']}"] = round(w / MS, 2), round(delta / MS, 2)
    assert charged == {"protocol_mp_2026-12-04_session12.json/5m": (1.31, 4.2),
                       "protocol_mp_2026-12-04_session12.json/50m": (1.66, 3.18),
                       "protocol_mp_2026-12-04_session12b.json/5m": (2.23, 5.02),
                       "protocol_mp_2026-12-04_session12b.json/50m": (1.94, 3.52),
                       "protocol_mp_2026-12-04_session13.json/5m": (1.69, 2.99),
                       "protocol_mp_2026-12-04_session13.json/50m": (1.61, 3.43)}
    monkeypatch.setattr(pr, "hardware", lambda cal, *a: dataclasses.replace(
        hardware(cal, *a), call_wait_s=2 * chain_hardware(cal, "gloo", 2)[0]))          # every row at δ
    for (_, rec), steps in zip(_records(), at_delta.values()):
        cal, L = calib_mean(rec), rec["model"]["n_layer"]
        assert predict_row(rec, "tp_dtensor", cal).step_s == pytest.approx(steps["tp_dtensor"], rel=1e-12)
        extra = (2 * chain_hardware(cal, "gloo", 2)[0] - steps["w"]) * (4 * L + 4)   # the norm's call is not waited
        assert predict_row(rec, "tp_ours", cal).step_s - steps["tp_ours"] == pytest.approx(extra, rel=1e-9)
    monkeypatch.undo()
    old = {k: v for k, v in calib_mean(next(_records())[1]).items() if k != CALL}     # a record before the figure
    assert hardware(old).call_wait_s == pytest.approx(2 * chain_hardware(old, "gloo", 2)[0], rel=1e-12)


def test_dtensor_call_priced_at_its_own_figure_where_calibrated():
    """Calibrations since session 13 time DTensor's call too (``wait.dtensor.call_s``: the matmul then a Partial →
    Replicate redistribute, proto_calib.tp_call); the tp_dtensor row is then charged that beyond the isolated call
    per waited call (its 4L: benchmarks/proto_host.py), not δ. Synthetic figure on a session-12 record."""
    from benchmarks.proto_report import calib_mean, chain_hardware, predict_row
    from benchmarks.proto_tp import DTENSOR_CALL, isolated_call
    name, rec = next(_records())
    cal, L = calib_mean(rec), rec["model"]["n_layer"]
    delta = 2 * chain_hardware(cal, "gloo", rec["world"])[0]
    fig = isolated_call(cal, rec["world"]) + 3.0 * MS
    old = predict_row(rec, "tp_dtensor", cal).step_s
    new = predict_row(rec, "tp_dtensor", {**cal, DTENSOR_CALL: fig}).step_s
    assert new - old == pytest.approx((3.0 * MS - delta) * 4 * L, rel=1e-9)
    assert predict_row(rec, "tp_ours", {**cal, DTENSOR_CALL: fig}).step_s == predict_row(rec, "tp_ours", cal).step_s
