"""Context parallelism: the longest sequence a fixed per-rank memory budget trains, cp = 1, 2, 4, and the
step-time ratio ring / Ulysses (issue 23, item 7).

    python benchmarks/bench_cp.py longest --budget-mib 64 --cp 1,2,4
    python benchmarks/bench_cp.py ratio --cp 2 --seq 1024 --rounds 5

``longest``: for each cp, cp gloo CPU ranks train a tiny GPT (2 blocks, h = 64, 4 heads, V = 256, one
sequence per step, fp32 AdamW; the position table is sized for the longest sequence tried, so the
parameters — replicated over cp — are the same for every s) and each trial s runs one step (the optimizer's
state then exists) and measures the next one's peak of live tensor bytes on every rank
(:class:`parallel.planning.measure.LiveBytes`, the per-rank budget: counts, not the allocator's view).
The largest s (a multiple of ``--grain``) whose max-over-ranks peak is within the budget is found by
doubling, then bisection. Both algorithms at each cp > 1.

``ratio``: one ring and one Ulysses engine on the same ranks, stepped alternately (ring, Ulysses, ring, …:
paired rounds, so drift in the machine's load hits both alike); the median over rounds of the
per-round ratio ring / Ulysses of the max-over-ranks step time. On a shared CPU machine times are
"loaded": report the ratio, not the seconds.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parallel.config import load_config  # noqa: E402
from parallel.engine import parallelize  # noqa: E402
from parallel.mesh import Mesh, release_meshes  # noqa: E402
from parallel.planning.measure import measure_step  # noqa: E402

MAX_POS = 16384


def _cfg(cp: int, algorithm: str, s: int):
    return load_config(data={
        "model": {"factory": "examples.gpt:build",
                  "kwargs": {"vocab_size": 256, "seq_len": MAX_POS, "n_layer": 2, "n_head": 4, "n_embd": 64}},
        "data": {"factory": "examples.gpt:random_tokens", "kwargs": {"n": 8, "seq_len": s, "vocab_size": 256},
                 "global_batch_size": 1, "micro_batch_size": 1},
        "parallel": {"cp": cp, "cp_algorithm": algorithm},
        "optimizer": {"name": "adamw", "lr": 1e-3}, "train": {"steps": 2}}).validate(cp)


def _engine(cp, algorithm, s):
    from examples.gpt import build
    cfg = _cfg(cp, algorithm, s)
    torch.manual_seed(0)
    return parallelize(build(**cfg.model.kwargs), cfg, Mesh(cp=cp))


def _batch(s, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 256, (1, s), generator=g)
    return x, torch.roll(x, -1, 1)


def _peak(cp, algorithm, s) -> int:
    eng = _engine(cp, algorithm, s)
    eng.train_step(_batch(s, 0))
    peak = measure_step(eng, _batch(s, 1))["peak"]
    eng.close()
    t = torch.tensor([float(peak)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _longest(cp, algorithm, budget, grain, start):
    """Largest multiple of ``grain`` whose peak fits ``budget``: doubling from ``start``, then bisection."""
    trials = {}

    def fits(s):
        trials[s] = _peak(cp, algorithm, s)
        return trials[s] <= budget
    lo, hi = 0, start
    while hi <= MAX_POS and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, MAX_POS + grain)
    while hi - lo > grain:
        mid = (lo + hi) // 2 // grain * grain
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


def _timed(eng, s, step):
    t0 = time.perf_counter()
    eng.train_step(_batch(s, step))
    t = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _worker(rank, world, port, a, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    torch.set_num_threads(1)
    res = {}
    if a.mode == "longest":
        grain = a.grain * world
        for algorithm in (["ring"] if world == 1 else ["ring", "ulysses"]):
            res[algorithm] = _longest(world, algorithm, a.budget_mib * 2 ** 20, grain, a.start)
    else:
        ring, uly = _engine(world, "ring", a.seq), _engine(world, "ulysses", a.seq)
        _timed(ring, a.seq, 0), _timed(uly, a.seq, 0)                  # warm-up: optimizer state, first calls
        rounds = [(_timed(ring, a.seq, i + 1), _timed(uly, a.seq, i + 1)) for i in range(a.rounds)]
        res = {"rounds": rounds, "ratio": statistics.median(r / u for r, u in rounds)}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    release_meshes(destroy=True)
    dist.destroy_process_group()


def _run(world, a) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/bench_cp_{os.getpid()}_{world}.json"
    mp.start_processes(_worker, args=(world, port, a, out), nprocs=world, start_method="spawn")
    with open(out) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["longest", "ratio"])
    p.add_argument("--cp", default="1,2,4")
    p.add_argument("--budget-mib", type=float, default=64.0)
    p.add_argument("--grain", type=int, default=256, help="s is searched in multiples of grain·cp")
    p.add_argument("--start", type=int, default=1024)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    for world in [int(c) for c in a.cp.split(",")]:
        t0 = time.perf_counter()
        res = _run(world, a)
        took = time.perf_counter() - t0
        if a.mode == "longest":
            for algorithm, (best, trials) in res.items():
                order = sorted(trials.items(), key=lambda kv: int(kv[0]))
                peaks = ", ".join(f"{s}: {b / 2 ** 20:.1f}" for s, b in order)
                print(f"cp={world} {algorithm:8s} longest s = {best:6d} within {a.budget_mib} MiB/rank "
                      f"(peak MiB by s: {peaks}) [{took:.0f} s]", flush=True)
        else:
            rr = ", ".join(f"{r * 1e3:.0f}/{u * 1e3:.0f}" for r, u in res["rounds"])
            print(f"cp={world} s={a.seq}: ring / Ulysses step time, median of {a.rounds} paired rounds = "
                  f"{res['ratio']:.3f} (ms ring/Ulysses per round: {rr}; loaded machine)", flush=True)


if __name__ == "__main__":
    main()
