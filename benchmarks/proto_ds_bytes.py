"""Counts, not clocks: what a DeepSpeed row's step moves through memory, per phase and per aten operator
(issue 18: the planner's DeepSpeed terms, benchmarks/proto_ds.py, are read from these counts).

    DS_ACCELERATOR=cpu PYTHONPATH=. /work/dsvenv/bin/python benchmarks/proto_ds_bytes.py --size 50m --rows ds1 ds2 ds3

Rows are built as benchmarks/protocol.py builds them (benchmarks/proto_rows.py) on 2 gloo ranks; after ``--warmup``
steps, one step is run under a TorchDispatchMode that counts, per phase (forward ``eng(x)`` + loss, backward
``eng.backward``, step ``eng.step``) and per aten operator: calls and bytes moved by the accounting of
parallel/planning/time_terms.py — an operator reads its tensor inputs and writes its outputs; an in-place one
(``op_``: copy_, div_, add_ …) writes a tensor it read (no write-allocate), an out-of-place one writes a fresh
tensor (write-allocate: its bytes once more). Views (``is_view``) move nothing. Matmuls, convolutions and the
model's own elementwise work are counted too (the forward/backward the planner prices at the calibrated rate): the
table shows the operators whose bytes the planner's DeepSpeed terms price. DeepSpeedCPUAdam's fused C++ pass is
not an aten operator (pybind): not in the table, its 28 B per owned element are priced as before. Also the
minor page faults per phase (fresh 4 KiB pages: buffers the allocator takes from the OS anew) and
torch.distributed's calls (op, tensor bytes).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# operators that move no bytes by the planner's accounting: views, allocations (their pages are counted as faults),
# and the collectives (priced as communication: their tensors' bytes are the wire, not a memory pass)
NOT_MOVED = ("detach", "alias", "view", "_unsafe_view", "set_", "empty", "empty_strided", "empty_like",
             "allreduce_", "_allgather_base_", "_reduce_scatter_base_", "allgather_", "reduce_scatter_", "broadcast_")
COLL = ("all_reduce", "all_gather_into_tensor", "all_gather", "reduce_scatter_tensor", "reduce_scatter", "broadcast")


def _engine(row):
    """The DeepSpeed engine the row's step closure holds (benchmarks/proto_rows._deepspeed's ``eng``)."""
    cells = dict(zip(row.step.__code__.co_freevars, (c.cell_contents for c in row.step.__closure__ or ())))
    return cells["eng"], cells["x"], cells["y"], cells["V"]


def counted_step(row) -> dict:
    """One step of DeepSpeed row ``row`` under the counting mode: {phase: {"ops": {op: [calls, bytes]},
    "faults": n, "dist": {op: [calls, bytes]}}}."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    eng, x, y, V = _engine(row)
    phase = {"name": None}
    out: dict = {}

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                yield from tensors(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                yield from tensors(o)

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            res = func(*args, **(kwargs or {}))
            flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            name = func.__name__.split(".")[0]
            d = out[phase["name"]]["ops"].setdefault(name, [0, 0, 0])
            d[0] += 1
            d[2] += flt
            if getattr(func, "is_view", False) or name in NOT_MOVED:
                return res
            read = nbytes(tensors((args, kwargs or {})))
            wrote = nbytes(tensors(res))
            moved = read + wrote + (0 if name.endswith("_") else wrote)     # out-of-place: write-allocate
            d[1] += moved
            return res

    orig = {f: getattr(dist, f) for f in COLL if hasattr(dist, f)}

    def wrap(fname, fn):
        def counted(*a, **k):
            d = out[phase["name"]]["dist"].setdefault(fname, [0, 0])
            d[0] += 1
            d[1] += nbytes(tensors((a, k)))
            return fn(*a, **k)
        return counted

    for f, fn in orig.items():
        setattr(dist, f, wrap(f, fn))
    try:
        dist.barrier()
        for name, fn in (("forward", lambda: F.cross_entropy(eng(x).reshape(-1, V), y.reshape(-1))),
                         ("backward", None), ("step", None)):
            phase["name"] = name
            out[name] = {"ops": {}, "dist": {}}
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with Count():
                if name == "forward":
                    loss = fn()
                elif name == "backward":
                    eng.backward(loss)
                else:
                    eng.step()
            out[name]["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    finally:
        for f, fn in orig.items():
            setattr(dist, f, fn)
    return out


def _rank(rank, world, port, opts, q):
    import warnings
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from benchmarks import proto_rows
    from benchmarks.proto_run import SIZES, join
    join(rank, world, port)
    res = {}
    for name in opts["rows"]:
        row = proto_rows.build(name, SIZES[opts["size"]], opts["per"], world, rank)
        for _ in range(opts["warmup"]):
            row.step()
        res[name] = {"owned": row.owned, "phases": counted_step(row)}
        del row
    if rank == 0:
        q.put(res)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="5m")
    ap.add_argument("--rows", nargs="+", default=["ds1", "ds2", "ds3"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--per", type=int, default=4)
    ap.add_argument("--min-mb", type=float, default=1.0, help="print operators moving at least this many MB")
    a = ap.parse_args(argv)
    opts = {"size": a.size, "rows": a.rows, "warmup": a.warmup, "per": a.per}
    from benchmarks.proto_run import spawn_ranks
    q = spawn_ranks(_rank, opts)
    res = q.get(timeout=30)
    for name, r in res.items():
        own = r["owned"]
        print(f"== {name} ({a.size}, rank 0, one step after {a.warmup}; owned Ψ/N = {own:,} elements; bytes moved "
              f"per owned element in brackets)")
        for ph, d in r["phases"].items():
            tot = sum(v[1] for v in d["ops"].values())
            inside = sum(v[2] for v in d["ops"].values())
            print(f"  {ph}: {tot / 1e6:9.1f} MB moved by aten ops [{tot / own:6.1f}], {d['faults']} page faults "
                  f"({d['faults'] * 4096 / own:.2f} B/owned; {d['faults'] - inside} outside aten ops: gloo's threads, "
                  f"C++ ops); dist: " +
                  ", ".join(f"{k} {c}× {b / 1e6:.1f} MB" for k, (c, b) in d["dist"].items()))
            for op, (c, b, flt) in sorted(d["ops"].items(), key=lambda kv: -kv[1][1]):
                if b >= a.min_mb * 1e6 or flt >= 256:
                    print(f"      {op:28s} {c:6d} calls {b / 1e6:9.1f} MB [{b / own:6.2f}] {flt:7d} page faults")
    return 0


if __name__ == "__main__":
    sys.exit(main())
