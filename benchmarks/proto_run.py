"""One rank of the benchmark protocol (benchmarks/protocol.py), inside an initialised gloo group.

Order: pin this rank to one core and fix its threads (asserted); calibrate (all ranks at once);
build the rows (one that cannot be built here, e.g. DeepSpeed's without deepspeed, is skipped with the
reason, or with ``strict`` raises); warm up each row (``warmup`` steps) and check that every row's
global-batch loss agrees with DDP's (a required row) to ``tol`` at every warm-up step (the local row,
which trains on its own share only, at the first); take one step's traffic from our CommStats (our
rows, fsdp2_ring); then ``rounds`` rounds, each timing every row once in an order shuffled by
``random.Random(seed + round)``, with GC off:

    barrier → t0 → step() → finish() (pending async work) → t1 → barrier

and the slowest rank's t1 − t0 (max over ranks) is the round's time; finally calibrate again.
"""
from __future__ import annotations

import gc
import os
import random
import time

import torch
import torch.distributed as dist

from benchmarks import proto_rows
from benchmarks.proto_calib import calibrate
from benchmarks.proto_host import FSDP2_ROWS

__all__ = ["run_rank", "pin", "SIZES"]

SIZES = {"tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, seq_len=32),
         "5m": dict(n_embd=256, n_layer=6, n_head=8, vocab_size=512, seq_len=64),
         "50m": dict(n_embd=512, n_layer=16, n_head=8, vocab_size=1024, seq_len=64)}


_CPUS = None


def pin(rank: int, world: int, threads: int, cores: bool = True) -> dict:
    """Every thread of this process (gloo's included: call it after init_process_group too) on core
    ``cpus[rank]`` of the cores it may use (unless ``cores`` is False), and ``threads`` torch threads
    (asserted)."""
    global _CPUS
    if _CPUS is None:                                # the cores this process was given, before any pinning
        _CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cpus = _CPUS if cores else []
    core = None
    if cpus:
        core = cpus[rank % len(cpus)]
        tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
        for tid in tids:
            try:
                os.sched_setaffinity(tid, {core})
            except OSError:                          # a thread that ended meanwhile
                pass
    torch.set_num_threads(threads)
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"protocol: torch runs {torch.get_num_threads()} threads, asked for {threads}: "
                           f"unset OMP_NUM_THREADS/MKL_NUM_THREADS or pass --threads {torch.get_num_threads()}")
    return {"core": core, "cores_visible": len(cpus), "threads": threads,
            "oversubscribed": bool(cpus) and world > len(cpus)}


