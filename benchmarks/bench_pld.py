"""Progressive layer dropping: time per training step with PLD on vs off, same steps, one process.

    python benchmarks/bench_pld.py --layers 8 --steps 40 --repeats 3

Both runs train the same GPT from the same seed on the same batches; PLD (theta, gamma) drops blocks
by :mod:`parallel.layer_drop`'s schedule. Runs are interleaved (off, on, off, on, …) and the median
of the per-run step times is reported with the ratio, and the fraction of blocks PLD skipped.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere
from examples.gpt import GPT, random_tokens  # noqa: E402
from parallel.layer_drop import apply_layer_drop  # noqa: E402


def run(pld_on: bool, a) -> tuple[float, float]:
    torch.manual_seed(0)
    model = GPT(vocab_size=256, seq_len=a.seq, n_layer=a.layers, n_head=4, n_embd=a.width)
    pld = apply_layer_drop(model, a.theta, a.gamma, 0) if pld_on else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = random_tokens(n=a.batch * a.steps, seq_len=a.seq, vocab_size=256)
    t0 = time.perf_counter()
    for t in range(a.steps):
        if pld:
            pld.step = t
        x, y = zip(*[data[i] for i in range(t * a.batch, (t + 1) * a.batch)])
        loss = F.cross_entropy(model(torch.stack(x)).flatten(0, 1), torch.stack(y).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    dt = (time.perf_counter() - t0) / a.steps
    frac = pld.dropped_count / (a.steps * a.layers) if pld else 0.0
    return dt, frac


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--theta", type=float, default=0.5)
    p.add_argument("--gamma", type=float, default=0.05)
    a = p.parse_args()
    torch.set_num_threads(1)
    off, on, frac = [], [], 0.0
    for _ in range(a.repeats):
        off.append(run(False, a)[0])
        dt, frac = run(True, a)
        on.append(dt)
    mo, mn = statistics.median(off), statistics.median(on)
    print(f"step time off {mo * 1e3:.1f} ms, on {mn * 1e3:.1f} ms (medians of {a.repeats}); "
          f"speed-up x{mo / mn:.2f}; blocks skipped {frac:.1%}; per-run off {[round(x * 1e3, 1) for x in off]} "
          f"on {[round(x * 1e3, 1) for x in on]}")


if __name__ == "__main__":
    main()
