"""What an asynchronous checkpoint costs the training loop, against a synchronous save (issue 25, item 4).

    python benchmarks/bench_async_checkpoint.py --n-embd 384 --layers 6 --repeats 3

One process (gloo, world 1), a GPT trained with AdamW; interleaved repeats of three phases, each after
the same warm-up:

* ``base``: K steps, no save — the step time t;
* ``sync``: ``engine.save`` timed alone — S, what a synchronous checkpoint stalls training for;
* ``async``: :class:`parallel.checkpoint.async_save.AsyncSaver` ``save`` (the foreground part, timed: F —
  with the lazy snapshot of :mod:`parallel.checkpoint.snapshot` no copy of model state, which the writer thread
  makes while the next step's forward and backward run; its update waits for it if needed), then steps until
  the background write has committed (W steps, timed: T) — the stall is F + (T − W·t): the snapshot plus what
  the writer thread took from the steps (CPU, GIL, memory bandwidth).

Reported: medians of S, F and the stall, and stall / S (the issue asks ≤ 5 %); the first async save, which
plans the snapshot (runs, host buffers: once per layout), is timed apart; the saver's counted bytes (copied in
the stall / on the writer thread) and the time updates waited for the copy. On a CPU-only machine the
background writer competes with the training for the same cores, so the stall is an upper bound of a GPU
job's, where the steps run on the device. Times are wall clock: say how loaded the machine was.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.gpt import build, random_tokens  # noqa: E402
from parallel.checkpoint.async_save import AsyncSaver  # noqa: E402
from parallel.config import load_config  # noqa: E402
from parallel.data import rank_batch  # noqa: E402
from parallel.engine import parallelize  # noqa: E402
from parallel.mesh import Mesh  # noqa: E402


def _step(engine, data, i, gb):
    x, y = rank_batch(data, i, gb, 1, 0)
    return engine.train_step((x, y))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="K: steps per base phase")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    kw = {"vocab_size": 256, "seq_len": a.seq, "n_layer": a.layers, "n_head": 6, "n_embd": a.n_embd}
    cfg = load_config(data={"model": {"factory": "examples.gpt:build", "kwargs": kw},
                            "data": {"factory": "examples.gpt:random_tokens",
                                     "kwargs": {"n": 4096, "seq_len": a.seq, "vocab_size": 256},
                                     "global_batch_size": a.batch, "micro_batch_size": a.batch},
                            "optimizer": {"name": "adamw", "lr": 1e-3}}).validate(1)
    torch.manual_seed(0)
    engine = parallelize(build(**kw), cfg, Mesh())
    data = random_tokens(n=4096, seq_len=a.seq, vocab_size=256)
    root = tempfile.mkdtemp(dir=a.dir, prefix="p3d-async-bench-")
    saver = AsyncSaver(engine)
    i, rows = 0, {"t": [], "S": [], "F": [], "stall": [], "W": []}
    try:
        for _ in range(2):
            _step(engine, data, i, a.batch)
            i += 1
        t0 = time.perf_counter()                  # the first save plans the snapshot (once per layout)
        saver.save(os.path.join(root, "async_plan"), {})
        plan_s = time.perf_counter() - t0
        saver.wait()
        stats0 = dict(saver.stats)
        for r in range(a.repeats):
            t0 = time.perf_counter()
            for _ in range(a.steps):
                _step(engine, data, i, a.batch)
                i += 1
            t = (time.perf_counter() - t0) / a.steps
            t0 = time.perf_counter()
            engine.save(os.path.join(root, f"sync_{r}"), {})
            S = time.perf_counter() - t0
            t0 = time.perf_counter()
            saver.save(os.path.join(root, f"async_{r}"), {})
            F = time.perf_counter() - t0
            t1, w = time.perf_counter(), 0
            while saver.thread is not None and saver.thread.is_alive():
                _step(engine, data, i, a.batch)
                i += 1
                w += 1
            T = time.perf_counter() - t1
            saver.wait()
            rows["t"].append(t)
            rows["S"].append(S)
            rows["F"].append(F)
            rows["W"].append(w)
            rows["stall"].append(F + max(T - w * t, 0.0))
            print(f"repeat {r}: step {t * 1e3:.1f} ms, sync save {S * 1e3:.0f} ms, async snapshot {F * 1e3:.0f} ms, "
                  f"{w} steps during the write took {T * 1e3:.0f} ms", flush=True)
        size = sum(os.path.getsize(os.path.join(root, "sync_0", f)) for f in os.listdir(os.path.join(root, "sync_0")))
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"checkpoint {size / 2**20:.1f} MiB; medians: step {med['t'] * 1e3:.1f} ms, sync save "
              f"{med['S'] * 1e3:.0f} ms, async stall {med['stall'] * 1e3:.0f} ms (snapshot {med['F'] * 1e3:.0f} ms) "
              f"= {100 * med['stall'] / med['S']:.1f} % of the sync save; snapshot alone "
              f"{100 * med['F'] / med['S']:.1f} %")
        st = {k: v - stats0.get(k, 0) for k, v in saver.stats.items()}
        print(f"first async save (plans the snapshot): {plan_s * 1e3:.0f} ms; over the {a.repeats} timed saves: "
              f"{st.get('stall_bytes', 0)} B copied in the step-boundary stall, {st.get('background_bytes', 0)} B on "
              f"the writer thread, updates waited {st.get('waited_s', 0.0) * 1e3:.0f} ms for the copy, "
              f"{st['plans']} plans rebuilt")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        engine.close()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
