"""Where a protocol row's step goes: a phase breakdown and the operator table of a few steps (issue 18's
"profile forward, backward, exposed comm, optimizer").

    python benchmarks/proto_profile.py --size 5m --rows zero1 zero3 fsdp2_ring --steps 8
    python benchmarks/proto_profile.py --size 50m --rows zero3 --steps 3 --ops 25     # + torch.profiler table
    python benchmarks/proto_profile.py --size 50m --rows zero1 zero2 --steps 10 --ab-interleave   # paired A/B
    python benchmarks/proto_profile.py --size 50m --rows zero3 --steps 10 --ab-keep    # kept units vs none (A/B)
    python benchmarks/proto_profile.py --size 50m --rows zero2 --steps 3 --faults      # fresh pages per phase
    python benchmarks/proto_profile.py --size 50m --rows zero2 --steps 10 --ab-buffers # reused buffers vs fresh
    python benchmarks/proto_profile.py --size 50m --rows zero3 --steps 10 --ab-views   # own-shard views vs copy

Rows are built exactly as benchmarks/protocol.py builds them (benchmarks/proto_rows.py), on 2 gloo ranks pinned
one core each; after ``--warmup`` steps each row runs ``--steps`` timed steps (median reported, rank 0's clock).
For our rows the engine's phase callbacks split a step into forward (first stage forward → first output
gradient), backward (→ the optimizer phase) and optimizer+sync, and timers wrapped around the engine's
own functions give, inside those: waits for stage-3 parameter gathers, waits for gradient reductions
(in backward and in finish_grad_sync), the gradient norm, the torch optimizer's update, the write-back
/ parameter all-gather, and the loss all-reduce. Counts per step: collectives issued by op (our CommStats)
and blocking waits, and the minor page faults of the process (fresh 4 KiB pages the step touched: every
buffer the allocator takes from the OS anew). ``--ops N`` adds torch.profiler's N most expensive operators
(self CPU time) for one step.
On a shared machine the milliseconds are loaded; the split and the counts are what to read.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (module, class, method, timer name): the engine functions whose inclusive time is accumulated per step
WRAPPED = [("parallel.zero.stage3", "Stage3Params", "_landed", "stage3 gather wait"),
           ("parallel.zero.stage3", "Stage3Params", "_free", "stage3 free"),
           ("parallel.data_parallel.reducer", "GradReducer", "_absorb", "grad absorb"),
           ("parallel.data_parallel.reducer", "GradReducer", "_launch", "reduce launch"),
           ("parallel.data_parallel.reducer", "GradReducer", "_finalize", "reduce wait+finalize"),
           ("parallel.data_parallel.reducer", "GradReducer", "finish", "finish_grad_sync"),
           ("parallel.zero.optimizer", "ZeroOptimizer", "grad_norm_sq", "grad norm"),
           ("parallel.zero.optimizer", "ZeroOptimizer", "_write_back", "write back + gather"),
           ("parallel.zero.optimizer", "ZeroOptimizer", "step", "zero.step"),
           ("parallel.engine", "Engine", "_dp_mean", "loss all-reduce")]


_clock = time.perf_counter      # --faults: minor page faults / 1000 instead (printed x 1e3: faults, not ms)


def _faults() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt / 1e3


# not isend / irecv: dist.P2POp checks that its op IS dist.isend / dist.irecv (a wrapper breaks the pp rows);
# their batches are timed through batch_isend_irecv
DIST_FUNCS = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
              "reduce_scatter_tensor", "send", "recv", "barrier", "batch_isend_irecv")


class Timers:
    """Inclusive seconds and calls per wrapped function, while ``on``."""

    def __init__(self):
        self.t, self.n, self.on, self._undo = {}, {}, False, []

    def wrap(self):
        import importlib
        for mod, cls, meth, name in WRAPPED:
            klass = getattr(importlib.import_module(mod), cls)
            orig = getattr(klass, meth, None)            # may live in a mixin (ZeroOptimizer's _write_back)
            if orig is None:             # renamed or gone since the list was written: not timed
                continue
            self._undo.append((klass, meth, klass.__dict__.get(meth, orig)))

            def timed(*a, _orig=orig, _name=name, **k):
                if not self.on:
                    return _orig(*a, **k)
                t0 = _clock()
                try:
                    return _orig(*a, **k)
                finally:
                    self.t[_name] = self.t.get(_name, 0.0) + _clock() - t0
                    self.n[_name] = self.n.get(_name, 0) + 1
            setattr(klass, meth, timed)
        self._wrap_optimizer_step()

    def _wrap_optimizer_step(self):
        """torch's optimizer.step through the profiler-free hook API: time between pre and post hooks."""
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        state = {}

        def pre(opt, args, kwargs):
            state["t0"] = _clock()

        def post(opt, args, kwargs):
            if self.on and "t0" in state:
                self.t["torch optimizer update"] = self.t.get("torch optimizer update", 0.0) + \
                    _clock() - state.pop("t0")
                self.n["torch optimizer update"] = self.n.get("torch optimizer update", 0) + 1
        self._undo.append(register_optimizer_step_pre_hook(pre))
        self._undo.append(register_optimizer_step_post_hook(post))

    def wrap_dist(self):
        """torch.distributed's collectives counted per call (name → calls, tensor bytes): peers' traffic too
        (DeepSpeed and FSDP2 call them through the module attribute)."""
        import torch
        import torch.distributed as dist
        for fname in DIST_FUNCS:
            orig = getattr(dist, fname, None)
            if orig is None:
                continue
            self._undo.append((dist, fname, orig))

            def counted(*a, _orig=orig, _name=fname, **k):
                if self.on:
                    nbytes = sum(t.numel() * t.element_size() for t in list(a) + list(k.values())
                                 if isinstance(t, torch.Tensor))
                    key = f"dist.{_name}"
                    self.n[key] = self.n.get(key, 0) + 1
                    self.t[key] = self.t.get(key, 0.0) + nbytes / 1e6      # printed x 1e3: kB of tensor arguments
                return _orig(*a, **k)
            setattr(dist, fname, counted)

    def unwrap(self):
        for u in reversed(self._undo):
            if isinstance(u, tuple):
                setattr(*u)
            else:
                u.remove()
        self._undo = []


