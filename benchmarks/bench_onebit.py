"""1-bit Adam vs Adam at dp=2 on gloo: paired step times after the freeze step, with a bootstrap interval.

    python benchmarks/bench_onebit.py --size 50m                      # the issue's figure (idle machine)
    python benchmarks/bench_onebit.py --size tiny --rounds 3 --steps 2   # a smoke run

1-bit Adam (Tang et al., arXiv 2102.02888; parallel/optim/onebit_adam.py, parallel/zero/onebit.py) runs
Adam for ``freeze_step`` steps, then exchanges the momentum compressed (1 bit per element + one scale per
chunk, error feedback), so its dp traffic per step falls from Adam's 2(N−1)/N·4Ψ bytes (ring all-reduce of
fp32 gradients) to about 2(N−1)/N·Ψ/8. Both rows train examples/gpt.py's GPT (``benchmarks/proto_run.py``'s
SIZES, fp32, seed 0, the same batch) through ``parallel.engine.parallelize`` with ``optimizer.name`` adam
or onebit_adam (lr 1e-4, torch's defaults otherwise), at the same ZeRO stage (``--stage``, default 0).

Protocol (as benchmarks/protocol.py, benchmarks/proto_stats.py): each rank is pinned to its own core with
one torch thread; 1-bit Adam is warmed up past its freeze step (``--freeze`` + 2 steps: its first
compressed step at stages 1–2 also all-gathers m and √v̂ once), Adam for 2 steps. Then ``--rounds``
rounds; every round runs both rows in a seeded shuffled order (the same on both ranks), each for
``--steps`` steps between barriers, and a row's time is the slowest rank's mean step. Reported: the
per-round ratio onebit/adam, its median, [min, max] and a 95 % percentile-bootstrap interval of the
median (proto_stats.compare); "faster" when the whole interval is below 1. Also each row's process CPU time a
step (all threads of the rank; max over ranks) and its ratio: on a loaded machine a steadier figure than
wall time, though it counts gloo's busy threads and not time spent waiting. Wire bytes per step and rank
are counted by the engine's CommStats over one step of each row (exact; control traffic listed apart).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ROWS = ("adam", "onebit_adam")
LR = 1e-4


def _engine(name: str, kw: dict, per: int, world: int, stage: int, freeze: int):
    import torch

    from examples.gpt import GPT, random_tokens
    from parallel.config import load_config
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    G = per * world
    opt = {"name": name, "lr": LR, **({"freeze_step": freeze} if name == "onebit_adam" else {})}
    cfg = load_config(data={
        "model": {"factory": "examples.gpt:build", "kwargs": kw},
        "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": G, "micro_batch_size": per,
                 "kwargs": {"n": G, "seq_len": kw["seq_len"], "vocab_size": kw["vocab_size"]}},
        "parallel": {"dp": world}, "zero": {"stage": stage}, "optimizer": opt}).validate(world)
    mesh = Mesh(dp=world)
    torch.manual_seed(0)
    engine = parallelize(GPT(**kw), cfg, mesh)
    batch = rank_batch(random_tokens(G, kw["seq_len"], kw["vocab_size"]), 0, G, world, mesh.local_rank("dp"), 0, False)
    return engine, batch, mesh.stats


def _wire(stats, step) -> tuple[float, dict]:
    """One step's traffic: (loss, {axis: {op: {calls, payload_bytes, wire_bytes}}})."""
    before = stats.snapshot()
    loss = step()
    return loss, stats.diff(stats.snapshot(), before)


def _rank(rank, world, port, a, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from benchmarks.proto_run import SIZES, pin
    pin(rank, world, a.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800))
    pin(rank, world, a.threads)                          # gloo's threads too
    try:
        kw = SIZES[a.size]
        rows, wire, losses = {}, {}, {}
        for name in ROWS:
            engine, batch, stats = _engine(name, kw, a.per_rank_batch, world, a.stage, a.freeze)
            rows[name] = (engine, batch, stats)
            for _ in range(a.freeze + 2 if name == "onebit_adam" else 2):
                engine.train_step(batch)
            if name == "onebit_adam" and not engine.zero.optimizer.local_gradients:
                raise RuntimeError("onebit_adam is not in its compressed phase after the warm-up")
            losses[name], wire[name] = _wire(stats, lambda e=engine, b=batch: e.train_step(b))
        times, cpu = {n: [] for n in ROWS}, {n: [] for n in ROWS}
        for r in range(a.rounds):
            order = list(ROWS)
            random.Random(a.seed * 1000 + r).shuffle(order)       # the same order on every rank
            for name in order:
                engine, batch, _ = rows[name]
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(a.steps):
                    losses[name] = engine.train_step(batch)
                dt = torch.tensor([(time.perf_counter() - t0) / a.steps, (time.process_time() - c0) / a.steps])
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)          # a step lasts as long as its slowest rank
                times[name].append(float(dt[0]))
                cpu[name].append(float(dt[1]))
        if rank == 0:
            q.put({"times": times, "cpu": cpu, "wire": wire, "losses": losses,
                   "params": rows["adam"][0].zero.num_params})
    finally:
        dist.destroy_process_group()


