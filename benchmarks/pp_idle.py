"""Pipeline wall clock and idle time per rank: 1F1B vs ZB-H1 vs ZB-V, measured against the schedule simulator.

    python benchmarks/pp_idle.py --size 5m --rounds 5          # pp = 2, m = 8 (issue 19 item 3)
    python benchmarks/pp_idle.py --size tiny --schedules 1f1b zero_bubble

Each schedule gets its own engine (the same seeded GPT of benchmarks/proto_run.py's SIZES, pp = 2 over
gloo, one thread per rank, AdamW, global batch ``per · 2`` sequences in m micro-batches); after
``--warmup`` steps the schedules take turns, one step each, for ``--rounds`` rounds (paired: a
round's ratios share the machine's state). Per schedule and rank it reports:

* step: the median ``train_step`` wall time; the paired ratio to 1F1B (median over rounds, min–max);
* the cost terms :func:`parallel.pipeline.measured.fit` takes from the executor's records (median ms):
  compute per action kind and stage (F, B, I, W; the loss and head in the last stage's), the
  overhead of issuing each action's exchange, the p2p latency of one message (receiver already
  waiting), each rank's start offset and tail (last compute end → run end);
* run: the executor's span, median over rounds, and "outside the run" (step − run: the gradient
  reduction and optimizer step, which the pipeline does not overlap);
* drawn: :func:`parallel.pipeline.measured_spread.predict_spread`, the simulator over 200 draws of
  each action's compute and overhead from the rounds (a bootstrap: the spread of action times is
  part of the idle), median and 10–90 % of the draws; ``--save`` writes every round's records;
* idle measured = the executor's span − Σ compute, per rank, median over rounds; idle simulated =
  :func:`parallel.pipeline.measured.predict` (the schedule simulator under those terms), and their ratio
  (issue 19's target: within 15 %); replayed = the same simulator fed each round's own per-action
  compute, issuing and completion times (median over rounds): it tests the model without the spread
  of action times, which on a loaded machine makes Σ medians fall short of the compute actually spent.
  The terms include ``completion`` (a receive's done − issued when its message was already there).

Timings on a shared machine are "loaded" unless the machine was idle; say which.
"""
from __future__ import annotations

import argparse
import json
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


def measure(rank, world, size, schedules, m, per, warmup, rounds):
    """Rank body: {schedule: {"step": [s], "steps": [(t0, t1)], "runs": [(records, span)]}} per round."""
    import torch

    from examples.gpt import random_tokens
    kw, G = SIZES[size], per * world
    ds = random_tokens(G, kw["seq_len"], kw["vocab_size"])
    batch = tuple(torch.stack(t) for t in zip(*(ds[i] for i in range(G))))
    engines = {s: _engine(kw, s, world, G, m) for s in schedules}
    for e in engines.values():
        for _ in range(warmup):
            e.train_step(batch)
    out = {s: {"step": [], "steps": [], "runs": []} for s in schedules}
    for _ in range(rounds):
        for s, e in engines.items():
            torch.distributed.barrier()
            t0 = time.perf_counter()
            e.train_step(batch)
            t1 = time.perf_counter()
            out[s]["step"].append(t1 - t0)
            out[s]["steps"].append((t0, t1))
            out[s]["runs"].append((list(e.executor.records), e.executor.span))
    for e in engines.values():
        e.close()
    return out


