"""The planner's time model on session 13's idle protocol runs (AMD EPYC, 2 ranks × 1 pinned core, 2026-12-04
22:41–23:20): benchmarks/results/protocol_2026-12-04_session13.json (A5 90 rounds, A50 30 rounds, B),
…_session13_B5.json (B at 5m again, FSDP2 rows with DTensor's host figures), …_session13_B2.json (B again, both
sizes), protocol_mp_… (tp/pp rows), protocol_ds_… (DeepSpeed rows). Not fixtures: read as recorded.

Every row within 1 ± 0.15 (issue 18's target) except :data:`KNOWN_GAPS`, each asserted at its value with the reason:
* B 5m fsdp2_ring 0.83: that calibration timed no DTensor host figures (only runs with a tp row did), so FSDP2's
  AdamW over DTensor parameters (76 × 0.13 ms) was not priced; the calibration times them with FSDP2 rows since
  (proto_run: ``dtensor``) and B5 / B2 price it: 0.90 / 0.88;
* B5 5m pp_zbv_m8 1.17: a drift-flagged part (the pipeline rows' step from the end calibration vs the start one
  +13.5 %: the ring pair's wait δ, δ/2 per pipeline message, moved between its modes); B 1.09, B2 1.14.
The DS 50m part's ds1 / ds2 / ds3 are in (0.90 / 0.89 / 0.94) only with a fresh page's cost taken at the larger of
its start and end readings (proto_report.calib_mean; tests/test_proto_ds.py).
"""
from __future__ import annotations

import os
import sys

from test_bench_protocol_s11 import assert_in_band, planner_ratios

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FILES = {f"{k}{s}": os.path.join(ROOT, "benchmarks", "results", f"protocol{k}_2026-12-04_session13{s}.json")
         for k, s in (("", ""), ("", "_B5"), ("", "_B2"), ("_mp", ""), ("_ds", ""))}
KNOWN_GAPS = {"/5m@2/fsdp2_ring": 0.832, "_B5/5m@0/pp_zbv_m8": 1.169}


def test_planner_on_session_13_records():
    got = planner_ratios(FILES)
    assert len(got) == (8 + 8 + 9 + 9) + 9 + (9 + 9) + (6 + 6) + (10 + 9)
    assert_in_band(got, KNOWN_GAPS)
