"""ZeRO vs its peers, side by side in one run: stage 0/1/2 against torch DDP, stage 3 against FSDP2.

    python benchmarks/bench_zero.py --sizes 5m 50m --repeats 10

Two gloo ranks with one thread each train the example GPT with AdamW; every configuration is built
once, warmed up, then timed one step at a time, *interleaved* (config A, B, C, A, B, C, …) so slow
phases of a shared machine hit all of them alike. Reported: median step time per configuration and
its ratio to the peer (DDP for stages 0–2, FSDP2 ``fully_shard`` per block for stage 3, which ZeRO
matches with ``unit_types=(Block,)``; stages 1–2 run with ``overlap_param_gather``). Times are only
meaningful on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {"5m": dict(n_embd=256, n_layer=6, n_head=8, vocab_size=512, seq_len=64),
         "50m": dict(n_embd=512, n_layer=16, n_head=8, vocab_size=1024, seq_len=64)}
BUCKET_MB = 5.0                 # both DDP and ZeRO; 25 would put the whole 5M model in one bucket
CONFIGS = ["ddp", "zero0", "zero1", "zero2", "fsdp2", "zero3"]
PEER = {"zero0": "ddp", "zero1": "ddp", "zero2": "ddp", "zero3": "fsdp2"}


def _build(name, kw, group, mesh):
    from examples.gpt import GPT, Block
    from parallel.config import ZeroConfig
    from parallel.zero import ZeroOptimizer
    torch.manual_seed(0)
    model = GPT(**kw)
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-4)      # noqa: E731
    if name == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB)
        opt = adamw(list(ddp.parameters()))
        return ddp, opt.step, lambda: opt.zero_grad(set_to_none=False)
    if name == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = adamw(list(model.parameters()))
        return model, opt.step, opt.zero_grad
    stage = int(name[-1])
    kwargs = {"unit_types": (Block,)} if stage == 3 else {"overlap_param_gather": stage in (1, 2)}
    zero = ZeroOptimizer(model, adamw, group, ZeroConfig(stage=stage, bucket_mb=BUCKET_MB), **kwargs)
    return model, zero.step, zero.zero_grad


def _step(run, x):
    """One training step of a built configuration ``run = (model, opt_step, zero_grad)`` on tokens ``x``."""
    model, opt_step, zero_grad = run
    zero_grad()
    logits = model(x)
    F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    opt_step()


def _rank(rank, world, port, sizes, repeats, batch, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.mesh import Mesh
    group = Mesh(dp=world).group("dp")
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for size in sizes:
        kw = SIZES[size]
        runs = {c: _build(c, kw, group, mesh) for c in CONFIGS}
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, kw["vocab_size"], (batch, kw["seq_len"]), generator=g)

        for c in CONFIGS:                                 # warm-up (and stage 3's trace)
            _step(runs[c], x)
            _step(runs[c], x)
        times = {c: [] for c in CONFIGS}
        for _ in range(repeats):
            for c in CONFIGS:
                dist.barrier()
                t0 = time.perf_counter()
                _step(runs[c], x)
                dist.barrier()
                times[c].append(time.perf_counter() - t0)
        n = sum(p.numel() for p in runs["ddp"][0].parameters())
        results[size] = (n, {c: statistics.median(v) for c, v in times.items()})
        del runs
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["5m"], choices=sorted(SIZES))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(2, port, a.sizes, a.repeats, a.batch, q), nprocs=2, start_method="spawn")
    res = q.get()
    print(f"2 gloo ranks x 1 thread, AdamW, batch {a.batch}x{SIZES[a.sizes[0]]['seq_len']} per rank, "
          f"median of {a.repeats} interleaved steps")
    for size, (n, med) in res.items():
        print(f"\n{size}: {n / 1e6:.1f}M parameters")
        for c in CONFIGS:
            ratio = f"  {med[c] / med[PEER[c]]:.2f}x {PEER[c]}" if c in PEER else ""
            print(f"  {c:6s} {med[c] * 1e3:8.1f} ms{ratio}")


if __name__ == "__main__":
    main()