def analyse(results, schedules, m, world):
    """Per schedule: step time, paired ratio to the first schedule, the fitted cost terms
    (:func:`parallel.pipeline.measured.fit`), measured vs simulated idle per rank."""
    from parallel.pipeline.measured import fit, measured_idle, predict
    from parallel.pipeline.measured_spread import predict_spread
    from parallel.pipeline.schedules import get_schedule
    rows, base = [], None
    for s in schedules:
        per_rank = [results[r][s] for r in range(world)]
        sc = get_schedule(s, world, m, V_OF.get(s))
        rounds = len(per_rank[0]["runs"])
        runs = [[per_rank[r]["runs"][k] for r in range(world)] for k in range(rounds)]
        terms = fit(sc, runs)
        idle_sim, sim = predict(sc, terms)
        replayed = [predict(sc, terms, ranks)[0] for ranks in runs]
        spread = predict_spread(sc, runs)
        step = [statistics.median(res["step"]) for res in per_rank]
        row = {"schedule": s, "step_s": max(step), "terms": terms, "ranks": []}
        for r, res in enumerate(per_rank):
            spans = [span for _, span in res["runs"]]
            outside = statistics.median((t1 - t0) - (sp[1] - sp[0]) for (t0, t1), sp in zip(res["steps"], spans))
            row["ranks"].append({
                "rank": r, "run_s": statistics.median(sp[1] - sp[0] for sp in spans), "outside_s": outside,
                "idle_meas_s": statistics.median(measured_idle(recs, sp) for recs, sp in res["runs"]),
                "idle_sim_s": idle_sim[r], "sim_run_s": sim.busy[r] + idle_sim[r],
                "idle_replay_s": statistics.median(x[r] for x in replayed),
                "idle_spread_s": (spread.idle[r], spread.low[r], spread.high[r])})
        if base is None:
            base = per_rank
        ratios = [a / b for a, b in zip(max((res["step"] for res in per_rank), key=sum),
                                        max((res["step"] for res in base), key=sum))]
        row["ratio_to_first"] = (statistics.median(ratios), min(ratios), max(ratios))
        rows.append(row)
    return rows


def _ms(d: dict) -> str:
    return " ".join(f"{k}{st}={v * 1e3:.2f}" for (k, st), v in sorted(d.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="5m", choices=sorted(SIZES))
    ap.add_argument("--schedules", nargs="+", default=["1f1b", "zero_bubble", "zb_v"])
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--per", type=int, default=4, help="sequences per rank (global batch per·2)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--save", help="write the executor's records of every round to this JSON file "
                                   "(parallel.pipeline.measured_spread.load_runs reads them back)")
    a = ap.parse_args(argv)
    world = 2
    res = run_ranks(measure, world, a.size, a.schedules, a.m, a.per, a.warmup, a.rounds, timeout=3000)
    print(f"size {a.size} {SIZES[a.size]}; pp={world}, m={a.m}, global batch {a.per * world}; {a.rounds} rounds")
    if a.save:
        from parallel.pipeline.measured_spread import dump_runs
        data = {"size": a.size, "p": world, "m": a.m, "load_avg": os.getloadavg()[0], "schedules": {
            s: {"v": V_OF.get(s, 1), "runs": dump_runs([[res[r][s]["runs"][k] for r in range(world)]
                                                          for k in range(a.rounds)])} for s in a.schedules}}
        with open(a.save, "w") as f:
            json.dump(data, f)
    for row in analyse(res, a.schedules, a.m, world):
        med, lo, hi = row["ratio_to_first"]
        t = row["terms"]
        print(f"{row['schedule']:<12} step {row['step_s'] * 1e3:8.1f} ms  ratio to {a.schedules[0]} {med:.3f} "
              f"[{lo:.3f}, {hi:.3f}]")
        print(f"    compute ms: {_ms(t.compute)}")
        print(f"    overhead ms: {_ms(t.overhead)}")
        print(f"    p2p latency {t.latency * 1e3:.3f} ms ({t.latency_samples} samples); start offsets ms "
              f"{[round(x * 1e3, 2) for x in t.start]}; tails ms {[round(x * 1e3, 2) for x in t.tail]}")
        for rr in row["ranks"]:
            ratio = rr["idle_meas_s"] / rr["idle_sim_s"] if rr["idle_sim_s"] else float("nan")
            rep = rr["idle_meas_s"] / rr["idle_replay_s"] if rr["idle_replay_s"] else float("nan")
            print(f"    rank {rr['rank']}: run {rr['run_s'] * 1e3:7.1f} ms (simulated {rr['sim_run_s'] * 1e3:7.1f}), "
                  f"outside the run {rr['outside_s'] * 1e3:6.1f} ms  idle measured {rr['idle_meas_s'] * 1e3:6.1f} ms, "
                  f"simulated {rr['idle_sim_s'] * 1e3:6.1f} (measured/simulated {ratio:.2f}), replayed "
                  f"{rr['idle_replay_s'] * 1e3:6.1f} (measured/replayed {rep:.2f})")
            sp, lo, hi = rr["idle_spread_s"]
            print(f"        drawn costs (measured_spread, 200 draws): simulated idle {sp * 1e3:6.1f} ms "
                  f"[10-90 %: {lo * 1e3:.1f}, {hi * 1e3:.1f}] (measured/drawn {rr['idle_meas_s'] / sp:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