def join(rank: int, world: int, port: int, timeout_s: float = 900) -> None:
    """A benchmark rank's start: the env torchrun would set (and DeepSpeed's CPU accelerator), this process
    pinned to its core with one torch thread (:func:`pin`), the gloo world joined, and pinned again (gloo's
    threads are born in init_process_group)."""
    import datetime

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    pin(rank, world, 1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    pin(rank, world, 1)


def spawn_ranks(target, opts, world: int = 2):
    """Run ``target(rank, world, port, opts, q)`` on ``world`` spawned processes (a free local port for their gloo
    world) until all exit; returns the queue they put their results on."""
    import socket

    import torch.multiprocessing as mp
    q = mp.get_context("spawn").Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(target, args=(world, port, opts, q), nprocs=world, join=True, start_method="spawn")
    return q


class WorldGroup:
    """The fields parallel.comm.ring reads from a group (size, rank, pg), for the default world group."""

    def __init__(self, dist):
        self.size, self.rank, self.pg = dist.get_world_size(), dist.get_rank(), dist.group.WORLD


def _agree(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank (a row runs everywhere or nowhere)."""
    t = torch.tensor([0 if flag else 1])
    dist.all_reduce(t)
    return t.item() == 0


def _global(loss: float, ours: bool) -> float:
    if ours:
        return loss
    t = torch.tensor([loss], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def run_rank(rank: int, world: int, opts: dict) -> dict:
    """The protocol on this rank (module docstring); returns the run's record (the same on every rank,
    except ``pin``)."""
    if "ddp" not in opts["rows"]:
        raise ValueError(f"protocol: rows {opts['rows']} lack ddp, the reference every row's warm-up losses are "
                         f"checked against (to {opts.get('tol', 1e-5)}): add ddp to the rows")
    kw, per = SIZES[opts["size"]], opts["per_rank_batch"]
    pinned = pin(rank, world, opts.get("threads", 1), opts.get("pin", True))
    calib_kw = dict(kw=kw, per=per, comm_mb=opts.get("comm_mb", 4.0), reps=opts.get("calib_reps", 7),
                    mem_mb=opts.get("mem_mb", 32), micro=proto_rows.micro_sizes(opts["rows"], per, world),
                    tp=(world,) if {"tp_ours", "tp_dtensor"} & set(opts["rows"]) else (),   # the tp rows: tp = world
                    flat=proto_rows.flat_elements(kw, opts["rows"]),                 # DeepSpeed ZeRO-1/2's message
                    dtensor=bool(set(FSDP2_ROWS) & set(opts["rows"])))   # FSDP2's DTensor AdamW (proto_host.py)
    cal0 = calibrate(**calib_kw)
    rows, skipped = {}, {}
    for name in opts["rows"]:
        err = None
        try:
            row = proto_rows.build(name, kw, per, world, rank)
        except Exception as e:                       # a peer that cannot run here is reported, not fatal
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if _agree(err is None):
            rows[name] = row
        else:
            skipped[name] = err or "failed on another rank"
    if skipped and opts.get("strict"):               # rows the user named must run (all ranks raise alike)
        raise RuntimeError(f"protocol: rows named in --rows could not be built: {skipped}. DeepSpeed rows need a "
                           f"python with deepspeed and its CPU Adam op (benchmarks/README.md, 'DeepSpeed peers'); "
                           f"or leave the row out of --rows")
    losses = {n: [] for n in rows}
    for name, row in rows.items():
        for i in range(opts["warmup"]):
            if hasattr(row, "stats") and i == opts["warmup"] - 1:
                loss = proto_rows.measure_comm(row)  # this warm-up step, its traffic counted
            else:
                loss = row.step()
                row.finish()
            losses[name].append(_global(loss, row.ours or row.global_loss))
    ref = losses.get("ddp")
    tol, worst = opts.get("tol", 1e-5), {}
    if ref:
        for name, ls in losses.items():
            k = 1 if name == "local" else len(ls)
            worst[name] = max(abs(a - b) for a, b in zip(ls[:k], ref[:k]))
        bad = {n: d for n, d in worst.items() if d > tol}
        if bad:
            raise AssertionError(f"protocol: losses disagree with DDP's over the warm-up steps by {bad} (> {tol}); "
                                 f"a row trains a different model or batch: see {losses}")
    names = list(rows)
    times = torch.zeros(opts["rounds"], len(names), dtype=torch.float64)
    orders = []
    gc.collect()
    gc.disable()
    try:
        for r in range(opts["rounds"]):
            order = list(range(len(names)))
            random.Random(opts["seed"] + r).shuffle(order)
            orders.append([names[i] for i in order])
            for i in order:
                row = rows[names[i]]
                dist.barrier()
                t0 = time.perf_counter()
                row.step()
                row.finish()
                times[r, i] = time.perf_counter() - t0
                dist.barrier()
    finally:
        gc.enable()
    dist.all_reduce(times, op=dist.ReduceOp.MAX)             # the slowest rank's time per round and row
    cal1 = calibrate(**calib_kw)
    meta = {n: {"owned": r.owned, "comm": r.comm, "source": r.source, "layout": r.layout, "ours": r.ours,
                "keep": r.keep, "comm_axes": getattr(r, "comm_axes", None)} for n, r in rows.items()}
    del rows
    return {"size": opts["size"], "model": kw, "per_rank_batch": per, "world": world, "pin": pinned,
            "seed": opts["seed"], "rounds": opts["rounds"], "warmup": opts["warmup"], "orders": orders,
            "times": {n: times[:, i].tolist() for i, n in enumerate(names)}, "skipped": skipped,
            "losses": losses, "loss_gap": worst, "calib_start": cal0, "calib_end": cal1, "rows": meta}