def _total(diff: dict) -> tuple[int, int]:
    """(dp-side wire bytes, control wire bytes) of one step."""
    data = sum(c["wire_bytes"] for ax, ops in diff.items() if not ax.startswith("control") for c in ops.values())
    ctrl = sum(c["wire_bytes"] for ax, ops in diff.items() if ax.startswith("control") for c in ops.values())
    return round(data), round(ctrl)


def main(argv=None) -> int:
    from benchmarks.proto_run import SIZES
    from benchmarks.proto_stats import compare
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="50m", choices=sorted(SIZES))
    ap.add_argument("--per-rank-batch", type=int, default=4, help="sequences per rank per step")
    ap.add_argument("--stage", type=int, default=0, choices=(0, 1, 2), help="ZeRO stage of both rows")
    ap.add_argument("--freeze", type=int, default=4, help="1-bit Adam's warm-up (Adam) steps")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=3, help="steps per row per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="row-order seed")
    ap.add_argument("--json", default=None, help="write the raw figures here")
    a = ap.parse_args(argv)
    if a.rounds < 2 or a.steps < 1 or a.freeze < 1:
        ap.error("--rounds must be ≥ 2, --steps and --freeze ≥ 1")
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, a, q)) for r in range(2)]
    for p in procs:
        p.start()
    rec = None
    while rec is None:
        try:
            rec = q.get(timeout=5)
        except Exception:                                   # noqa: BLE001 - queue.Empty: check the ranks
            if any(p.exitcode not in (None, 0) for p in procs) or all(p.exitcode == 0 for p in procs):
                for p in procs:
                    p.kill()
                print("bench_onebit: a rank failed (its traceback is above)", file=sys.stderr)
                return 1
    for p in procs:
        p.join()
    t, res = rec["times"], compare(rec["times"]["onebit_adam"], rec["times"]["adam"])
    faster = "faster" if res["ci"][1] < 1 else "slower" if res["ci"][0] > 1 else "not separated"
    print(f"1-bit Adam vs Adam, GPT {a.size} ({rec['params']:,} parameters) dp=2 ZeRO-{a.stage} gloo, "
          f"{a.per_rank_batch} seq/rank, freeze {a.freeze}, {a.rounds} rounds × {a.steps} steps after the freeze step:")
    for name in ROWS:
        data, ctrl = _total(rec["wire"][name])
        ms = sorted(t[name])[len(t[name]) // 2] * 1e3
        cms = sorted(rec["cpu"][name])[len(t[name]) // 2] * 1e3
        print(f"  {name:12s} median step {ms:9.1f} ms (cpu {cms:8.1f} ms)   wire bytes/step/rank {data:>13,} "
              f"(+{ctrl:,} control)   loss {rec['losses'][name]:.4f}")
    a8, o8 = _total(rec["wire"]["adam"])[0], _total(rec["wire"]["onebit_adam"])[0]
    print(f"  ratio onebit/adam: time median {res['median']:.3f} [{res['min']:.3f}, {res['max']:.3f}], 95% bootstrap "
          f"CI [{res['ci'][0]:.3f}, {res['ci'][1]:.3f}] → {faster}; wire {o8 / a8:.4f} (1/{a8 / max(o8, 1):.1f})")
    cr = compare(rec["cpu"]["onebit_adam"], rec["cpu"]["adam"])
    print(f"  ratio of process CPU time a step (a rank's threads, max over ranks; steadier under other load): "
          f"median {cr['median']:.3f}, 95% CI [{cr['ci'][0]:.3f}, {cr['ci'][1]:.3f}]")
    print(f"  per-op wire (rank 0): {json.dumps(rec['wire'])}")
    print(f"took {time.time() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "compare": res, **rec}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
