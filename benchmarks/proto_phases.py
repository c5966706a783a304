"""Per-phase wall, process-CPU and main-thread-CPU of protocol rows, rows interleaved step by step (issue 18: where
ZeRO-1/2 lose the time the planner expects them to save against tuned torch DDP).

    python benchmarks/proto_phases.py --size 5m --rows zero1 zero2 ddp_tuned local --steps 12 --rank -1
    python benchmarks/proto_phases.py --size 50m --rows zero1 zero2 ddp_tuned --steps 6 --inner

Every row is built first (benchmarks/proto_rows.py, 2 gloo ranks pinned one core each) and warmed up; then each
of ``--steps`` rounds runs one step of every row, in ABBA order, so a load change hits all rows alike. The same
marks split every row's step, ours and the peers' (global module hooks on the model class and torch's optimizer
step hooks, no engine callback):

    pre        step start → the model's forward begins      (zero_grad, prepare_step; DDP: opt.zero_grad, its
                                                              forward pre-work before the model's forward)
    forward    the model's forward (the GPT module itself)
    backward   forward end → the gradients are reduced      (loss, autograd, gradient hooks, bucket launches and
                                                              the reduction wait queued at backward's end:
                                                              DDP's all-reduce, our reduce-scatter)
    norm       → torch's optimizer.step begins              (ours: master grads bound, the norm all-reduce with
                                                              the loss in it; DDP: nothing)
    optimizer  torch's optimizer.step (the same torch.optim.AdamW, single-tensor on CPU, for both)
    post       → the step returns                           (ours: write-back, parameter all-gather; both: the
                                                              loss's .item())

Per row and phase: the median over the steps of wall ms (rank 0's clock), CPU ms of the process (all threads:
gloo's copy threads included), of the main thread, and the minor page faults (fresh 4 KiB pages) of the process.
CPU seconds hold up under load where wall seconds do not; a phase whose wall exceeds its process CPU waited (for
the peer rank, or for the core). ``--inner`` adds proto_profile's timers around the engine's functions (wall).

Measured 2026-12-04 22:00–22:07 UTC, loaded (load average 5.7–8.5: walls meaningless, CPU read), AMD 2 cores,
process CPU per step, rank 0 / rank 1, ZeRO row minus ddp_tuned (same run, interleaved):

    5m   zero1  pre +0.5/+0.6  fwd −0.4/−0.8  bwd −1.2/−0.6  norm +1.5/+1.7  optimizer −6.5/−6.1  post +4.9/+6.7
                step +0.3/+1.7 (of 132);  zero2 step +0.6/−3.0;  local − ddp_tuned bwd −12.5/−13.0
    50m  zero1  step +54/−37, zero2 −10/−41 (of ~1280): optimizer −69…−73, post (all-gather) +50…+86, norm +7

The update ZeRO halves (torch.optim.AdamW single-tensor on both: 40 vs 76 pieces) is saved in full; the parameter
all-gather's socket copies (gloo's threads, same core) and the norm (a reduction DDP's row does not take) pay it
back, and our ring's reduce-scatter + all-gather cost as much CPU as gloo's one all-reduce of the same bytes or a
little more and wait longer (benchmarks/ring_pair_ab.py, 20 MB, three runs: all_reduce 11.5–18.2 ms CPU /
14.8–23.6 wall; ring pair 12.7–18.2 / 22.7–28.5). No engine step was found doing avoidable work: the hooks'
Python costs ~0.6 ms a step over the fused copy they make (5m); in patched experiments (not kept) a one-message
N = 2 all-gather saved ~0.4 ms of main thread but waited longer, and ZeRO-1's ring forced onto ZeRO-2's direct
receive left ZeRO-1 ÷ ZeRO-2 where it was. Page faults: with glibc's dynamic thresholds a row alone faults 0
(ddp_tuned) to ~5k pages a step (zero2: +14 ms CPU in one run, 0.4k and no cost in the next); at 5m rows built
together fault ~0, at 50m every row thousands a step; benchmarks/protocol.py --fixed-malloc's thresholds: 0.
Paired CPU per step (``proto_pair.py --rows ddp_tuned zero1 zero2``, loaded, 22:08–22:12): 5m (30 rounds) zero1 ÷
ddp_tuned 0.988 [0.924, 1.045], zero2 0.981, zero1 ÷ zero2 1.012; 50m (10 rounds) 0.978 / 0.971 with glibc's
dynamic thresholds (faults/step: ddp_tuned 6480, zero1 4224, zero2 3520), 0.990 / 0.986 with --fixed-malloc's (0).
Loaded unless stated: the load average is printed.
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

PHASES = ("pre", "forward", "backward", "norm", "optimizer", "post", "step")
CLOCKS = (("wall", time.perf_counter), ("cpu", time.process_time), ("main", time.thread_time),
          ("flt", lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt / 1e3))   # printed: minor faults


def _now() -> tuple:
    return tuple(c() for _, c in CLOCKS)


class Marks:
    """The step's marks (each a tuple of the three clocks), set by hooks while ``on``."""

    def __init__(self):
        self.m: dict = {}
        self.on = False

    def set(self, key, first=True):
        if self.on and (not first or key not in self.m):
            self.m[key] = _now()

    def install(self):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        from examples.gpt import GPT
        from parallel.zero.optimizer import ZeroOptimizer
        mm = torch.nn.modules.module
        mm.register_module_forward_pre_hook(lambda mod, a: self.set("f0") if isinstance(mod, GPT) else None)
        mm.register_module_forward_hook(lambda mod, a, o: self.set("f1", False) if isinstance(mod, GPT) else None)
        register_optimizer_step_pre_hook(lambda o, a, k: self.set("o0"))
        register_optimizer_step_post_hook(lambda o, a, k: self.set("o1", False))
        orig = ZeroOptimizer.step

        def step(z, *a, **k):
            self.set("b1")
            return orig(z, *a, **k)
        ZeroOptimizer.step = step

    def phases(self, t0, t1) -> dict:
        m = dict(self.m, t0=t0, t1=t1)
        m.setdefault("b1", m["o0"])                     # peers: backward ends where their optimizer begins
        order = ["t0", "f0", "f1", "b1", "o0", "o1", "t1"]
        out = {}
        for name, a, b in zip(PHASES, order, order[1:]):
            out[name] = [(y - x) * 1e3 for x, y in zip(m[a], m[b])]
        out["step"] = [(y - x) * 1e3 for x, y in zip(t0, t1)]
        return out


