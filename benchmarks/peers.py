"""The peer suite: one model, one batch, ours against torch DDP, FSDP2 and DeepSpeed, in one run.

    python benchmarks/peers.py                       # 2 ranks × 1 thread, 7 repeats → benchmarks/RESULTS.md
    python benchmarks/peers.py --repeats 9 --world 2 --size 5m --out /tmp/peers.md

Every configuration trains the same GPT (examples/gpt.py, fp32, AdamW, same seed) on the same
global batch: ours at ZeRO 0/1/2/3 (data parallel over all ranks), tensor parallel, pipeline
parallel (1F1B, 4 micro-batches) and 3D (pp×dp×tp = 2×2×2, only with --world 8); torch
DistributedDataParallel; FSDP2 (``fully_shard`` per block, then the root); DeepSpeed ZeRO 1/2/3
(CPU accelerator, gloo). All are built once in the same rank processes, warmed up, then timed one
step at a time *interleaved* (A, B, C, …, A, B, C, …), so a slow phase of a shared machine hits
them alike; each step sits between two barriers and rank 0's wall time counts. Reported: median
and [min, max] per configuration, the ratio of medians to DDP and to the natural peer, the loss
of the first step (the same model and batch give the same number), and the run's measured gloo
all-reduce latency (4 bytes) and bandwidth (4 MiB, ring bus bandwidth 2(N−1)/N·M/t).

DeepSpeed: used when importable; else the suite re-runs itself under ``$P3D_DEEPSPEED_PYTHON`` (or
``--python``, or /tmp/dsvenv/bin/python when that has it); else its rows say why they did not run.
Install: ``pip install --no-build-isolation deepspeed`` after torch; it runs with DS_ACCELERATOR=cpu.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {"small": dict(n_embd=128, n_layer=4, n_head=4, vocab_size=256, seq_len=64),
         "5m": dict(n_embd=256, n_layer=6, n_head=8, vocab_size=512, seq_len=64),
         "50m": dict(n_embd=512, n_layer=16, n_head=8, vocab_size=1024, seq_len=64)}
OURS = ["zero0", "zero1", "zero2", "zero3", "tp", "pp", "3d"]
PEERS = ["ddp", "fsdp2", "ds1", "ds2", "ds3"]
PEER_OF = {"zero0": "ddp", "zero1": "ds1", "zero2": "ds2", "zero3": "fsdp2", "tp": "ddp", "pp": "ddp", "3d": "ddp",
           "fsdp2": "ddp", "ds1": "ddp", "ds2": "ddp", "ds3": "fsdp2"}
WHAT = {"zero0": "ours: data parallel (ZeRO-0)", "zero1": "ours: ZeRO-1", "zero2": "ours: ZeRO-2",
        "zero3": "ours: ZeRO-3 (per block)", "tp": "ours: tensor parallel (Megatron)", "pp": "ours: pipeline 1F1B, m=4",
        "3d": "ours: pp2 × dp2 × tp2, ZeRO-1", "ddp": "torch DDP", "fsdp2": "torch FSDP2 fully_shard",
        "ds1": "DeepSpeed ZeRO-1", "ds2": "DeepSpeed ZeRO-2", "ds3": "DeepSpeed ZeRO-3"}
LR = 1e-4


def _ours(name, kw, batch, world):
    from examples.gpt import GPT
    from parallel.config import load_config
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    shape = {"zero0": (1, world, 1), "zero1": (1, world, 1), "zero2": (1, world, 1), "zero3": (1, world, 1),
             "tp": (1, 1, world), "pp": (world, 1, 1), "3d": (2, 2, 2)}[name]
    pp, dp, tp = shape
    m = 4 if pp > 1 else 1
    cfg = load_config(data={
        "model": {"factory": "examples.gpt:build", "kwargs": kw},
        "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": batch,
                 "micro_batch_size": batch // (dp * m), "kwargs": {"n": batch, "seq_len": kw["seq_len"],
                                                                   "vocab_size": kw["vocab_size"]}},
        "parallel": {"pp": pp, "dp": dp, "tp": tp}, "zero": {"stage": int(name[-1]) if name.startswith("zero") else
                                                             (1 if name == "3d" else 0), "bucket_mb": 5.0,
                                                             "units": "block"},     # ZeRO-3 per block, as FSDP2
        "optimizer": {"name": "adamw", "lr": LR}}).validate(world)
    from examples.gpt import random_tokens
    ds = random_tokens(batch, kw["seq_len"], kw["vocab_size"])
    mesh = Mesh(pp=pp, dp=dp, tp=tp)
    import torch
    torch.manual_seed(0)
    engine = parallelize(GPT(**kw), cfg, mesh)
    local = rank_batch(ds, 0, batch, dp, mesh.local_rank("dp"), 0, False)
    return lambda: engine.train_step(local)


def _peer(name, kw, batch, world, rank):
    import torch
    import torch.nn.functional as F

    from examples.gpt import GPT, random_tokens
    torch.manual_seed(0)
    model = GPT(**kw)
    ds = random_tokens(batch, kw["seq_len"], kw["vocab_size"])
    per = batch // world
    x, y = (torch.stack(t) for t in zip(*(ds[i] for i in range(rank * per, (rank + 1) * per))))
    V = kw["vocab_size"]

    def loss_of(out):
        return F.cross_entropy(out.reshape(-1, V), y.reshape(-1))
    if name == "ddp":
        mod = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=5)
        opt = torch.optim.AdamW(mod.parameters(), lr=LR)
    elif name == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        mod = fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(mod.parameters(), lr=LR)
    else:
        import deepspeed
        cfg = {"train_micro_batch_size_per_gpu": per, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": int(name[-1]), "reduce_bucket_size": 5 * 2 ** 20 // 4,
                                     "allgather_bucket_size": 5 * 2 ** 20 // 4},
               "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
        eng, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
                                            config=cfg, dist_init_required=False)

        def ds_step():
            loss = loss_of(eng(x))
            eng.backward(loss)
            eng.step()
            return loss.item()
        return ds_step

    def step():
        opt.zero_grad()
        loss = loss_of(mod(x))
        loss.backward()
        opt.step()
        return loss.item()
    return step


def _collectives(world):
    import torch
    import torch.distributed as dist

    def timed(t, n):
        ts = []
        for _ in range(n):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    small, big = torch.zeros(1), torch.zeros(2 ** 20)
    timed(small, 5)
    lat = timed(small, 50)
    t = timed(big, 10)
    return lat, 2 * (world - 1) / world * big.numel() * 4 / t


def _rank(rank, world, port, args, names, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import warnings
    warnings.filterwarnings("ignore")
    import logging
    logging.disable(logging.WARNING)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    kw, batch = SIZES[args.size], args.batch
    steps, skipped = {}, {}
    for name in names:
        if name == "3d" and world != 8:
            skipped[name] = "needs 8 ranks (pp2×dp2×tp2): see the 3D table below"
            continue
        try:
            steps[name] = _ours(name, kw, batch, world) if name in OURS else _peer(name, kw, batch, world, rank)
        except Exception as e:                          # a peer that cannot run here is reported, not fatal
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        dist.barrier()
    first = {}
    for name, fn in steps.items():
        for i in range(args.warmup):
            loss = fn()
            if i == 0:            # ours returns the global-batch mean; a peer its rank's share's mean
                t = torch.tensor([loss if name in OURS else loss / world], dtype=torch.float64)
                if name not in OURS:
                    dist.all_reduce(t)
                first[name] = t.item()
    times = {n: [] for n in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    lat, bw = _collectives(world)
    if rank == 0:
        q.put({"times": times, "first": first, "skipped": skipped, "lat": lat, "bw": bw})
    dist.destroy_process_group()


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _machine() -> str:
    cpu = cpu_name()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        mem = float("nan")
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def _versions() -> str:
    import torch
    try:
        import deepspeed
        ds = deepspeed.__version__
    except Exception:
        ds = "not installed"
    return f"Python {platform.python_version()}, torch {torch.__version__}, DeepSpeed {ds}"


def table(res: dict, args, names: list, world: int, header: bool = True) -> str:
    t, first = res["times"], res["first"]
    med = {n: statistics.median(v) for n, v in t.items()}
    kw = SIZES[args.size]
    import torch

    from examples.gpt import GPT
    with torch.device("meta"):
        psi = sum(p.numel() for p in GPT(**kw).parameters())
    head = [f"Machine: {_machine()}; {_versions()}.",
            f"Run: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {world} gloo ranks × {args.threads} thread, "
            f"GPT {kw} ({psi / 1e6:.2f}M params), fp32 AdamW, global batch {args.batch} × {kw['seq_len']} tokens; "
            f"{args.warmup} warm-up steps, then {args.repeats} interleaved timed steps per configuration.", ""]
    lines = (head if header else []) + [
             f"Measured in this run: gloo all-reduce latency {res['lat'] * 1e3:.2f} ms (4 bytes), bus bandwidth "
             f"{res['bw'] / 1e9:.2f} GB/s (4 MiB), {world} ranks.", "",
             "| configuration | what | median step (ms) | [min, max] | × DDP | peer | × peer | first loss |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for n in names:
        if n in res["skipped"]:
            lines.append(f"| {n} | {WHAT[n]} | — | — | — | {PEER_OF.get(n, '')} | — | not run: {res['skipped'][n]} |")
            continue
        peer = PEER_OF.get(n)
        r_ddp = f"{med[n] / med['ddp']:.2f}" if "ddp" in med else "—"
        r_peer = f"{med[n] / med[peer]:.2f}" if peer in med else "—"
        lines.append(f"| {n} | {WHAT[n]} | {med[n] * 1e3:.1f} | [{min(t[n]) * 1e3:.1f}, {max(t[n]) * 1e3:.1f}] | "
                     f"{r_ddp} | {peer if peer in med else '—'} | {r_peer} | {first[n]:.6f} |")
    if header:
        lines += ["", "Ratios of medians (lower is faster). Times on a shared machine are noisy: read the ratios "
                  "and the spread, not the milliseconds. First loss: the global-batch mean of step 1, same weights "
                  "and batch everywhere."]
    return "\n".join(lines) + "\n"


def _deepspeed_python(args) -> str | None:
    """A python that imports deepspeed, when this one does not."""
    try:
        import deepspeed  # noqa: F401
        return None
    except Exception:
        pass
    for cand in (args.python, os.environ.get("P3D_DEEPSPEED_PYTHON"), "/tmp/dsvenv/bin/python"):
        if cand and os.path.isfile(cand) and os.path.abspath(cand) != os.path.abspath(sys.executable):
            ok = subprocess.run([cand, "-c", "import deepspeed"], capture_output=True,
                                env={**os.environ, "DS_ACCELERATOR": "cpu"}).returncode == 0
            if ok:
                return cand
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", nargs="+", default=None, help="a subset of configurations")
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--no-3d", action="store_true", help="skip the 8-rank 3D section")
    ap.add_argument("--python", default=None, help="a python with deepspeed installed")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1 or args.batch % 8 or args.batch % args.world:
        ap.error(f"--repeats and --warmup must be >= 1, --batch a multiple of 8 and of --world ({args.world})")
    names = args.only or (["ddp"] + OURS + PEERS[1:])
    bad = [n for n in names if n not in WHAT]
    if bad:
        ap.error(f"unknown configurations {bad}; choose from {list(WHAT)}")
    if args.no_deepspeed:
        names = [n for n in names if not n.startswith("ds")]
    elif any(n.startswith("ds") for n in names) and not os.environ.get("P3D_PEERS_CHILD"):
        py = _deepspeed_python(args)
        if py:
            print(f"peers: running under {py} (it has DeepSpeed)", flush=True)
            env = {**os.environ, "P3D_PEERS_CHILD": "1", "PYTHONPATH": ROOT}
            return subprocess.call([py, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])],
                                   env=env)
    t0 = time.time()
    md = table(_section(args, args.world, names), args, names, args.world)
    if "3d" in names and args.world != 8 and not args.no_3d:
        print("peers: the 3D row runs on 8 ranks, with DDP on the same 8 for its ratio", flush=True)
        md += "\n### 3D (8 ranks: pp2 × dp2 × tp2 on this machine's cores, oversubscribed)\n\n" + \
            table(_section(args, 8, ["ddp", "3d"]), args, ["ddp", "3d"], 8, header=False)
    with open(args.out, "w") as f:
        f.write("# Peer suite results\n\n`python benchmarks/peers.py` "
                f"(took {time.time() - t0:.0f} s)\n\n" + md)
    print(md)
    print(f"written to {args.out}")
    return 0


def _section(args, world: int, names: list) -> dict:
    import torch.multiprocessing as mp
    q = mp.get_context("spawn").Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(world, port, args, names, q), nprocs=world, join=True, start_method="spawn")
    return q.get(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
