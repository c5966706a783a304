"""gloo's one all-reduce against our ring's reduce-scatter + all-gather of the same bytes, on 2 gloo ranks pinned
one core each (issue 18: what ZeRO-1/2's two collectives cost against tuned DDP's one).

    python benchmarks/ring_pair_ab.py --numel 4886528 --reps 100     # the 5m model's flat gradient (one bucket)
    python benchmarks/ring_pair_ab.py --numel 6553600 --reps 40      # one 25 MiB bucket (50m: 8 of them)

Per repetition (order alternating) each variant runs once after a barrier: ``allreduce`` (dist.all_reduce, what
torch DDP issues per bucket), ``ring rs+ag`` (parallel.comm.ring's reduce-scatter into this rank's chunk, in place
as ZeRO-1's, then the all-gather of it back: ZeRO-1/2's per-bucket traffic, the same 2(N−1)/N·M wire bytes), and
each ring half alone. Printed: rank 0's medians of main-thread CPU, process CPU (gloo's threads included) and wall
ms per call. Loaded unless stated (the load average is printed).

Measured 2026-12-04 21:58–22:10 UTC, loaded (load 5.8–7.6), 4886528 elements (20 MB), three runs: allreduce
11.5 / 12.8 / 18.2 ms CPU, 14.8 / 18.1 / 23.6 wall; ring rs+ag 12.7 / 14.5 / 18.2 CPU, 22.7 / 24.1 / 28.5 wall (rs
7.0–7.7 CPU / 10.3–12.9 wall, ag 6.4–6.9 / 9.0–12.4).
6553600 elements: allreduce 18.5 / 24.0, ring rs+ag 19.2 / 30.0. The ring pair costs about the CPU of gloo's
all-reduce and waits longer (two pipelines filled and drained instead of one); its main thread does the
reduction's add (3–4 ms of the pair at 20 MB), which gloo does in its own thread.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rank(rank, world, port, opts, q):
    import torch
    import torch.distributed as dist

    from benchmarks.proto_run import WorldGroup, join
    from parallel.comm import ring
    join(rank, 2, port)
    g = WorldGroup(dist)
    full = torch.randn(opts["numel"] - opts["numel"] % 2)
    own = full.chunk(2)[rank]
    fns = {"allreduce": lambda: dist.all_reduce(full),
           "ring rs+ag": lambda: (ring.ring_reduce_scatter(own, full, g), ring.ring_all_gather(full, own, g)),
           "ring rs": lambda: ring.ring_reduce_scatter(own, full, g),
           "ring ag": lambda: ring.ring_all_gather(full, own, g)}
    res = {k: [] for k in fns}
    for i in range(opts["reps"]):
        for k in (list(fns) if i % 2 else list(fns)[::-1]):
            full.normal_()
            dist.barrier()
            m0, c0, w0 = time.thread_time(), time.process_time(), time.perf_counter()
            fns[k]()
            res[k].append(((time.thread_time() - m0) * 1e3, (time.process_time() - c0) * 1e3,
                           (time.perf_counter() - w0) * 1e3))
    if rank == 0:
        skip = min(6, opts["reps"] // 4)                     # warm-up repetitions
        q.put({k: [statistics.median(x[j] for x in v[skip:]) for j in range(3)] for k, v in res.items()})
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=4886528, help="fp32 elements of the bucket (even)")
    ap.add_argument("--reps", type=int, default=60)
    a = ap.parse_args(argv)
    from benchmarks.proto_run import spawn_ranks
    q = spawn_ranks(_rank, {"numel": a.numel, "reps": a.reps})
    print(f"{a.numel} fp32 elements, 2 ranks x 1 core, rank 0, median of {a.reps} reps, ms per call "
          f"(main cpu / process cpu / wall; loaded: load average {open('/proc/loadavg').read().split()[0]})")
    for k, (m, c, w) in q.get(timeout=30).items():
        print(f"  {k:12s} {m:8.2f} {c:8.2f} {w:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
