"""ZeRO optimizer/parameter offload: step-time overhead against no offload, the CPU AdamW step against
torch.optim.AdamW, and (``--mode scale``) training a model whose state exceeds the machine's memory.

    python benchmarks/bench_offload_train.py --repeats 8                    # overhead, ~50M GPT, dp=2
    python benchmarks/bench_offload_train.py --repeats 8 --int8 --dir /var/tmp   # + 8-bit moments offloaded
    python benchmarks/bench_offload_train.py --mode scale --dir /var/tmp --params-b 2.0 --steps 3

overhead: two gloo ranks with one thread each train the example GPT with AdamW at ZeRO stage 2,
without offload, with ``zero.offload.optimizer=cpu`` and with ``=nvme`` (in ``--dir``); every
configuration is built once, warmed up, then timed one step at a time, interleaved (A, B, C, A, …).
Reported: median step time and its ratio to no offload; the optimizer part of the step (torch's
AdamW over the rank's partition vs the streamed offloaded step, and the kernel alone inside it);
bytes moved per step and time waiting on IO.

scale: ``--ranks`` gloo processes (default 2), ZeRO stage 3 with ``params=nvme`` and
``optimizer=nvme``, the model built on the meta device and written to the stores unit by unit; each
process holds its 1/ranks partition of the gradient in memory and everything else on disk.
Without ``--grad-clip`` each unit's Adam update starts inside backward as soon as its gradient is
reduced; "optimizer step" seconds count from that first update to the commit. Reported per step:
loss, step time, bytes read and written by each store, time waiting on reads, achieved disk
throughput against the disk's own
sequential bandwidth measured in the same run (``dd``-style O_DIRECT, one thread), peak RSS.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZE_50M = dict(n_embd=512, n_layer=16, n_head=8, vocab_size=1024, seq_len=64)
SIZES = {"50m": SIZE_50M, "5m": dict(n_embd=256, n_layer=6, n_head=8, vocab_size=512, seq_len=64)}   # 5m: smoke runs
CONFIGS = ["none", "cpu", "nvme"]


def _offload(kind, path, buffer_mb):
    from parallel.config import OffloadConfig
    return None if kind == "none" else OffloadConfig(optimizer=kind, nvme_path=path, buffer_count=4,
                                                     buffer_mb=buffer_mb, prefetch_depth=1)


def _timed(fn, box):
    def run(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        box.append(time.perf_counter() - t0)
        return out
    return run


def _rank(rank, world, port, path, repeats, batch, buffer_mb, out, configs=tuple(CONFIGS), size="50m"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from examples.gpt import GPT
    from parallel.config import ZeroConfig
    from parallel.mesh import Mesh
    from parallel.optim.adam8bit import Adam8bit
    from parallel.zero import ZeroOptimizer
    group = Mesh(dp=world).group("dp")
    runs, opt_times = {}, {c: [] for c in configs}
    for c in configs:
        torch.manual_seed(0)
        model = GPT(**SIZES[size])
        factory = (lambda ps: Adam8bit(ps, lr=1e-4, weight_decay=0.01)) if c.endswith("-int8") else \
            (lambda ps: torch.optim.AdamW(ps, lr=1e-4))          # the same AdamW; int8: 8-bit moments
        zero = ZeroOptimizer(model, factory, group,
                             ZeroConfig(stage=2, bucket_mb=5.0, offload=_offload(c.split("-")[0], path, buffer_mb)))
        if c == "none":
            zero.optimizer.step = _timed(zero.optimizer.step, opt_times[c])
        runs[c] = (model, zero)
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, SIZES[size]["vocab_size"], (batch, SIZES[size]["seq_len"]), generator=g)

    def step(c):
        model, zero = runs[c]
        zero.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        zero.step()
        if c != "none":
            opt_times[c].append(zero.offload_stats()["optimizer"]["last_step"]["step_s"])

    for c in configs:
        step(c)
        step(c)
    for c in configs:
        opt_times[c].clear()
    times = {c: [] for c in configs}
    kernel = {c: [] for c in configs}
    for _ in range(repeats):
        for c in configs:
            dist.barrier()
            t0 = time.perf_counter()
            step(c)
            dist.barrier()
            times[c].append(time.perf_counter() - t0)
            if c != "none":
                kernel[c].append(runs[c][1].offload_stats()["optimizer"]["last_step"]["compute_s"])
    info = {}
    for c in configs[1:]:
        st = runs[c][1].offload_stats()["optimizer"]
        last = st["last_step"]["stores"][0]
        info[c] = dict(kernel=st["kernel"], state=st["state_bytes"], read=last["bytes_read"],
                       written=last["bytes_written"], disk_read=last["disk_bytes_read"],
                       wait_s=last["wait_s"], stall_s=last["stall_s"], subgroups=runs[c][1].offload_stats()
                       ["optimizer"]["last_step"]["subgroups"])
        runs[c][1].close()
    n = sum(p.numel() for p in runs["none"][0].parameters())
    if rank == 0:
        out.put((n, {c: statistics.median(v) for c, v in times.items()},
                 {c: statistics.median(v) for c, v in opt_times.items()},
                 {c: statistics.median(v) for c, v in kernel.items() if v}, info))
    dist.destroy_process_group()


def overhead(a) -> None:
    path = a.dir or tempfile.mkdtemp(prefix="p3d-bench-")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    configs = tuple(CONFIGS) + (("cpu-int8", "nvme-int8") if a.int8 else ())
    mp.start_processes(_rank, args=(2, port, path, a.repeats, a.batch, a.buffer_mb, q, configs, a.size), nprocs=2,
                       start_method="spawn")
    n, step, opt, kern, info = q.get()
    print(f"# ZeRO-2, 2 gloo ranks x 1 thread, GPT {n / 1e6:.1f}M params, AdamW, batch {a.batch}x"
          f"{SIZES[a.size]['seq_len']} per rank, median of {a.repeats} interleaved steps; offload buffers 4 x "
          f"{a.buffer_mb} MiB; nvme store in {path}")
    print("\n| offload.optimizer | step ms | vs none | optimizer part ms | kernel ms |\n|---|---|---|---|---|")
    for c in configs:
        k = f"{kern[c] * 1e3:.1f} ({info[c]['kernel']})" if c in kern else "(torch.optim.AdamW, single-tensor)"
        print(f"| {c} | {step[c] * 1e3:.1f} | {step[c] / step['none']:.2f}x | {opt[c] * 1e3:.1f} | {k} |")
    print("\nper step and rank (rank 0):")
    for c, v in info.items():
        print(f"  {c}: state {v['state'] / 2**20:.1f} MiB in {v['subgroups']} sub-groups; read {v['read'] / 2**20:.1f} "
              f"MiB, written {v['written'] / 2**20:.1f} MiB (disk read {v['disk_read'] / 2**20:.1f} MiB); "
              f"waiting on reads {v['wait_s'] * 1e3:.1f} ms, on buffers/writes {v['stall_s'] * 1e3:.1f} ms")
    if not a.dir:
        shutil.rmtree(path, ignore_errors=True)


# --- scale: a model whose state exceeds memory --------------------------------------------------------

def disk_bandwidth(path: str, size: int, block: int = 8 << 20) -> tuple[float, float]:
    """Sequential O_DIRECT write then read of ``size`` bytes, one thread (dd's figure), bytes/s."""
    from parallel.offload.aio import aligned_empty, byte_view, probe_direct
    direct = probe_direct(path)[0]
    buf = aligned_empty(block)
    buf.random_(0, 255)
    mv = byte_view(buf)
    f = os.path.join(path, "p3d-dd.bin")
    fd = os.open(f, os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o600)
    try:
        t0 = time.perf_counter()
        for off in range(0, size, block):
            os.pwrite(fd, mv, off)
        os.fsync(fd)
        w = size / (time.perf_counter() - t0)
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for off in range(0, size, block):
            os.preadv(fd, [mv], off)
        r = size / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(f)
    return w, r


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _scale_rank(rank, world, port, a, kw, out):
    """One dp rank of the scale run: stage 3, params and optimizer state on NVMe, built on meta."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from examples.gpt import GPT, Block, random_tokens
    from parallel.config import OffloadConfig, ZeroConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer, deferred_init
    group = Mesh(dp=world).group("dp")
    cfg = OffloadConfig(optimizer="nvme", params="nvme", nvme_path=a.dir, buffer_count=a.buffers,
                        buffer_mb=a.buffer_mb, prefetch_depth=1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, rec = deferred_init(GPT, **kw)
    zero = ZeroOptimizer(model, lambda ps: torch.optim.AdamW(ps, lr=a.lr), group, ZeroConfig(stage=3, offload=cfg),
                         init=rec, unit_types=(Block,), grad_clip=a.grad_clip)
    build = torch.tensor([time.perf_counter() - t0, _rss_gib()], dtype=torch.float64)
    dist.all_reduce(build, op=dist.ReduceOp.MAX)
    if rank == 0:
        out.put(("built", build.tolist(), zero.offload_stats()["optimizer"]["kernel"]))
    data = random_tokens(n=a.batch * world, seq_len=a.seq, vocab_size=a.vocab)
    # the same batch every step: the loss must fall (memorisation), which a few steps can show
    mine = range(rank * a.batch, (rank + 1) * a.batch)
    x, y = torch.stack([data[i][0] for i in mine]), torch.stack([data[i][1] for i in mine])
    keys = ("bytes_read", "bytes_written", "disk_bytes_read", "disk_bytes_written", "wait_s")
    for t in range(a.steps):
        before = zero.offload_stats()
        dist.barrier()
        t0 = time.perf_counter()
        zero.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        zero.step()
        dist.barrier()
        dt = time.perf_counter() - t0
        after = zero.offload_stats()
        row = [loss.item() / world, dt / world, after["optimizer"]["last_step"]["step_s"] / world]
        for k in ("optimizer", "params"):
            row += [after[k]["stats"][c] - before[k]["stats"][c] for c in keys]
        row = torch.tensor(row, dtype=torch.float64)
        dist.all_reduce(row)                                  # sums over ranks (loss, time: means)
        rss = torch.tensor([_rss_gib()], dtype=torch.float64)
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
        if rank == 0:
            out.put(("step", t, row.tolist(), rss.item()))
    zero.close()
    dist.destroy_process_group()
    if rank == 0:
        out.put(("done",))


def scale(a) -> None:
    h, L = a.hidden, a.layers
    if L is None:                                          # Ψ ≈ 12·L·h² + (V + s)·h
        L = max(1, round((a.params_b * 1e9 - (a.vocab + a.seq) * h) / (12 * h * h)))
    kw = dict(vocab_size=a.vocab, seq_len=a.seq, n_layer=L, n_head=a.heads, n_embd=h)
    psi = 12 * L * h * h + 13 * L * h + (a.vocab + a.seq) * h + 2 * h
    state = 16 * psi
    free = shutil.disk_usage(a.dir).free
    print(f"# GPT {psi / 1e9:.2f}B params (L={L}, h={h}), fp32 params+grads+Adam = {state / 2**30:.1f} GiB; "
          f"machine memory {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB; "
          f"{free / 2**30:.1f} GiB free in {a.dir}; ZeRO-3 over {a.ranks} gloo rank(s), params and optimizer "
          f"state on NVMe, batch {a.batch}x{a.seq} per rank", flush=True)
    w, r = disk_bandwidth(a.dir, int(a.dd_gib * 2**30))
    print(f"disk, sequential O_DIRECT, 1 thread: write {w / 1e9:.2f} GB/s, read {r / 1e9:.2f} GB/s", flush=True)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = mp.start_processes(_scale_rank, args=(a.ranks, port, a, kw, q), nprocs=a.ranks, join=False,
                               start_method="spawn")
    while True:
        try:
            msg = q.get(timeout=30)
        except Exception:
            if procs.join(timeout=1):
                return
            continue
        if msg[0] == "done":
            break
        if msg[0] == "built":
            (secs, rss), kernel = msg[1], msg[2]
            print(f"built on meta and written to the stores in {secs:.0f} s; peak RSS {rss:.2f} GiB per process; "
                  f"kernel {kernel}")
            print("\n| step | loss | step s (of it the optimizer step) | opt-store read/written GB "
                  "| param-store read/written GB | "
                  "wait on reads s (sum over ranks) | disk GB/s (read+write) | dd time for these bytes / step time "
                  "| peak RSS GiB per process |\n|---|---|---|---|---|---|---|---|---|", flush=True)
            continue
        _, t, row, rss = msg
        loss, dt, opt_s = row[0], row[1], row[2]
        o, p = row[3:8], row[8:13]
        read, written = o[2] + p[2], o[3] + p[3]
        busy = read / r + written / w           # seconds the disk needs for these bytes at dd's rates
        print(f"| {t} | {loss:.4f} | {dt:.1f} ({opt_s:.1f}) | {o[0] / 1e9:.2f} / {o[1] / 1e9:.2f} | {p[0] / 1e9:.2f} / "
              f"{p[1] / 1e9:.2f} | {o[4] + p[4]:.1f} | {(read + written) / dt / 1e9:.2f} | {busy:.0f} s / "
              f"{dt:.0f} s = {busy / dt:.0%} | {rss:.2f} |", flush=True)
    procs.join()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["overhead", "scale"], default="overhead")
    ap.add_argument("--dir", default=None, help="directory for the nvme stores (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--buffer-mb", type=float, default=16.0)
    ap.add_argument("--buffers", type=int, default=4)
    ap.add_argument("--size", choices=sorted(SIZES), default="50m", help="overhead: the GPT (5m for smoke runs)")
    ap.add_argument("--int8", action="store_true",
                    help="overhead: also cpu and nvme with 8-bit Adam moments (optimizer.state_dtype=int8)")
    ap.add_argument("--params-b", type=float, default=2.0)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dd-gib", type=float, default=4.0)
    ap.add_argument("--grad-clip", type=float, default=None,
                    help="scale: clip the global grad norm (then the update cannot start inside backward)")
    ap.add_argument("--ranks", type=int, default=2,
                    help="scale: dp ranks (processes), each holding 1/ranks of the state")
    a = ap.parse_args()
    if a.mode == "overhead":
        overhead(a)
    else:
        a.dir = a.dir or tempfile.gettempdir()
        scale(a)


if __name__ == "__main__":
    main()
