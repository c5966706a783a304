"""Pipeline wall clock and idle time per rank: 1F1B vs ZB-H1 vs ZB-V, measured against the schedule simulator.

    python benchmarks/pp_idle.py --size 5m --rounds 5          # pp = 2, m = 8 (issue 19 item 3)
    python benchmarks/pp_idle.py --size tiny --schedules 1f1b zero_bubble

Each schedule gets its own engine (the same seeded GPT of benchmarks/proto_run.py's SIZES, pp = 2 over
gloo, one thread per rank, AdamW, global batch ``per · 2`` sequences in m micro-batches); after
``--warmup`` steps the schedules take turns, one step each, for ``--rounds`` rounds (paired: a
round's ratios share the machine's state). Per schedule and rank it reports:

* step: the median ``train_step`` wall time; the paired ratio to 1F1B (median over rounds, min–max);
* the executor's own time per action kind (median seconds per action: F, B, I, W — what ``Record.compute_s``
  measures: after the action's receives are in, until its output is ready; the sends go out with the
  next action's receives) and ``exchange``: the time in :meth:`PipelineExecutor._exchange` per action
  (issuing the previous sends, waiting for this action's receives);
* idle (measured) = the executor's run time − Σ compute, per rank, median over rounds;
* idle (simulated) = the rank's last action end − its busy time, when :func:`parallel.pipeline.simulate.execute`
  runs the same schedule with every action costing its measured median (per kind and stage), and
  the simulated makespan next to the measured run time.

Timings on a shared machine are "loaded" unless the machine was idle; say which.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..")]

from harness import run_ranks  # noqa: E402

SIZES = {"tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, seq_len=32),
         "5m": dict(n_embd=256, n_layer=6, n_head=8, vocab_size=512, seq_len=64),
         "50m": dict(n_embd=512, n_layer=16, n_head=8, vocab_size=1024, seq_len=64)}   # = proto_run.SIZES
V_OF = {"zb_v": 2, "interleaved": 2}


def _engine(kw, sched, world, G, m):
    import torch

    from examples.gpt import GPT
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    v = V_OF.get(sched, 1)
    par = {"pp": world, "pp_schedule": sched, **({"pp_virtual_stages": v} if v > 1 else {})}
    cfg = load_config(data={
        "model": {"factory": "examples.gpt:build", "kwargs": kw},
        "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": G, "micro_batch_size": G // m,
                 "kwargs": {"n": G, "seq_len": kw["seq_len"], "vocab_size": kw["vocab_size"]}},
        "parallel": par, "optimizer": {"name": "adamw", "lr": 1e-4}}).validate(world)
    torch.manual_seed(0)
    return parallelize(GPT(**kw), cfg, Mesh(pp=world))


def _timed_run(ex):
    """Wrap ``ex.run`` to record its wall time in ``ex.run_s``."""
    inner = ex.run

    def run(mbs):
        t0 = time.perf_counter()
        try:
            return inner(mbs)
        finally:
            ex.run_s = time.perf_counter() - t0
    ex.run = run


def measure(rank, world, size, schedules, m, per, warmup, rounds):
    """Rank body: {schedule: {"step": [s], "run": [s], "records": [[(kind, stage, wait, compute)]]}}."""
    import torch

    from examples.gpt import random_tokens
    kw, G = SIZES[size], per * world
    ds = random_tokens(G, kw["seq_len"], kw["vocab_size"])
    batch = tuple(torch.stack(t) for t in zip(*(ds[i] for i in range(G))))
    engines = {s: _engine(kw, s, world, G, m) for s in schedules}
    for e in engines.values():
        _timed_run(e.executor)
        for _ in range(warmup):
            e.train_step(batch)
    out = {s: {"step": [], "run": [], "records": []} for s in schedules}
    for _ in range(rounds):
        for s, e in engines.items():
            torch.distributed.barrier()
            t0 = time.perf_counter()
            e.train_step(batch)
            out[s]["step"].append(time.perf_counter() - t0)
            out[s]["run"].append(e.executor.run_s)
            out[s]["records"].append([(r.action.kind, r.action.stage, r.wait_s, r.compute_s)
                                      for r in e.executor.records])
    for e in engines.values():
        e.close()
    return out


def _costs(per_rank, schedules_of):
    """{(kind, stage): median compute seconds} over every rank and round."""
    acc: dict = {}
    for res in per_rank:
        for recs in res["records"]:
            for kind, stage, _, comp in recs:
                acc.setdefault((kind, stage), []).append(comp)
    return {k: statistics.median(v) for k, v in acc.items()}


def analyse(results, schedules, m, world):
    from parallel.pipeline.schedules import get_schedule
    from parallel.pipeline.simulate import execute
    rows, base = [], None
    for s in schedules:
        per_rank = [results[r][s] for r in range(world)]
        costs = _costs(per_rank, None)
        sc = get_schedule(s, world, m, V_OF.get(s))
        sim = execute(sc, lambda a, c=costs: c[(a.kind, a.stage)])
        step = [statistics.median(res["step"]) for res in per_rank]
        row = {"schedule": s, "step_s": max(step), "sim_makespan_s": sim.makespan, "ranks": []}
        for r, res in enumerate(per_rank):
            idle_meas = statistics.median(run - sum(c for *_, c in recs)
                                          for run, recs in zip(res["run"], res["records"]))
            ev = sim.timelines[r]
            idle_sim = (ev[-1].end if ev else 0) - sim.busy[r]
            kinds = {}
            for recs in res["records"]:
                for kind, _, wait, comp in recs:
                    kinds.setdefault(kind, []).append(comp)
                    kinds.setdefault("exchange", []).append(wait)
            row["ranks"].append({"rank": r, "run_s": statistics.median(res["run"]), "idle_meas_s": idle_meas,
                                 "idle_sim_s": idle_sim, "per_action_s": {k: statistics.median(v)
                                                                          for k, v in kinds.items()}})
        if base is None:
            base = per_rank
        ratios = [a / b for a, b in zip(max((res["step"] for res in per_rank), key=sum),
                                        max((res["step"] for res in base), key=sum))]
        row["ratio_to_first"] = (statistics.median(ratios), min(ratios), max(ratios))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="5m", choices=sorted(SIZES))
    ap.add_argument("--schedules", nargs="+", default=["1f1b", "zero_bubble", "zb_v"])
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--per", type=int, default=4, help="sequences per rank (global batch per·2)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    world = 2
    res = run_ranks(measure, world, a.size, a.schedules, a.m, a.per, a.warmup, a.rounds, timeout=3000)
    print(f"size {a.size} {SIZES[a.size]}; pp={world}, m={a.m}, global batch {a.per * world}; {a.rounds} rounds")
    for row in analyse(res, a.schedules, a.m, world):
        med, lo, hi = row["ratio_to_first"]
        print(f"{row['schedule']:<12} step {row['step_s'] * 1e3:8.1f} ms  ratio to {a.schedules[0]} {med:.3f} "
              f"[{lo:.3f}, {hi:.3f}]  simulated makespan {row['sim_makespan_s'] * 1e3:.1f} ms")
        for rr in row["ranks"]:
            acts = " ".join(f"{k}={v * 1e3:.2f}" for k, v in sorted(rr["per_action_s"].items()))
            ratio = rr["idle_meas_s"] / rr["idle_sim_s"] if rr["idle_sim_s"] else float("nan")
            print(f"    rank {rr['rank']}: run {rr['run_s'] * 1e3:7.1f} ms  idle measured "
                  f"{rr['idle_meas_s'] * 1e3:6.1f} ms, simulated {rr['idle_sim_s'] * 1e3:6.1f} ms (x{ratio:.2f})  "
                  f"per action ms: {acts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