def _rank(rank, world, port, opts, q):
    import warnings
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from benchmarks import proto_rows
    from benchmarks.proto_profile import Timers
    from benchmarks.proto_run import SIZES, join
    join(rank, world, port)
    marks = Marks()
    marks.install()
    timers = Timers()
    if opts["inner"]:
        timers.wrap()
    rows = opts["rows"]
    built = {n: proto_rows.build(n, SIZES[opts["size"]], opts["per"], world, rank) for n in rows}
    for r in built.values():
        for _ in range(opts["warmup"]):
            r.step()
            r.finish()
    res = {n: {p: [] for p in PHASES} for n in rows}
    inner = {n: {} for n in rows}
    for i in range(opts["steps"]):
        for n in (rows if i % 2 == 0 else rows[::-1]):
            dist.barrier()
            marks.m, marks.on = {}, True
            timers.t, timers.n, timers.on = {}, {}, True
            t0 = _now()
            built[n].step()
            built[n].finish()
            t1 = _now()
            marks.on = timers.on = False
            for p, v in marks.phases(t0, t1).items():
                res[n][p].append(v)
            for k, v in timers.t.items():
                inner[n].setdefault(k, []).append(v * 1e3)
    med = {n: {p: [statistics.median(v[j] for v in d[p]) for j in range(len(CLOCKS))] for p in PHASES}
           for n, d in res.items()}
    q.put((rank, med, {n: {k: statistics.median(v) for k, v in d.items()} for n, d in inner.items()}))
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="5m")
    ap.add_argument("--rows", nargs="+", default=["zero1", "zero2", "ddp_tuned"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--per", type=int, default=4, help="sequences per rank (the protocol's 4)")
    ap.add_argument("--inner", action="store_true", help="also proto_profile's timers around engine functions")
    ap.add_argument("--rank", type=int, default=0, help="which rank's figures to print (-1: both)")
    ap.add_argument("--vs", default="ddp_tuned", help="also print each row's process-CPU and wall minus this row's")
    a = ap.parse_args(argv)
    opts = {"size": a.size, "rows": a.rows, "steps": a.steps, "warmup": a.warmup, "per": a.per, "inner": a.inner}
    load0 = open("/proc/loadavg").read().split()[0]
    from benchmarks.proto_run import spawn_ranks
    q = spawn_ranks(_rank, opts)
    load1 = open("/proc/loadavg").read().split()[0]
    print(f"{a.size}, 2 ranks x 1 core, rows interleaved (ABBA), median of {a.steps} steps, ms "
          f"(loaded: load average {load0} before, {load1} after)")
    for rank, med, inner in sorted(q.get(timeout=30) for _ in range(2)):
        if a.rank not in (-1, rank):
            continue
        print(f"rank {rank}: " + " | ".join(f"{p:>9s}" for p in PHASES)
              + "    (ms: wall / process cpu / main thread; flt: page faults)")
        for n, d in med.items():
            for j, (cname, _) in enumerate(CLOCKS):
                print(f"  {n:10s} {cname:4s} " + " | ".join(f"{d[p][j]:9.2f}" for p in PHASES))
        if a.vs in med:
            ref = med[a.vs]
            for n, d in med.items():
                if n != a.vs:
                    for j in (1, 0):
                        print(f"  {n + ' - ' + a.vs:22s} {CLOCKS[j][0]:4s} "
                              + " | ".join(f"{d[p][j] - ref[p][j]:+9.2f}" for p in PHASES))
        for n, d in inner.items():
            if d:
                print(f"  {n} inner (wall): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(d.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
