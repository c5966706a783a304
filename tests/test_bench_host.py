"""Host work per call (benchmarks/proto_host.py): the DTensor TP row's calls counted per block, the calibration of
their per-call cost, and the planner's term on a record (counts exact; the calibrated seconds only positive)."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _dtensor_counts(rank, world, n_layer, name="tp_dtensor"):
    sys.path.insert(0, ROOT)
    from torch.utils._python_dispatch import TorchDispatchMode

    from benchmarks import proto_rows
    kw = dict(n_embd=32, n_layer=n_layer, n_head=4, vocab_size=64, seq_len=16)
    row = proto_rows.build(name, kw, 2, world, rank)

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += any(t.__name__ == "DTensor" for t in types)
            return func(*args, **(kwargs or {}))
    for _ in range(2):                    # warm-up: the optimizer's states exist from the first step on
        row.step()
    with Count():
        row.step()
    return Count.n, row.owned


@pytest.mark.parametrize("n_layer", [1, 3])
def test_dtensor_row_calls_per_block(n_layer):
    """One step of torch's DTensor TP row: L · (8 DTensor parameters × 8 AdamW calls + 64 other calls),
    the count the planner's term multiplies (5M: 768 = 6 · 128, 50M: 2048 = 16 · 128 counted by proto_pair)."""
    from harness import run_ranks

    from benchmarks.proto_host import ADAMW_CALLS_PER_PARAM, DTENSOR_FB_CALLS_PER_BLOCK, DTENSOR_PARAMS_PER_BLOCK
    got = run_ranks(_dtensor_counts, 2, n_layer)
    per_block = DTENSOR_PARAMS_PER_BLOCK * ADAMW_CALLS_PER_PARAM + DTENSOR_FB_CALLS_PER_BLOCK
    assert per_block == 128 and [n for n, _ in got] == [n_layer * per_block] * 2, got


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_ring"])
def test_fsdp2_rows_update_dtensor_parameters(name):
    """FSDP2's step: 8 AdamW calls on each of the GPT's 12L + 4 parameters (DTensors, Shard(0)), none in forward or
    backward (5M: 608 = 76 · 8 counted by proto_pair)."""
    from harness import run_ranks

    from benchmarks.proto_host import ADAMW_CALLS_PER_PARAM
    L = 2
    got = run_ranks(_dtensor_counts, 2, L, name)
    assert [n for n, _ in got] == [(12 * L + 4) * ADAMW_CALLS_PER_PARAM] * 2, got


def _host_figures(rank, world):
    sys.path.insert(0, ROOT)
    from benchmarks.proto_host import calibrate_host
    return calibrate_host(True, reps=1, calls=200, params=4)


def test_host_calibration_figures():
    from harness import run_ranks
    a, b = run_ranks(_host_figures, 2)
    assert a == b                                        # the slowest rank's, the same on both
    assert set(a) == {"host.op_s", "host.dtensor_op_s", "host.dtensor_adamw_s"}
    assert 0 < a["host.op_s"] < a["host.dtensor_op_s"] and a["host.dtensor_adamw_s"] > 0


def test_dtensor_host_term_on_a_record():
    """predict_row charges tp_dtensor L · (8 · host.dtensor_adamw_s + 64 · host.dtensor_op_s) where the record has
    the figures, nothing where it does not (every record before them), and no other row anything."""
    from benchmarks.proto_host import dtensor_host_seconds
    from benchmarks.proto_report import calib_mean, predict_row
    with open(os.path.join(ROOT, "tests", "data", "bench_protocol_mp.json")) as f:
        recs = json.load(f)["records"]
    for rec in recs:
        cal, L = calib_mean(rec), rec["model"]["n_layer"]
        assert dtensor_host_seconds(cal, L) is None
        host = {**cal, "host.dtensor_adamw_s": 1e-3, "host.dtensor_op_s": 2e-5, "host.op_s": 1e-6}
        for name in rec["times"]:
            d = predict_row(rec, name, host).step_s - predict_row(rec, name, cal).step_s
            want = L * (8 * 1e-3 + 64 * 2e-5) if name == "tp_dtensor" else 0.0
            assert d == pytest.approx(want, rel=1e-9, abs=1e-15), (name, d)
    with open(os.path.join(ROOT, "tests", "data", "bench_protocol.json")) as f:
        recs = [r for r in json.load(f)["records"] if "fsdp2" in r["times"]]
    for rec in recs:                                       # the FSDP2 rows: (12L + 4) parameters' updates
        cal, L = calib_mean(rec), rec["model"]["n_layer"]
        host = {**cal, "host.dtensor_adamw_s": 1e-3, "host.dtensor_op_s": 2e-5, "host.op_s": 1e-6}
        for name in rec["times"]:
            d = predict_row(rec, name, host).step_s - predict_row(rec, name, cal).step_s
            want = (12 * L + 4) * 1e-3 if name.startswith("fsdp2") else 0.0
            assert d == pytest.approx(want, rel=1e-9, abs=1e-15), (name, d)
