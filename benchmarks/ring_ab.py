"""Paired A/B of the ring reduce-scatter (parallel/comm/ring.py): this tree's implementation (A) against another
git revision's (B, default main), alternating ABBA in one run on 2 gloo ranks pinned one core each.

    python benchmarks/ring_ab.py --mb 25 4 --pairs 20              # A = worktree, B = main
    python benchmarks/ring_ab.py --base 496642f --mb 25

Per size and layout (``out``: a separate shard, as ZeRO-2/3; ``inplace``: the shard is full's own chunk, as
ZeRO-1) it prints the median of the slowest rank's time per call for each side, the median of per-pair ratios
A ÷ B with [min, max], the bus bandwidth (N−1)/N·M ÷ t, and the minor page faults per call on rank 0 (fresh 4 KiB
pages; counts are exact, times are loaded on a shared machine). Sums are checked equal between A and B.
"""
from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rank(rank, world, port, opts, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    import parallel.comm.ring as ring_a
    from benchmarks.proto_run import pin
    from parallel.mesh import Mesh
    pin(rank, world, 1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    pin(rank, world, 1)
    ring_b = opts["base_src"]
    mod_b = types.ModuleType("ring_base")
    exec(compile(ring_b, "base ring.py", "exec"), mod_b.__dict__)
    g = Mesh(dp=world).group("dp")
    res = {}
    for mb in opts["mb"]:
        n = int(mb * 2 ** 20 // 4) // world * world
        torch.manual_seed(rank)
        src = torch.randn(n)
        for layout in ("out", "inplace"):
            full = src.clone()
            out = torch.empty(n // world)
            ts = {"A": [], "B": []}
            flt = {"A": [], "B": []}
            sums = {}
            for i in range(opts["pairs"] + 1):
                for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    mod = ring_a if side == "A" else mod_b
                    full.copy_(src)
                    dst = full.chunk(world)[rank] if layout == "inplace" else out
                    dist.barrier()
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0 = time.perf_counter()
                    mod.ring_reduce_scatter(dst, full, g)
                    t = torch.tensor([time.perf_counter() - t0])
                    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    sums[side] = dst.clone()
                    if i:                                  # the first pair warms both up
                        ts[side].append(t.item())
                        flt[side].append(f)
            r = [a / b for a, b in zip(ts["A"], ts["B"])]
            wire = (world - 1) / world * n * 4
            res[f"{mb:g} MB {layout}"] = {
                "A ms": statistics.median(ts["A"]) * 1e3, "B ms": statistics.median(ts["B"]) * 1e3,
                "A/B": statistics.median(r), "min": min(r), "max": max(r),
                "A GB/s": wire / statistics.median(ts["A"]) / 1e9, "B GB/s": wire / statistics.median(ts["B"]) / 1e9,
                "A faults": statistics.median(flt["A"]), "B faults": statistics.median(flt["B"]),
                "equal": bool(torch.equal(sums["A"], sums["B"]))}
    if rank == 0:
        q.put(res)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="main", help="git revision of side B's parallel/comm/ring.py")
    ap.add_argument("--mb", type=float, nargs="+", default=[25.0, 4.0], help="full tensor sizes, MiB")
    ap.add_argument("--pairs", type=int, default=20)
    a = ap.parse_args(argv)
    base_src = subprocess.run(["git", "-C", ROOT, "show", f"{a.base}:parallel/comm/ring.py"], check=True,
                              capture_output=True, text=True).stdout
    opts = {"mb": a.mb, "pairs": a.pairs, "base_src": base_src}
    os.environ.update(WORLD_SIZE="2")
    from benchmarks.proto_run import spawn_ranks
    q = spawn_ranks(_rank, opts)
    res = q.get(timeout=30)
    print(f"ring reduce-scatter A (worktree) vs B ({a.base}), 2 ranks, {a.pairs} ABBA pairs; loaded machine")
    for k, v in res.items():
        print(f"  {k:16s} " + "  ".join(f"{n} {x:.3f}" if isinstance(x, float) else f"{n} {x}" for n, x in v.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
