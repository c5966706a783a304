"""Paired A/B of the ring reduce-scatter's two layouts on 2 gloo ranks pinned one core each (issue 18: is ZeRO-1's
in-place ring what makes it slower than ZeRO-2?).

    python benchmarks/ring_layout_ab.py --numel 4886528 --rounds 100      # the 5m model's flat gradient

``inplace`` (ZeRO-1, parallel/data_parallel/reducer.py): the output is the full gradient's own chunk, so the peer's
partial sum is received into a free-list scratch buffer and added by ``torch.add(recv, own, out=own)``; ``direct``
(ZeRO-2/3): it is received into the persistent shard and ``shard.add_(own)``. The same bytes on the wire, read and
written (:mod:`parallel.comm.ring`). Per round both run once (order shuffled, seeded); printed: rank 0's median wall
and process-CPU milliseconds per call and the medians of the per-round ratios inplace ÷ direct.

Measured 2026-12-04, loaded (load average 5–7): CPU ratio 1.029, 1.035, 1.021 (about +0.15–0.3 ms of 7–8 ms per
call); wall 1.097, 1.040, 0.999 — at most 0.2 % of a 141 ms ZeRO-2 step, not the 3 % ZeRO-1 ÷ ZeRO-2 of the idle
protocol (whose per-round paired ratio is 1.029, bootstrap 95 % [0.999, 1.058], ZeRO-1 faster in 17 of 45 rounds).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rank(rank, world, port, opts, q):
    import torch
    import torch.distributed as dist

    from benchmarks.proto_run import WorldGroup, join
    from parallel.comm.ring import ring_reduce_scatter
    join(rank, 2, port, timeout_s=300)
    g, n = WorldGroup(dist), opts["numel"] // 2 * 2
    full, shard = torch.randn(n), torch.empty(n // 2)
    own = full[rank * (n // 2):(rank + 1) * (n // 2)]
    fns = {"inplace": lambda: ring_reduce_scatter(own, full, g), "direct": lambda: ring_reduce_scatter(shard, full, g)}
    for f in fns.values():
        for _ in range(3):
            f()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for r in range(opts["rounds"]):
        order = list(fns)
        random.Random(r).shuffle(order)
        for k in order:
            full.uniform_()                           # bounded values: the in-place sums do not grow
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    if rank == 0:
        q.put((wall, cpu))
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=4886528, help="fp32 elements of the full gradient (5m: 4886528)")
    ap.add_argument("--rounds", type=int, default=100)
    a = ap.parse_args(argv)
    if a.numel < 2 or a.rounds < 1:
        raise SystemExit("--numel must be ≥ 2 and --rounds ≥ 1")
    from benchmarks.proto_run import spawn_ranks
    q = spawn_ranks(_rank, {"numel": a.numel, "rounds": a.rounds})
    wall, cpu = q.get(timeout=30)
    print(f"ring reduce-scatter, {a.numel} fp32 elements, 2 ranks, {a.rounds} rounds (loaded machine unless stated)")
    for name, d in (("wall", wall), ("CPU", cpu)):
        r = [x / y for x, y in zip(d["inplace"], d["direct"])]
        print(f"  {name:4s} inplace {statistics.median(d['inplace']) * 1e3:.3f} ms, direct "
              f"{statistics.median(d['direct']) * 1e3:.3f} ms, inplace ÷ direct {statistics.median(r):.3f} "
              f"[{min(r):.3f}, {max(r):.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
