"""Paired rounds of a few protocol rows, the first as the reference: per round each row steps once (order shuffled,
seeded), the slowest rank's time each; printed per row: median ms, the median of per-round ratios to the first
row with [min, max], and minor page faults per step (fresh 4 KiB pages, rank 0); then the same for the CPU
time of each step (``time.process_time``: every thread of a rank, summed over the ranks), which other agents'
load moves less than the wall clock, and both ratios for every further pair of rows. A row name ending in
``:bucket`` builds our engine with ZeRO stage 0's gradient bucket forced even at dp = 1 (the path before
parallel/zero/direct_grads.py), so its cost can be paired against the direct path and the peer in one run;
``:flat`` (ZeRO-3) reduce-scatters through the flat gradient buffer (the path before
parallel/data_parallel/grad_parts.py); ``:copy`` (ZeRO-3) gathers with the copy of the own shard (the path before
parallel/zero/own_views.py); ``:unfused`` (ZeRO-0/1/2, ZeRO-3's units off the ring) copies each gradient into its
bucket and divides after (the path before parallel/data_parallel/fused_div.py); ``:sepctl`` (ZeRO-0/1/2/3) makes the
two small control all-reduces of a step blocking and separate again — the scored-token count waited as soon as it is
issued, the global loss all-reduced after the step (the path before parallel/zero/norm_carry.py and batch.GlobalCount).

    python benchmarks/proto_pair.py --size 50m --rows fsdp2_ring zero3 zero3:flat --rounds 15
    python benchmarks/proto_pair.py --size 50m --rows fsdp2_ring zero3 zero3:copy --rounds 15
    python benchmarks/proto_pair.py --size 5m --rows ddp_tuned zero0 zero0:unfused --rounds 30

    python benchmarks/proto_pair.py --size 50m --rows pp_torch pp_ours pp_ours:bucket --rounds 20
    python benchmarks/proto_pair.py --size 50m --rows pp_torch pp_ours pp_ours:bucket --count   # load-free counts

``--count``: instead of timing, one step of each row under a dispatch mode on each rank: aten calls (of them, calls on
a DTensor: each runs DTensor's sharding propagation on the host before its local op), bytes written
by in-place copies (``copy_``), bytes of fresh tensors allocated, and the minor page faults of that step; then one
more step under ``sys.setprofile``: Python-level calls (Python functions and builtins/C methods such as
``Tensor.data_ptr``, the host work outside aten; counted apart, as the dispatch mode's own Python would count). With
``--ops`` the per-op tables, and the Python-level calls whose counts differ from the first row's (rank 0).

    python benchmarks/proto_pair.py --size 5m --rows zero1 zero2 --count --ops    # issue 18: 1 aten call, 197 py

Loaded machine: read the paired ratios, not the milliseconds; idle figures come from benchmarks/protocol.py.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _build(name, kw, per, world, rank):
    import parallel.zero.optimizer as zo
    from benchmarks import proto_rows
    base, _, variant = name.partition(":")
    keep = zo.can_direct
    if variant == "bucket":
        zo.can_direct = lambda *a: False
    elif variant not in ("", "flat", "copy", "unfused", "sepctl"):
        raise ValueError(f"row {name!r}: the variants are ':bucket', ':flat', ':copy', ':unfused' and ':sepctl'")
    try:
        row = proto_rows.build(base, kw, per, world, rank)
    finally:
        zo.can_direct = keep
    if variant == "flat":           # ZeRO-3 via the flat gradient buffer (before parallel/data_parallel/grad_parts.py)
        row.engine.zero.reducer.from_grads = row.engine.zero.reducer.fuse_div = False
    if variant == "unfused":        # copy gradients, then divide (before fused_div.py)
        row.engine.zero.reducer.fuse_div = False
    if variant == "sepctl":         # the count and the loss as separate blocking calls (before norm_carry.py)
        _separate_control(row.engine)
    if variant == "copy":           # ZeRO-3 gathers copying the own shard (before parallel/zero/own_views.py)
        row.engine.zero.stage3.own_views = False
    return row


def _separate_control(engine):
    from parallel import batch
    engine.zero.fold_loss = False
    micro = engine._micro

    def waited(b):
        out = micro(b)
        batch.settle(out)
        return out
    engine._micro = waited


def _ptr(t):
    """The data pointer of ``t``'s storage, or None (a DTensor's wrapper, a storage resized to 0)."""
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None


def _counted(row) -> dict:
    """One step of ``row`` counted (module docstring); ``ops``: {aten op: [calls, MB written or allocated]}."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.c = {"aten calls": 0, "DTensor calls": 0, "copy_ MB": 0.0, "allocated MB": 0.0}
            self.ops: dict = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.c["aten calls"] += 1
            self.c["DTensor calls"] += any(t.__name__ == "DTensor" for t in types)
            name = func.overloadpacket.__name__
            op = self.ops.setdefault(name, [0, 0.0])
            op[0] += 1
            if name == "copy_":
                mb = args[0].numel() * args[0].element_size() / 1e6
                self.c["copy_ MB"] += mb
                op[1] += mb
            elif isinstance(out, torch.Tensor) and _ptr(out) not in {   # a new storage
                    _ptr(t) for t in list(args) + list((kwargs or {}).values()) if isinstance(t, torch.Tensor)}:
                try:
                    mb = out.untyped_storage().nbytes() / 1e6
                except RuntimeError:
                    mb = 0.0
                self.c["allocated MB"] += mb
                op[1] += mb
            return out
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with Count() as m:
        row.step()
        row.finish()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    py = _py_calls(row)
    return {**m.c, "faults": faults, "py calls": sum(py.values()), "ops": m.ops, "py": py}


