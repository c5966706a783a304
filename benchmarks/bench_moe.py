"""Expert parallelism vs replicated experts: the same MoE GPT (examples/moe_gpt.py, 8 experts, top-2) on 2
gloo ranks, ep=2 (each rank holds 4 experts, tokens exchanged by all-to-all) vs dp=2 with ep=1 (every rank
holds all 8 experts). Step time as paired rounds, memory per rank.

    python benchmarks/bench_moe.py --rounds 12 --steps 3 --json rec.json

Both engines are built in the same two processes from the same seed and trained on the same batches, so
step t of one row equals step t of the other (checked: losses to 1e-5, the parity contract). Each round
times ``--steps`` steps of each row, in a seeded shuffled order, behind barriers; the per-round ratio
ep2 / ep1 cancels what the round did to both (benchmarks/proto_stats.py: median, [min, max], percentile
bootstrap interval of the median). Memory per rank: model states (engine.model_state_bytes(), exact) and
the peak of live tensor bytes of one step (parallel.planning.measure.measure_step); traffic per step from
CommStats (all-to-all on ep, expert reduction on edp, the rest on dp).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.proto_stats import compare  # noqa: E402


def _config(a, ep: int):
    from parallel.config import load_config
    return load_config(data={
        "model": {"factory": "examples.moe_gpt:build",
                  "kwargs": dict(vocab_size=256, seq_len=a.seq, n_layer=a.layers, n_head=4, n_embd=a.width,
                                 num_experts=8, top_k=2, capacity_factor=a.cf)},
        "data": {"factory": "examples.gpt:random_tokens", "kwargs": {"n": 4096, "seq_len": a.seq, "vocab_size": 256},
                 "global_batch_size": a.batch, "micro_batch_size": a.batch // 2},
        "optimizer": {"name": "adamw", "lr": 1e-3}, "train": {"steps": 10 ** 6},
        "parallel": {"dp": 2, "ep": ep}, "zero": {"stage": a.zero}}).validate(2)


def _rank(rank, world, port, a, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800))
    from parallel.config import import_object
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    from parallel.planning.measure import measure_step
    rows, data, step = {}, None, {}
    for name, ep in (("ep2", 2), ("ep1", 1)):
        cfg = _config(a, ep)
        torch.manual_seed(cfg.train.seed)
        model = import_object(cfg.model.factory, "model.factory")(**cfg.model.kwargs)
        rows[name] = parallelize(model, cfg)
        data = data or import_object(cfg.data.factory, "data.factory")(**cfg.data.kwargs)
        step[name] = 0

    def train(name, n):
        eng, losses = rows[name], []
        for _ in range(n):
            losses.append(eng.train_step(rank_batch(data, step[name], a.batch, 2, eng.mesh.coord["dp"])))
            step[name] += 1
        return losses

    out = {"losses": {}, "times": {n: [] for n in rows}, "memory": {}, "comm": {}}
    for name in rows:                                   # warm-up; then the step whose memory and traffic we record
        out["losses"][name] = train(name, a.warmup)
        eng = rows[name]
        before = eng.mesh.stats.snapshot()
        m = measure_step(eng, rank_batch(data, step[name], a.batch, 2, eng.mesh.coord["dp"]))
        step[name] += 1
        out["losses"][name].append(m["loss"])
        out["memory"][name] = {**eng.model_state_bytes(), "peak_live": m["peak"]}
        out["comm"][name] = {ax: {op: {k: c[k] for k in ("calls", "wire_bytes")} for op, c in ops.items()}
                             for ax, ops in eng.mesh.stats.diff(eng.mesh.stats.snapshot(), before).items()
                             if not ax.startswith("control:")}
    for r in range(a.rounds):
        order = list(rows)
        random.Random(r).shuffle(order)                 # the same order on both ranks
        for name in order:
            dist.barrier()
            t0 = time.perf_counter()
            out["losses"][name] += train(name, a.steps)
            dist.barrier()
            out["times"][name].append((time.perf_counter() - t0) / a.steps)
    q.put((rank, out))
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="global batch (two dp ranks, one micro-batch each)")
    p.add_argument("--cf", type=float, default=1.25, help="capacity factor")
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=3, help="steps per row per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, 2, port, a, q)) for r in range(2)]
    for pr in procs:
        pr.start()
    res = dict(q.get(timeout=3600) for _ in procs)
    for pr in procs:
        pr.join()
    r0 = res[0]
    la, lb = r0["losses"]["ep2"], r0["losses"]["ep1"]
    worst = max(abs(x - y) / abs(y) for x, y in zip(la, lb))
    if worst > 1e-5:
        raise SystemExit(f"ep2 and ep1 losses differ by {worst:.2e} (relative): the rows do not train the same model")
    cmp = compare(r0["times"]["ep2"], r0["times"]["ep1"])
    rec = {"args": vars(a), "ratio_ep2_over_ep1": cmp, "loss_max_rel_diff": worst,
           "median_step_s": {n: statistics.median(t) for n, t in r0["times"].items()},
           "memory": {r: res[r]["memory"] for r in res}, "comm": {r: res[r]["comm"] for r in res},
           "times": r0["times"], "load": os.getloadavg()}
    print(f"MoE GPT L={a.layers} h={a.width} s={a.seq} E=8 k=2 cf={a.cf}, global batch {a.batch}, ZeRO {a.zero}, "
          f"{a.rounds} rounds × {a.steps} steps; losses equal to {worst:.1e}")
    for n in ("ep2", "ep1"):
        t = rec["median_step_s"][n]
        mems = "; ".join(f"rank {r}: states {res[r]['memory'][n]['total'] / 2**20:.2f} MiB, peak live "
                         f"{res[r]['memory'][n]['peak_live'] / 2**20:.2f} MiB" for r in sorted(res))
        wire = {ax: round(sum(c["wire_bytes"] for c in ops.values())) for ax, ops in r0["comm"][n].items()}
        print(f"  {n}: median step {t * 1e3:.1f} ms; {mems}; wire bytes/step rank 0 {wire}")
    print(f"  step time ep2/ep1: median {cmp['median']:.3f}, 95% bootstrap CI [{cmp['ci'][0]:.3f}, "
          f"{cmp['ci'][1]:.3f}], range [{cmp['min']:.3f}, {cmp['max']:.3f}], n={cmp['n']}; "
          f"load average {rec['load'][0]:.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rec, f, indent=1)
    return rec


if __name__ == "__main__":
    main()
