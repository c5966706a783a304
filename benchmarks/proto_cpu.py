"""Per-step wall, process CPU (all threads: the main one plus gloo's) and main-thread CPU of protocol rows on 2
gloo ranks pinned one core each (issue 18: where ZeRO-3's step goes). CPU seconds hold up under load far better
than wall seconds: with one core per rank a step costs at least its process CPU, and the part outside the main
thread is gloo moving bytes (TCP loopback copies), so it scales with the wire bytes.

    python benchmarks/proto_cpu.py --rows local ddp zero3 --steps 12

Prints per rank and row the medians over the (row-interleaved, ABBA-ordered) steps of: wall (slowest rank's), cpu
(this process), main (its main thread), vcsw / ivcsw (voluntary / involuntary context switches).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
KEYS = ("wall", "cpu", "main", "vcsw", "ivcsw")


def _one(row, dist, torch) -> dict:
    dist.barrier()
    r0, m0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time(), time.perf_counter()
    row.step()
    row.finish()
    t, m, r1 = time.perf_counter() - t0, time.thread_time() - m0, resource.getrusage(resource.RUSAGE_SELF)
    tt = torch.tensor([t])
    dist.all_reduce(tt, op=dist.ReduceOp.MAX)
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return {"wall": tt.item() * 1e3, "cpu": cpu * 1e3, "main": m * 1e3, "vcsw": r1.ru_nvcsw - r0.ru_nvcsw,
            "ivcsw": r1.ru_nivcsw - r0.ru_nivcsw}


def _rank(rank, world, port, opts, q):
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from benchmarks import proto_rows
    from benchmarks.proto_run import SIZES, join
    join(rank, world, port)
    rows = opts["rows"]
    built = {n: proto_rows.build(n, SIZES[opts["size"]], opts["per"], world, rank) for n in rows}
    for r in built.values():
        for _ in range(opts["warmup"]):
            r.step()
            r.finish()
    res = {n: {k: [] for k in KEYS} for n in rows}
    for i in range(opts["steps"]):
        for n in (rows if i % 2 == 0 else rows[::-1]):
            for k, v in _one(built[n], dist, torch).items():
                res[n][k].append(v)
    q.put((rank, {n: {k: statistics.median(v) for k, v in d.items()} for n, d in res.items()}))
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="5m")
    ap.add_argument("--rows", nargs="+", default=["local", "ddp", "zero3"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--per", type=int, default=4, help="sequences per rank (the protocol's 4)")
    a = ap.parse_args(argv)
    opts = {"size": a.size, "rows": a.rows, "steps": a.steps, "warmup": a.warmup, "per": a.per}
    from benchmarks.proto_run import spawn_ranks
    q = spawn_ranks(_rank, opts)
    print(f"{a.size}, 2 ranks x 1 core, median of {a.steps} steps, ms (loaded unless stated; "
          f"load {open('/proc/loadavg').read().split()[0]})")
    for rank, out in sorted(q.get(timeout=30) for _ in range(2)):
        for n, d in out.items():
            print(f"  rank {rank} {n:10s} " + "  ".join(f"{k} {d[k]:.1f}" for k in KEYS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
