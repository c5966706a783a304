"""Why a protocol row's step is N × its floor: step ÷ floor decomposed into named factors (issue 18, "where a target
is not met … explain with numbers why the floor is unreachable"). Read-only on recorded runs:

    python benchmarks/proto_floor.py benchmarks/results/protocol_2026-12-04_session12.json \
        benchmarks/results/protocol_mp_2026-12-04_session12b.json --rows pp_1f1b_m8 tp_ours fsdp2
    python benchmarks/proto_floor.py benchmarks/results/protocol_2026-12-04_session12.json --rows fsdp2_ring \
        --host-from benchmarks/results/protocol_mp_2026-12-04_session12.json   # DTensor figures part B lacks

The floor is benchmarks/proto_report.py's (unchanged): F = C + M + O, compute C = per-rank FLOPs / the calibrated
matmul rate, communication M = Σ calls·latency + wire / bandwidth, optimizer O = owned · 28 B / memory bandwidth.
Each named cause replaces one of its terms by what the calibration says actually runs, and its factor is the new
total ÷ the one before, so the factors multiply to step ÷ floor exactly (a telescoping product):

1. ``eager``: C at ``train_flops`` (the model's own forward + backward at the per-rank batch: norms, softmax, GELU,
   cross-entropy and autograd run at ~70 % of the matmul rate) instead of the matmul rate;
2. ``shape``: at the row's own shape — ``train_flops@m`` for a pipeline micro-batch of m sequences,
   ``train_flops.tp<t>@m`` at the tp-split shapes (Hardware.rate); 1 where the record has no such figure;
3. pipelines only, the schedule simulated by the planner (parallel/planning/cost.py, step_time) on the row's stage
   costs with every message free: ``acct`` the planner's stage FLOPs ÷ the floor's (1 up to rounding), ``iw_split``
   the zero-bubble I + W costing (split_i + split_w) × a plain B (calibrated ``split_*@m``), ``bubble`` the
   schedule's own idle share at equal unit costs (parallel/pipeline/simulate.py's default costs: 1F1B p = 2, m = 8:
   (m + p − 1)/m = 9/8), ``imbalance`` the rest of makespan ÷ mean busy: unequal stages (the head on the last),
   I/W timing;
4. ``adamw``: O at torch's single-tensor AdamW, 88 B per owned element (time_terms.OPT_MOVED, write-allocates at
   12/16: time_terms.memory_seconds) instead of a fused 28.

Their product is the **reachable floor** ÷ floor: eager kernels, the row's shapes and schedule, torch's AdamW, the
communication floor unchanged. Beyond it, from the planner's prediction (proto_report.predict_row):
``bookkeeping`` (its update beyond AdamW: the norm, gradient copies, the accumulation of m micro-batches, a peer's
own bytes), ``dtensor`` (tp_dtensor's per-call host work and replicated head, FSDP2's DTensor AdamW:
benchmarks/proto_host.py), ``waits`` (what the planner's step loses when its per-call waits — δ/2 per pipeline
message and ring call, δ per tp all-reduce — are zeroed), ``placement`` (the rest of the planner: communication
placed in the schedule or hidden under backward instead of the floor's serial sum), and ``residual`` = step ÷ the
planner's step, the part no named cause explains (flagged beyond ±10 %).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
from unittest import mock

if __name__ == "__main__":                      # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import proto_report as pr
from benchmarks.proto_host import FSDP2_ROWS, dtensor_host_seconds, dtensor_tp_seconds
from parallel.pipeline.schedules import get_schedule
from parallel.pipeline.simulate import simulate
from parallel.planning.cost import step_time
from parallel.planning.planner import stage_bounds
from parallel.planning.spec import Layout, TrainSpec
from parallel.planning.time_terms import OPT_MOVED, memory_seconds

__all__ = ["REACH", "BEYOND", "UNEXPLAINED", "ideal_bubble", "decompose", "with_host", "table"]

REACH = ("eager", "shape", "acct", "iw_split", "bubble", "imbalance", "adamw")      # → the reachable floor
BEYOND = ("bookkeeping", "dtensor", "placement", "waits", "residual")               # → the measured step
UNEXPLAINED = 0.10              # |residual − 1| beyond this: the named causes do not explain the row


def ideal_bubble(lay: Layout):
    """makespan ÷ mean busy of the row's schedule at the simulator's equal unit costs (F = I = W = 1, B = 2), a
    Fraction: (m + p − 1)/m for 1F1B and GPipe, (3m + p − 1)/(3m) for ZB-H1 at m ≥ p; 1 without a pipeline."""
    if lay.pp == 1:
        return 1
    sim = simulate(get_schedule(lay.schedule, lay.pp, lay.micro_batches, lay.v))
    return 1 / (1 - sim.bubble)


def _free_comm(hw):
    """``hw`` with every message free: no latency, unbounded bandwidth, no waits (the schedule's compute alone)."""
    return dataclasses.replace(hw, latency_s=0.0, bandwidth=float("inf"), op_latency=(), op_bandwidth=(),
                               chain_bandwidth=(), chain_wait_s=0.0, call_wait_s=0.0, p2p_wait_s=0.0)


@contextlib.contextmanager
def _no_waits():
    """proto_report's planner with the per-call waits zeroed (``chain_wait_s``, ``call_wait_s``, ``p2p_wait_s``)."""
    real = pr.row_hardware
    with mock.patch.object(pr, "row_hardware", lambda *a, **k: dataclasses.replace(
            real(*a, **k), chain_wait_s=0.0, call_wait_s=0.0, p2p_wait_s=0.0)):
        yield


def _pipeline(rec: dict, lay: Layout, hw) -> dict:
    """Seconds of the row's schedule with free messages: its makespan and mean busy time per rank, with the
    calibrated I/W split (``split``) and without (``plain``: I + W = B)."""
    spec = pr.model_spec(rec["model"])
    mb = rec["per_rank_batch"] * lay.pp // lay.micro_batches         # dp = 1 on every pipeline row
    tr = TrainSpec(global_batch=rec["per_rank_batch"] * lay.pp, keep=0)
    bounds = stage_bounds(spec, lay.tp, lay.pp, lay.v)
    out = {}
    for key, h in (("split", _free_comm(hw)), ("plain", dataclasses.replace(_free_comm(hw), split_frac=()))):
        span, bubble = step_time(spec, lay, tr, h, bounds, mb, {})
        out[key] = (span, span * (1 - bubble))
    return out


def decompose(rec: dict, name: str, cal: dict | None = None) -> dict:
    """Row ``name`` of record ``rec`` (calibration ``cal``, default proto_report.calib_mean): floor, reachable
    floor, planner, median step; ``terms`` the running total after each named cause (seconds), ``factors`` each
    total ÷ the one before (module docstring); their product is step ÷ floor. A factor is a ratio of totals, so a
    term's own multiplier shows diluted by the others (1F1B's 9/8 on compute is 1.12 of the 5M total).
    ``pipeline``: {"split" | "plain": (makespan, mean busy per rank)} with messages free; ``compute``: C at the eager
    and at the shape rate; ``waits_s``: the planner's per-call waits on the critical path."""
    cal = cal or pr.calib_mean(rec)
    meta, kw = rec["rows"][name], rec["model"]
    lay = Layout(**meta["layout"])
    fl = pr.floors(rec, name, cal)
    hw = pr.row_hardware(rec, name, cal)
    step = statistics.median(rec["times"][name])
    mb = rec["per_rank_batch"] * lay.dp * lay.tp * lay.pp // (lay.dp * lay.micro_batches)
    c_eager = fl["flops"] / cal.get("train_flops", cal["matmul_flops"])
    c_shape = fl["flops"] / hw.rate(mb * kw["seq_len"], lay.tp)
    steps = [("floor", fl["total"]), ("eager", fl["total"] - fl["compute"] + c_eager)]
    steps.append(("shape", steps[-1][1] - c_eager + c_shape))
    c, pp = c_shape, {}
    if lay.pp > 1:
        pp = _pipeline(rec, lay, hw)
        ideal = float(ideal_bubble(lay))
        for key, new in (("acct", pp["plain"][1]), ("iw_split", pp["split"][1]), ("bubble", pp["split"][1] * ideal),
                         ("imbalance", pp["split"][0])):
            steps.append((key, steps[-1][1] - c + new))
            c = new
    else:
        steps += [(k, steps[-1][1]) for k in ("acct", "iw_split", "bubble", "imbalance")]
    adamw = memory_seconds(meta["owned"] * OPT_MOVED["adamw"], hw)
    steps.append(("adamw", steps[-1][1] - fl["optimizer"] + adamw))
    reach = steps[-1][1]
    pred = pr.predict_row(rec, name, cal).step_s
    with _no_waits():
        flat = pr.predict_row(rec, name, cal)
        nw = pr.row_hardware(rec, name, cal)
    dt = dtensor_tp_seconds(rec, cal, nw) if name == "tp_dtensor" else \
        (dtensor_host_seconds(cal, kw["n_layer"], name) or 0.0) if name in FSDP2_ROWS else 0.0
    steps += [("bookkeeping", reach + flat.update_s - adamw), ("dtensor", reach + flat.update_s - adamw + dt),
              ("placement", flat.step_s), ("waits", pred), ("residual", step)]
    totals = dict(steps)
    factors = {k: t / prev for (_, prev), (k, t) in zip(steps, steps[1:])}
    return {"name": name, "step": step, "floor": fl["total"], "floors": fl, "reachable": reach, "planner": pred,
            "terms": totals, "factors": factors, "ratio": step / fl["total"], "over_reachable": step / reach,
            "ideal_bubble": ideal_bubble(lay), "unexplained": abs(factors["residual"] - 1) > UNEXPLAINED,
            "waits_s": pred - flat.step_s, "pipeline": pp, "compute": {"eager": c_eager, "shape": c_shape}}


def with_host(rec: dict, donors: list) -> tuple:
    """``rec``'s calibration (proto_report.calib_mean) with the host figures it lacks (``host.*``: DTensor's per-call
    and per-parameter AdamW work, benchmarks/proto_host.py) taken from the same size's record among ``donors`` —
    e.g. the model-parallel part run on the same machine and commit minutes apart: (calibration, borrowed keys); a
    record that has them all keeps its own."""
    cal = pr.calib_mean(rec)
    donor = next((d for d in donors if d["size"] == rec["size"]), None)
    got = {k: v for k, v in pr.calib_mean(donor).items() if k.startswith("host.") and k not in cal} if donor else {}
    return {**cal, **got}, sorted(got)


def table(rec: dict, rows=None, donors=()) -> list:
    """Printed lines of :func:`decompose` for ``rows`` of ``rec`` (all by default): a header, two per row;
    ``donors``: records lending host figures (:func:`with_host`)."""
    cal, borrowed = with_host(rec, list(donors))
    out = [f"== {rec['size']} part {rec.get('part', 0)}: ms floor → reachable → planner → step; step ÷ floor = "
           f"Π factors (ms each adds)" + (f"; borrowed {', '.join(borrowed)}" if borrowed else "")]
    for name in [n for n in rows or rec["times"] if n in rec["times"]]:
        d = decompose(rec, name, dict(cal))
        f = d["factors"]
        t, prev = d["terms"], dict(zip(REACH + BEYOND, ("floor",) + REACH + BEYOND))
        named = " ".join(f"{k} {f[k]:.3f} ({(t[k] - t[prev[k]]) * 1e3:+.1f})" for k in REACH + BEYOND
                         if abs(f[k] - 1) >= 5e-4)
        out.append(f"  {name:15s} {d['floor'] * 1e3:7.1f} → {d['reachable'] * 1e3:7.1f} → {d['planner'] * 1e3:7.1f} "
                   f"→ {d['step'] * 1e3:7.1f}  step÷floor {d['ratio']:.2f}  step÷reachable {d['over_reachable']:.2f}"
                   f"{'  UNEXPLAINED' if d['unexplained'] else ''}")
        out.append(f"  {'':15s} = {named}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="step ÷ floor per row of recorded protocol runs, decomposed")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--rows", nargs="*", help="only these rows (default: every row of each record)")
    ap.add_argument("--host-from", nargs="*", default=[], help="record files lending host.* figures to records "
                                                                 "without them (same size; with_host)")
    a = ap.parse_args(argv)
    donors = []
    for path in a.host_from:
        with open(path) as fh:
            donors += json.load(fh)["records"]
    for path in a.files:
        with open(path) as fh:
            data = json.load(fh)
        print(os.path.basename(path))
        for rec in data["records"]:
            lines = table(rec, a.rows, donors)
            if len(lines) > 1:
                print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