def _phases(engine):
    """Callback recording the first forward, first backward and optimizer times of a step."""
    marks = {}

    def cb(phase, step):
        if phase in ("forward", "backward", "optimizer") and phase not in marks:
            marks[phase] = _clock()
    engine.add_callback(cb)
    return marks


def profile_row(row, steps: int, ops: int, timers: Timers) -> dict:
    import torch.distributed as dist
    engine = getattr(row, "engine", None)
    marks = _phases(engine) if engine is not None else {}
    per = {"step": [], "forward": [], "backward": [], "optimizer+sync": []}
    faults = []
    acc: dict = {}
    stats = getattr(row, "stats", None)
    before = stats.snapshot() if stats is not None else None
    for _ in range(steps):
        marks.clear()
        dist.barrier()
        timers.t, timers.n, timers.on = {}, {}, True
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = _clock()
        row.step()
        row.finish()
        t1 = _clock()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        timers.on = False
        per["step"].append(t1 - t0)
        if marks:
            per["forward"].append(marks["backward"] - marks["forward"])
            per["backward"].append(marks["optimizer"] - marks["backward"])
            per["optimizer+sync"].append(t1 - marks["optimizer"])
        for k, v in timers.t.items():
            acc.setdefault(k, []).append(v)
            acc.setdefault(f"#{k}", []).append(timers.n[k])
    out = {k: statistics.median(v) * 1e3 for k, v in per.items() if v}
    out["page faults/step"] = statistics.median(faults)            # minor faults: fresh pages touched
    out.update({k: statistics.median(v) * (1 if k.startswith("#") else 1e3) for k, v in acc.items()})
    if stats is not None:
        diff = stats.diff(stats.snapshot(), before)
        out["collectives/step"] = {f"{ax}.{op}": c["calls"] / steps for ax, d in diff.items() for op, c in d.items()}
    if ops:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            row.step()
            row.finish()
        out["ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=ops)
    return out


def _ab(row, pairs: int, setting) -> dict:
    """Steps alternating ``setting(True)`` and ``setting(False)`` (ABBA order), the slowest rank's time each,
    and each side's collectives per step (the row's CommStats: calls and wire bytes by axis.op)."""
    import torch
    import torch.distributed as dist
    ts: dict = {True: [], False: []}
    flt: dict = {True: [], False: []}
    comm: dict = {True: {}, False: {}}
    stats = getattr(row, "stats", None)
    for i in range(pairs):
        for flag in ((True, False) if i % 2 == 0 else (False, True)):
            setting(flag)
            before = stats.snapshot() if stats is not None else None
            dist.barrier()
            f0 = _faults()
            t0 = time.perf_counter()
            row.step()
            row.finish()
            t = torch.tensor([time.perf_counter() - t0])
            flt[flag].append((_faults() - f0) * 1e3)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ts[flag].append(t.item())
            if stats is not None:
                for ax, d in stats.diff(stats.snapshot(), before).items():
                    for op, c in d.items():
                        comm[flag][f"{ax}.{op}"] = (c["calls"], c["wire_bytes"])   # the same every step
    setting(True)
    r = [a / b for a, b in zip(ts[True], ts[False])]
    return {"A ms": statistics.median(ts[True]) * 1e3, "B ms": statistics.median(ts[False]) * 1e3,
            "ratio": statistics.median(r), "min": min(r), "max": max(r), "A faults": statistics.median(flt[True]),
            "B faults": statistics.median(flt[False]), "A comm": comm[True], "B comm": comm[False]}


def ab_interleave(row, pairs: int) -> dict:
    """ZeRO-1/2 row: A = the interleaved update + gather (parallel/zero/interleave.py), B = the two-pass step;
    ratio A ÷ B."""
    z = row.engine.zero
    if not z._interleave:
        return {"skipped": f"not interleaved ({len(z._all)} bucket(s), stage {z.stage})"}

    def setting(flag):
        z._interleave = flag
    return {"buckets": len(z._all), **_ab(row, pairs, setting)}


def ab_keep(row, pairs: int) -> dict:
    """ZeRO-3 row: A = the configured kept units (zero.keep_after_forward, parallel/zero/stage3.py), B = none
    kept (every unit freed after its forward); ratio A ÷ B and each side's all-gathers."""
    s3 = getattr(getattr(row, "engine", None), "zero", None)
    s3 = getattr(s3, "stage3", None)
    if s3 is None or not s3.keep:
        return {"skipped": "not a stage-3 row with kept units"}
    keep = s3.keep
    kept = [u.padded * u.flat_param.element_size() for u in s3.kept_units()]

    def setting(flag):
        s3.keep = keep if flag else 0
    return {"keep": keep, "kept unit bytes": kept, **_ab(row, pairs, setting)}


def ab_views(row, pairs: int) -> dict:
    """ZeRO-3 row: A = parameters inside the own shard are views of it (parallel/zero/own_views.py), B = the plain
    gather copying the own shard; ratio A ÷ B, and the bytes each copies into a pass over all units."""
    from parallel.zero.own_views import plan
    s3 = getattr(getattr(getattr(row, "engine", None), "zero", None), "stage3", None)
    if s3 is None or s3.shards is not None:
        return {"skipped": "not a stage-3 row (or its shards are offloaded)"}
    es = s3.units[0].flat_param.element_size()
    copied = {"A MB/pass": sum(e - a for u in s3.units for _, a, e in plan(u)[1]) * es / 1e6,
              "B MB/pass": sum(u.shard for u in s3.units) * es / 1e6}

    def setting(flag):
        s3.own_views = flag
    return {**copied, **_ab(row, pairs, setting)}


def ab_buffers(row, pairs: int) -> dict:
    """ZeRO-1/2/3 row: A = reused reduction buffers (the ring's receive buffers, the reducer's full-gradient
    buffers and kept gradient shards), B = session 7's fresh ones (a receive buffer per ring call, a
    full-gradient buffer per bucket, the shards freed by zero_grad), emulated by patching; ratio A ÷ B."""
    import torch

    from parallel.comm import ring
    red = row.engine.zero.reducer
    take, overlaps, zero_grad = ring._take, ring._overlaps, red.zero_grad

    def fresh(b, device):
        return torch.empty(b.padded, dtype=red.dtype, device=device)

    def zero_grad_freeing():
        zero_grad()
        if not red.keep_full:
            for b in red.buckets + ([red.deferred] if red.deferred else []):
                b.shard_grad = None

    def setting(flag):
        if flag:
            ring._take, ring._overlaps = take, overlaps
            red.__dict__.pop("_flat_buffer", None)
            red.zero_grad = zero_grad
        else:
            ring._take = lambda numel, dtype: torch.empty(numel, dtype=dtype)
            ring._overlaps = lambda a, b: True
            red._flat_buffer, red.zero_grad = fresh, zero_grad_freeing
    return _ab(row, pairs, setting)


def _rank(rank, world, port, opts, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import warnings
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from benchmarks import proto_rows
    from benchmarks.proto_run import SIZES, pin
    pin(rank, world, 1, opts["pin"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=900))
    pin(rank, world, 1, opts["pin"])
    if opts["faults"]:
        global _clock
        _clock = _faults
    timers = Timers()
    timers.wrap()
    timers.wrap_dist()
    try:
        res = {}
        for name in opts["rows"]:
            row = proto_rows.build(name, SIZES[opts["size"]], opts["per"], world, rank)
            for _ in range(opts["warmup"]):
                row.step()
                row.finish()
            if opts["ab_interleave"] or opts["ab_keep"] or opts["ab_buffers"] or opts["ab_views"]:
                fn = (ab_interleave if opts["ab_interleave"] else ab_keep if opts["ab_keep"] else
                      ab_views if opts["ab_views"] else ab_buffers)
                res[name] = fn(row, opts["steps"])
            else:
                res[name] = profile_row(row, opts["steps"], opts["ops"], timers)   # every rank: collectives
            del row
        if rank == 0:
            q.put(res)
    finally:
        timers.unwrap()
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="5m")
    ap.add_argument("--rows", nargs="+", default=["zero1", "zero3"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--per", type=int, default=4, help="sequences per rank (the protocol's 4)")
    ap.add_argument("--ops", type=int, default=0, help="torch.profiler's top N operators of one step (rank 0)")
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    ap.add_argument("--faults", action="store_true", help="phases and wrapped functions count minor page faults "
                                                         "(fresh 4 KiB pages) instead of milliseconds")
    ap.add_argument("--ab-interleave", action="store_true", help="zero1/zero2 rows: --steps ABBA pairs, interleaved "
                                                                "update + gather vs the two-pass step")
    ap.add_argument("--ab-buffers", action="store_true", help="zero1/2/3 rows: --steps ABBA pairs, reused reduction "
                                                             "buffers vs fresh ones per step (session 7)")
    ap.add_argument("--ab-keep", action="store_true", help="zero3 rows: --steps ABBA pairs, the kept units "
                                                          "(zero.keep_after_forward) vs none")
    ap.add_argument("--ab-views", action="store_true", help="zero3 rows: --steps ABBA pairs, own-shard views "
                                                           "vs the plain gather's copy of the own shard")
    a = ap.parse_args(argv)
    opts = {k: getattr(a, k) for k in ("size", "rows", "steps", "warmup", "per", "ops", "pin", "ab_interleave",
                                                 "ab_keep", "faults", "ab_buffers", "ab_views")}
    from benchmarks.proto_run import spawn_ranks
    q = spawn_ranks(_rank, opts)
    res = q.get(timeout=30)
    if a.ab_interleave or a.ab_keep or a.ab_buffers or a.ab_views:
        for name, r in res.items():
            print(f"== {name} ({a.size}): " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in r.items()))
        return 0
    for name, r in res.items():
        unit = "page faults, not ms" if a.faults else "ms; loaded machine unless stated"
        print(f"== {name} ({a.size}, median of {a.steps} steps, rank 0, {unit})")
        for k, v in r.items():
            if k in ("ops", "collectives/step") or k.startswith("#"):
                continue
            if k == "page faults/step":
                print(f"  {k:28s} {v:9.0f}   (x 4 KiB = {v * 4 / 1024:.1f} MiB of fresh pages)")
                continue
            calls = r.get(f"#{k}")
            unit = "kB" if k.startswith("dist.") else "ms"
            print(f"  {k:28s} {v:9.2f} {unit}" + (f"   ({calls:g} calls)" if calls is not None else ""))
        if "collectives/step" in r:
            print("  collectives/step: " + ", ".join(f"{k} {v:g}" for k, v in sorted(r["collectives/step"].items())))
        if "ops" in r:
            print(r["ops"])
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
