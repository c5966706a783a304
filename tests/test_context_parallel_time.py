"""The planner's cp step-time term (parallel/planning/context.py: cp_seconds): the ring's K/V and accumulator
sends hide under its block compute, Ulysses' all-to-alls show whole; no processes."""
import dataclasses

import pytest
from engine_cases import config

from launch.dry_run import _meta_model, planner_inputs
from parallel.planning.context import cp_per_step, cp_seconds, local_spec
from parallel.planning.planner import stage_bounds
from parallel.planning.spec import Hardware


def _inputs(algorithm, cp=2):
    cfg = config("gpt", [f"parallel.cp={cp}", f"parallel.cp_algorithm={algorithm}"])
    spec, lay, tr = planner_inputs(cfg, _meta_model(cfg), device="cpu")
    bounds = stage_bounds(spec, lay.tp, lay.pp, lay.v, lay.ep)
    return local_spec(spec, lay), lay, tr, bounds, cfg.data.global_batch_size // (lay.dp * lay.micro_batches)


def _unhidden(loc, lay, tr, bounds, mb, hw):
    ops = cp_per_step(loc, dataclasses.replace(lay, micro_batches=1), tr, [0], bounds, mb)["cp"]
    return sum(c["calls"] * hw.lat(op) + c["wire_bytes"] / hw.bw(op) for op, c in ops.items())


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_hides_sends_under_block_compute_ulysses_does_not(cp):
    for algorithm in ("ring", "ulysses"):
        loc, lay, tr, bounds, mb = _inputs(algorithm, cp)
        fast = Hardware(peak_flops=1e30, bandwidth=1e6, latency_s=1e-4)       # compute free: all shows
        slow = Hardware(peak_flops=1.0, bandwidth=1e6, latency_s=1e-4)        # compute dominates
        full = _unhidden(loc, lay, tr, bounds, mb, fast)
        assert full > 0
        assert cp_seconds(loc, lay, tr, [0], bounds, mb, fast) == pytest.approx(full, rel=1e-9), algorithm
        hidden = cp_seconds(loc, lay, tr, [0], bounds, mb, slow)
        assert hidden == (0.0 if algorithm == "ring" else pytest.approx(full, rel=1e-9)), algorithm
    # in between, per ring step: max(0, send − compute); the forward's K‖V send (2M bytes) against
    # c = 4·β·n²·h/t FLOPs / peak, the backward's K‖V + fp32 dK‖dV against 2c
    loc, lay, tr, bounds, mb = _inputs("ring", cp)
    n, h, L = loc.seq, loc.hidden, bounds[0][1] - bounds[0][0]
    kv = 2 * mb * (loc.kv_heads or loc.heads) * n * (h // loc.heads) * 4
    hw = Hardware(peak_flops=4 * mb * n * n * h / 1e-3, bandwidth=kv / 1.5e-3, latency_s=0.0)   # c = 1 ms, send 1.5
    want = (cp - 1) * L * ((1.5e-3 - 1e-3) + (1.5e-3 + 1.5e-3 - 2e-3))
    assert cp_seconds(loc, lay, tr, [0], bounds, mb, hw) == pytest.approx(want, rel=1e-9)
