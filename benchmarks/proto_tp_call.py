"""What one tp all-reduce issued right after a tp matmul costs, ours against DTensor's, measured directly (loaded
on a shared machine: read the medians and means as such): 2 gloo ranks pinned one core each as the protocol pins
them, the 5m or 50m tp message (per·2 sequences × s × h fp32, the tp rows' ``chain_bytes``), ``--reps`` interleaved
repetitions, each after a barrier, the slowest rank's time:

    python benchmarks/proto_tp_call.py --size 5m --reps 48

* ``mm``: the tp-split MLP matmul alone (proto_calib.tp_call);
* ``ours``: the matmul then ``dist.all_reduce`` of the message (our f/g operators: parallel/tensor_parallel);
* ``funcol``: the matmul then DTensor's collective, ``_c10d_functional.all_reduce`` + ``wait_tensor`` (the copy
  into a fresh output, the call, the wait);
* ``dtensor``: the matmul's output as a Partial DTensor redistributed to Replicate and read back (RowwiseParallel's
  output path: DTensor dispatch + the functional call);
* ``ar``: the all-reduce alone after a barrier.
Printed per variant, in ms: median, quartiles, mean of (variant − mm) — the call after compute, whole.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rank(rank, world, port, opts, q):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate

    from benchmarks.proto_calib import _tp_tensors
    from benchmarks.proto_run import SIZES, join
    from benchmarks.proto_wait import per_rep_slowest
    join(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    kw = SIZES[opts["size"]]
    a, w, x = _tp_tensors(kw, opts["per"])
    x2 = x.view(-1, kw["n_embd"])
    fc = torch.ops._c10d_functional

    def mm():
        torch.mm(a, w)

    def ours():
        torch.mm(a, w)
        dist.all_reduce(x)

    def funcol():
        torch.mm(a, w)
        fc.wait_tensor(fc.all_reduce(x, "sum", "0"))

    def dtensor():
        torch.mm(a, w)
        DTensor.from_local(x2, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local().sum()

    def ar():
        dist.all_reduce(x)
    fns = [mm, ours, funcol, dtensor, ar]
    for fn in fns:
        fn()
        fn()

    def clock(fn):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    rows = per_rep_slowest([[clock(fn) for fn in fns] for _ in range(opts["reps"])])
    if rank == 0:
        q.put(rows)
        q.close()
        q.join_thread()                                # flushed before the exit below
    dist.barrier()
    os._exit(0)        # no teardown: the DTensor mesh's process group aborts on it now and then ("terminate called")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="5m")
    ap.add_argument("--per", type=int, default=4)
    ap.add_argument("--reps", type=int, default=48)
    a = ap.parse_args(argv)
    from benchmarks.proto_run import spawn_ranks
    q = spawn_ranks(_rank, dict(size=a.size, per=a.per, reps=a.reps))
    rows = q.get(timeout=30)
    names = ["mm", "ours", "funcol", "dtensor", "ar"]
    for i, n in enumerate(names):
        d = [r[i] - (r[0] if 0 < i < 4 else 0) for r in rows]
        qs = statistics.quantiles(d, n=4, method="inclusive")
        print(f"{a.size} {n:8s} {'(− mm)' if 0 < i < 4 else '      '} median {statistics.median(d) * 1e3:6.2f} ms "
              f"[{qs[0] * 1e3:.2f}, {qs[2] * 1e3:.2f}] mean {statistics.mean(d) * 1e3:6.2f}")
    with open("/proc/loadavg") as f:
        print("load average:", f.read().strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
