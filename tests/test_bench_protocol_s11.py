"""The planner's time model on session 11's idle protocol runs (AMD EPYC, 2 ranks × 1 pinned core):
benchmarks/results/protocol_2026-12-04_session11.json (A/B parts), protocol_mp_… (tp/pp rows), protocol_ds_…
(DeepSpeed rows). Not fixtures (the lead decides); read from benchmarks/results/ as recorded.

Every row within 1 ± 0.15 except :data:`KNOWN_GAPS`, each asserted at its value with the reason it is out:
* mp 5m ddp / ddp_aa 1.20: no wait term in these rows; the record's start calibration ran slow (train_flops 60.5
  GFLOP/s at the start, 72.5 at the end; session 10's MP 5m: 75.9 / 77.1), so the compute is over-priced;
* mp 5m tp_dtensor 0.72, tp_ours 0.80, mp 50m tp_ours 1.18: the wait δ per tp call from three separately timed
  bimodal medians — 0.73 ms at 5M (both isolated ring calls stalled at both ends: rs 3.13, ag 3.39, pair 7.25 ms),
  4.68 ms at 50M — where the rows paid 2.0 / 1.15 ms a call (tp_ours; 2.3–2.6 on sessions 8/10). Records since
  session 12 calibrate δ from interleaved repetitions (benchmarks/proto_wait.py); this one keeps the old reading;
* b 5m fsdp2_ring 0.84: FSDP2 over our ring measured 228 ms, FSDP2 over gloo 229 — the ring saved nothing at 5M
  (1.6 MB a call) while the planner prices its calls at the ring pair's incremental bandwidth (1.03 GB/s against
  gloo's 0.35 / 0.63): 37 ms missing over 20 calls, 1.85 ms a call, not priced (sessions 9/10: 0.77 / 0.88);
* (until session 13: ds 50m ds1 / ds2 0.80 / 0.83, 0.73 / 0.76 before their counted all-reduce was priced; with
  DeepSpeed's own memory passes and fresh pages priced, benchmarks/proto_ds.py, 1.05 / 1.07: in band, no longer a gap).
"""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FILES = {k: os.path.join(ROOT, "benchmarks", "results", f"protocol{k}_2026-12-04_session11.json")
         for k in ("", "_mp", "_ds")}
# tp rows: 0.722 / 0.810 / 1.193 until session 13, when proto_report.calib_mean took the tp-split rate
# (train_flops.tp2@8) at the faster of start and end instead of their mean (interference only slows a pinned core);
# ds1 / ds2 at 50m (0.800 / 0.830) left the list in session 13: benchmarks/proto_ds.py prices DeepSpeed's extra passes
KNOWN_GAPS = {"_mp/5m@0/ddp": 1.197, "_mp/5m@0/ddp_aa": 1.196, "_mp/5m@0/tp_dtensor": 0.717,
              "_mp/5m@0/tp_ours": 0.804, "_mp/50m@0/tp_ours": 1.182, "/5m@2/fsdp2_ring": 0.838}


def planner_ratios(files: dict) -> dict:
    """{"<kind>/<size>@<part>/<row>": the planner's step ÷ the measured median} over every record of ``files``
    ({kind: path}), as proto_report.analyse reads them."""
    from benchmarks.proto_report import analyse
    got = {}
    for kind, path in files.items():
        with open(path) as f:
            for rec in json.load(f)["records"]:
                an = analyse(rec, n_boot=10)
                got.update({f"{kind}/{rec['size']}@{rec.get('part', 0)}/{n}": r["pred_over_measured"]
                            for n, r in an["rows"].items()})
    return got


def assert_in_band(got: dict, known: dict, band: float = 0.15) -> None:
    """Every ratio within 1 ± ``band`` but the named gaps ``known``, each at its value (to 2e-3)."""
    bad = {k: round(v, 3) for k, v in got.items() if abs(v - 1) > band and k not in known}
    assert not bad, f"planner ÷ measured outside 1 ± {band}: {bad}"
    assert {k: got[k] for k in known} == pytest.approx(known, abs=2e-3)


def test_planner_on_session_11_records():
    got = planner_ratios(FILES)
    assert len(got) == 8 + 8 + 9 + 9 + 6 + 6 + 9 + 9
    assert_in_band(got, KNOWN_GAPS)