def _py_calls(row) -> dict:
    """{function: calls} over one step of ``row``: Python functions (file:name) and builtins (``C:`` qualname)."""
    import collections
    c = collections.Counter()

    def prof(frame, event, arg):
        if event == "call":
            c[f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"] += 1
        elif event == "c_call":
            c[f"C:{getattr(arg, '__qualname__', arg)}"] += 1
    sys.setprofile(prof)
    try:
        row.step()
        row.finish()
    finally:
        sys.setprofile(None)
    return dict(c)


def _rank(rank, world, port, opts, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import warnings
    warnings.filterwarnings("ignore")
    import gc

    import torch
    import torch.distributed as dist

    from benchmarks.proto_run import SIZES, pin
    pin(rank, world, 1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=900))
    pin(rank, world, 1)
    try:
        kw, names = SIZES[opts["size"]], opts["rows"]
        rows = [_build(n, kw, opts["per"], world, rank) for n in names]
        for row in rows:
            for _ in range(opts["warmup"]):
                row.step()
                row.finish()
        if opts["count"]:
            q.put((rank, [_counted(row) for row in rows]))
            return
        times = torch.zeros(opts["rounds"], len(rows), dtype=torch.float64)
        cpu = torch.zeros_like(times)           # CPU seconds of the step (every thread), summed over the ranks
        faults = [[] for _ in rows]
        gc.collect()
        gc.disable()
        for r in range(opts["rounds"]):
            order = list(range(len(rows)))
            random.Random(opts["seed"] + r).shuffle(order)
            for i in order:
                dist.barrier()
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0, c0 = time.perf_counter(), time.process_time()
                rows[i].step()
                rows[i].finish()
                times[r, i], cpu[r, i] = time.perf_counter() - t0, time.process_time() - c0
                faults[i].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        gc.enable()
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu)
        if rank == 0:
            q.put((times.tolist(), [statistics.median(f) for f in faults], cpu.tolist()))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="5m")
    ap.add_argument("--rows", nargs="+", default=["pp_torch", "pp_ours", "pp_ours:bucket"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--per", type=int, default=4, help="sequences per rank (the protocol's 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", action="store_true", help="counts of one step per row instead of timings")
    ap.add_argument("--ops", action="store_true", help="with --count: rank 0's calls per aten op, per row")
    a = ap.parse_args(argv)
    opts = {k: getattr(a, k) for k in ("size", "rows", "rounds", "warmup", "per", "seed", "count")}
    from benchmarks.proto_run import spawn_ranks
    q = spawn_ranks(_rank, opts)
    if a.count:
        got = dict(q.get(timeout=30) for _ in range(2))
        for (r, i), name in ((ri, a.rows[ri[1]]) for ri in [(r, i) for r in (0, 1) for i in range(len(a.rows))]):
            c = got[r][i]
            print(f"  rank {r} {name:18s} " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in c.items() if k not in ("ops", "py")))
        if a.ops:
            for i, name in enumerate(a.rows):
                print(f"  rank 0 {name}: aten op calls (MB written by copy_ or allocated)")
                for op, (n, mb) in sorted(got[0][i]["ops"].items(), key=lambda kv: -kv[1][0]):
                    print(f"    {op:34s} {n:6d}  {mb:9.1f}")
            base = got[0][0]["py"]
            for i, name in enumerate(a.rows[1:], 1):
                mine = got[0][i]["py"]
                diff = sorted(((k, mine.get(k, 0) - base.get(k, 0)) for k in set(mine) | set(base)
                               if mine.get(k, 0) != base.get(k, 0)), key=lambda kv: -abs(kv[1]))
                print(f"  rank 0 {name} − {a.rows[0]}: Python-level calls that differ (of {len(diff)}, the 15 largest)")
                for k, d in diff[:15]:
                    print(f"    {k:60s} {d:+6d}")
        return 0
    times, faults, cpu = q.get(timeout=30)
    print(f"== {a.size}, {a.rounds} paired rounds, slowest rank per step (loaded machine unless stated)")
    for i, name in enumerate(a.rows):
        col = [t[i] for t in times]
        ratio = [t[i] / t[0] for t in times]
        print(f"  {name:18s} {statistics.median(col) * 1e3:9.1f} ms   ÷ {a.rows[0]}: {statistics.median(ratio):.3f} "
              f"[{min(ratio):.3f}, {max(ratio):.3f}]   faults/step {faults[i]:.0f}")
    print("  CPU time per step (all threads, both ranks: less sensitive to other load than the wall clock)")
    for i, name in enumerate(a.rows):
        ratio = [c[i] / c[0] for c in cpu]
        print(f"  {name:18s} {statistics.median(c[i] for c in cpu) * 1e3:9.1f} ms   ÷ {a.rows[0]}: "
              f"{statistics.median(ratio):.3f} [{min(ratio):.3f}, {max(ratio):.3f}]")
    for j in range(1, len(a.rows)):          # every further pair, wall and CPU
        for i in range(j + 1, len(a.rows)):
            w, c = ([t[j] / t[i] for t in x] for x in (times, cpu))
            print(f"  {a.rows[j]} ÷ {a.rows[i]}: wall {statistics.median(w):.3f} [{min(w):.3f}, {max(w):.3f}], "
                  f"CPU {statistics.median(c):.3f} [{min(c):.3f}, {max(c):.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
