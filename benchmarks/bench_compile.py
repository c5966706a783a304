"""Step time of our engine, eager vs ``compile`` (torch.compile per block), one process, fp32.

    python benchmarks/bench_compile.py --size 5m --repeats 5 --steps 10

Each row gets its own engine (same seed, same batch); the first step (Dynamo + backend compile) is
timed apart, then ``--repeats`` interleaved rounds of ``--steps`` steps per row; the median per-step
time and its ratio to eager are printed with the load average. On a shared CPU machine it is an
indication only (inductor's C++ kernels on CPU are not its CUDA/Triton path).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

SIZES = {"tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, seq_len=32),
         "5m": dict(n_embd=256, n_layer=6, n_head=8, vocab_size=512, seq_len=64)}


def _engine(kw, batch, comp):
    from examples.gpt import GPT
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    if not torch.distributed.is_initialized():           # world size 1 on a localhost TCP store
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    cfg = load_config(data={
        "model": {"factory": "examples.gpt:build", "kwargs": kw}, "compile": comp,
        "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": batch, "micro_batch_size": batch,
                 "kwargs": {"n": batch, "seq_len": kw["seq_len"], "vocab_size": kw["vocab_size"]}},
        "optimizer": {"name": "adamw", "lr": 1e-3}}).validate(1)
    torch.manual_seed(0)
    return parallelize(GPT(**kw), cfg, Mesh(dp=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="5m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backends", nargs="+", default=["aot_eager", "inductor"])
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    kw = SIZES[a.size]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, kw["vocab_size"], (a.batch, kw["seq_len"] + 1), generator=g)
    batch = (x[:, :-1], x[:, 1:])
    rows = {"eager": {"enabled": False}, **{b: {"enabled": True, "backend": b} for b in a.backends}}
    engines, first, losses = {}, {}, {}
    for name, comp in rows.items():
        engines[name] = _engine(kw, a.batch, comp)
        t0 = time.perf_counter()
        losses[name] = [engines[name].train_step(batch)]
        first[name] = time.perf_counter() - t0
    times = {k: [] for k in rows}
    for _ in range(a.repeats):                     # interleaved: the machine's load falls on every row alike
        for name, eng in engines.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                losses[name].append(eng.train_step(batch))
            times[name].append((time.perf_counter() - t0) / a.steps)
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    print(f"GPT {a.size} {kw}, batch {a.batch}, fp32, {a.threads} thread(s), dp 1, torch {torch.__version__}; "
          f"median of {a.repeats} interleaved rounds × {a.steps} steps; load average {' '.join(load)}")
    base = statistics.median(times["eager"])
    for name in rows:
        med = statistics.median(times[name])
        d = max(abs(u - v) for u, v in zip(losses[name], losses["eager"]))
        print(f"  {name:<10} {med * 1e3:8.2f} ms/step  ÷ eager {med / base:.3f}  first step {first[name]:6.1f} s  "
              f"max |loss − eager's| {d:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
