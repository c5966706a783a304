"""The wait of a blocking collective issued right after another, measured as a robust statistic
(benchmarks/proto_calib.py calls :func:`wait_figures` in every calibration; the planner reads it through
benchmarks/proto_report.py, chain_hardware, as δ: parallel/planning/time_terms.py).

Until session 12 δ = l_pair − l_rs − l_ag was the difference of three separately timed medians of tiny calls
(``lat.ring.all_reduce``: our ring's reduce-scatter then all-gather back to back; ``lat.ring.reduce_scatter``,
``lat.ring.all_gather`` alone), 21 repeats each, one op after the other. Each of the three is bimodal on the
protocol's machines (session 10/11 AMD EPYC, 2 ranks × 1 pinned core: an isolated tiny ring call takes 0.2 ms or
2–3.9 ms, the pair 2.5–4.2 or 5.3–7.3 ms), and the three medians fall into their modes independently: δ came out
−2.9 … +3.6 ms per calibration (session 11), 0.00–4.68 ms after proto_report's start/end rule.

Here the three are timed INTERLEAVED, ``reps`` times: per repetition i, after a barrier each, the reduce-scatter
alone (rs_i), the all-gather alone (ag_i) and the pair (pair_i), every time the slowest rank's. The planner reads
(benchmarks/proto_read.py)

    δ = median_i pair_i − (lower decile_i rs_i) − (lower decile_i ag_i)

and charges the ring's chained calls those fast-mode latencies, so a chained reduce-scatter + all-gather is priced
at the pair's median whichever mode the isolated calls fall into. Not the median of the per-repetition differences
d_i = pair_i − rs_i − ag_i: an isolated call stalls too, independently, and then its stall cancels the pair's —
with isolated calls stalled half the time (0.2 or 3.3 ms) and the pair stalled once (3.9 ms), d_i is 3.5, 0.4 or
−2.7 ms and its median 0.4, while the chained pair costs 3.9 (tests/test_proto_wait.py). Loaded (this session's
2-core machine, load 15–16; benchmarks/proto_wait_run.py, 5 repeats, benchmarks/results/wait_delta_*_loaded_*):
median d_i −1.75…0.11 ms (5M) and −1.12…−0.07 (50M) where the old δ was −1.99…−0.68 / −2.02…−0.19 (clamped to 0:
no wait charged) and the new one 1.49…4.69 / 3.01…4.35; what the planner charges a chained pair, old 5.69…6.40 /
4.09…8.08 ms, new 4.00…5.48 / 3.94…6.45. Under that load neither is tight; the idle protocol run will tell.

Figures (seconds):
* ``wait.ring.pair_s`` (+ ``.q25``, ``.q75``, ``.mean``): the pair's time over the repetitions, median first;
* ``wait.ring.rs_fast``, ``wait.ring.ag_fast``: the isolated calls' lower decile (their fast mode);
  ``wait.ring.rs_s``, ``wait.ring.ag_s``: their medians;
* ``wait.ring.pair`` (+ ``.q25``, ``.q75``, ``.mean``): the per-repetition differences d_i, recorded, not priced;
* ``wait.reps``: the number of repetitions.

The same repetitions time the tp question (is the wait of a tp all-reduce, issued from running compute, the
ring pair's δ?): ``wait.gloo.call_s`` — a tp-split MLP matmul then a blocking gloo all-reduce of one tp activation,
minus the matmul alone, per repetition: the call after compute, whole — and ``wait.gloo.after_mm``, that minus the
same all-reduce after a barrier (quartiles and mean each) — and, since session 13, ``wait.dtensor.call_s``: the
matmul then DTensor's call on the same message (a Partial → Replicate redistribute: proto_calib.tp_call), minus the
matmul alone. ``chain.gloo.all_reduce`` of proto_calib is the mean over 16 such calls in a row, timed apart from
the isolated call. Since session 13 the planner prices a tp call from
``wait.gloo.call_s.mean`` (ours) and ``wait.dtensor.call_s.mean`` (tp_dtensor), each beyond the isolated call
(benchmarks/proto_tp.py); records without them keep δ.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

__all__ = ["wait_figures", "figures", "WAIT_REPS", "per_rep_slowest", "summary"]

WAIT_REPS = 48      # interleaved repetitions: ~0.6 s idle on the AMD machine at 5M/50M tp messages


def per_rep_slowest(ts: list) -> list:
    """Per repetition, the slowest rank's time (max over ranks of a list of tuples of timings)."""
    t = torch.tensor(ts, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def summary(ds: list, key: str) -> dict:
    """``key``: median of ``ds``; ``key.q25``/``key.q75``: quartiles; ``key.mean``: mean."""
    q = statistics.quantiles(ds, n=4, method="inclusive")
    return {key: statistics.median(ds), f"{key}.q25": q[0], f"{key}.q75": q[2], f"{key}.mean": statistics.mean(ds)}


def _clock(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def wait_figures(rs, ag, tp_call=None, reps: int = WAIT_REPS, keep: list | None = None) -> dict:
    """The module docstring's figures. ``rs``, ``ag``: tiny ring reduce-scatter / all-gather callables (proto_calib's
    ``_op_fn``); ``tp_call``: (matmul, all-reduce) callables of the tp message, or None (no tp rows)."""
    if reps < 4:
        raise ValueError(f"wait_figures: reps = {reps} gives no quartiles: take at least 4 (default {WAIT_REPS})")

    def pair():
        rs()
        ag()
    for fn in (rs, ag, pair) + (tuple(f for f in tp_call if f) if tp_call else ()):
        fn()                                                   # warm-up (buffers, connections)
    mm, ar, dt = (tuple(tp_call) + (None,))[:3] if tp_call else (None, None, None)

    def after():
        mm()
        ar()

    def dt_after():
        mm()
        dt()
    rows = []
    for _ in range(reps):
        row = [_clock(rs), _clock(ag), _clock(pair)]
        if tp_call:
            row += [_clock(mm), _clock(ar), _clock(after)] + ([_clock(dt_after)] if dt else [])
        rows.append(row)
    rows = per_rep_slowest(rows)
    if keep is not None:                                       # the repetitions themselves (proto_wait_run.py)
        keep.extend(rows)
    return figures(rows)


def figures(rows: list) -> dict:
    """The ``wait.*`` figures (module docstring) from per-repetition slowest-rank timings ``rows``: (rs, ag, pair)
    each, or (rs, ag, pair, mm, all-reduce, mm then all-reduce) with the tp call, + (mm then DTensor's call) with
    DTensor's."""
    if len(rows) < 4 or any(len(r) not in (3, 6, 7) for r in rows) or len({len(r) for r in rows}) > 1:
        raise ValueError(f"wait figures: need >= 4 repetitions of 3, 6 or 7 timings each, got {len(rows)} rows of "
                         f"lengths {sorted({len(r) for r in rows})} (one length): time them with wait_figures")
    out = summary([r[2] - r[0] - r[1] for r in rows], "wait.ring.pair")
    out.update(summary([r[2] for r in rows], "wait.ring.pair_s"))
    for i, op in enumerate(("rs", "ag")):
        ts = [r[i] for r in rows]
        out[f"wait.ring.{op}_s"] = statistics.median(ts)
        out[f"wait.ring.{op}_fast"] = statistics.quantiles(ts, n=10, method="inclusive")[0]     # the fast mode
    if len(rows[0]) >= 6:
        out.update(summary([r[5] - r[3] - r[4] for r in rows], "wait.gloo.after_mm"))
        out.update(summary([r[5] - r[3] for r in rows], "wait.gloo.call_s"))    # the call after compute, whole
    if len(rows[0]) == 7:
        out.update(summary([r[6] - r[3] for r in rows], "wait.dtensor.call_s"))    # DTensor's, the same way
    out["wait.reps"] = float(len(rows))
    return out
