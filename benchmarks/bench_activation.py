"""Activation checkpointing: step time of each policy vs none (paired), and the largest micro-batch × sequence
that fits a memory budget per policy (issue 20, item 6).

    python benchmarks/bench_activation.py                              # both parts, the defaults below
    python benchmarks/bench_activation.py --rounds 9 --budget-mib 2048 --seqs 256 512 1024
    python benchmarks/bench_activation.py --skip-time --budget-mib 8 --seqs 32 64   # a smoke run

One gloo rank (tests/harness.py) runs the GPT of examples/gpt.py through the engine (dp = tp = pp = 1, one
micro-batch per step, fp32 AdamW) under each policy of ``activation_checkpointing.policy``.

* Time: one engine per policy, built from the same seed; after a warm-up step, ``--rounds`` rounds each time
  one step of every policy, the order rotated per round; the ratio policy / none is taken within each round
  and its median reported (paired: a slow moment of the shared machine hits both sides of a ratio), with
  the median step time. Full recompute costs one more forward per block: about 4/3 of none's FLOPs.
* Budget: per policy and sequence length, the largest micro-batch whose measured peak — the peak of live
  tensor bytes over step 2 (:class:`parallel.planning.measure.LiveBytes`, CPU tensors included, the model
  states and the batch counted) — is at most ``--budget-mib``: doubling, then bisection, up to ``--max-mb``.
  Printed with the planner's prediction for that micro-batch (``predict(...).memory[0]['peak']``) and the
  largest micro-batch the planner would allow, so its fit answer is checked against the measurement.
  On a CPU device ``offload`` keeps its copies in the same memory: it fits what none fits (the device
  budget is what it frees on CUDA, where LiveBytes is given ``device="cuda"``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..")]

from harness import run_ranks  # noqa: E402

POLICIES = ("none", "full", "every", "selective", "offload")


def _engine(model: dict, seq: int, mb: int, policy: str, every: int):
    """(engine, batch factory) for one rank, dp = tp = pp = 1, global batch = one micro-batch of ``mb``."""
    import torch
    from engine_cases import config

    from parallel.config import import_object
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    data = {"n": 2 * mb, "seq_len": seq, "vocab_size": model["vocab_size"]}
    over = [f"model.kwargs={json.dumps({**model, 'seq_len': seq})}", f"data.global_batch_size={mb}",
            f"data.micro_batch_size={mb}", f"data.kwargs={json.dumps(data)}",
            f"activation_checkpointing.policy={policy}"] + ([f"activation_checkpointing.every={every}"]
                                                             if policy == "every" else [])
    cfg = config("gpt", over, 1)
    torch.manual_seed(cfg.train.seed)
    eng = parallelize(import_object(cfg.model.factory, "model.factory")(**cfg.model.kwargs), cfg, Mesh())
    ds = import_object(cfg.data.factory, "data.factory")(**cfg.data.kwargs)
    return eng, (lambda t: rank_batch(ds, t, mb, 1, 0))


def time_policies(rank, world, model: dict, seq: int, mb: int, policies, rounds: int, every: int) -> dict:
    """Rank body: {policy: [seconds per round]} (one step each, order rotated per round, after a warm-up)."""
    import torch
    torch.set_num_threads(1)
    engines = {p: _engine(model, seq, mb, p, every) for p in policies}
    for eng, batch in engines.values():
        eng.train_step(batch(0))
    out = {p: [] for p in policies}
    for r in range(rounds):
        order = list(policies[r % len(policies):]) + list(policies[:r % len(policies)])
        for p in order:
            eng, batch = engines[p]
            t0 = time.perf_counter()
            eng.train_step(batch(1 + r % 2))
            out[p].append(time.perf_counter() - t0)
    for eng, _ in engines.values():
        eng.close()
    return out


def _peak(model: dict, seq: int, mb: int, policy: str, every: int) -> int:
    from parallel.planning.measure import measure_step
    eng, batch = _engine(model, seq, mb, policy, every)
    eng.train_step(batch(0))
    out = measure_step(eng, batch(1))
    eng.close()
    return out["peak"]


def largest_fitting(rank, world, model: dict, seqs, policies, budget: int, max_mb: int, every: int) -> dict:
    """Rank body: {(policy, seq): (largest micro-batch with measured peak ≤ budget or 0, its peak)}."""
    import torch
    torch.set_num_threads(1)
    out = {}
    for seq in seqs:
        for p in policies:
            ok, bad, peaks = 0, None, {}
            mb = 1
            while mb <= max_mb:                          # doubling
                peaks[mb] = _peak(model, seq, mb, p, every)
                if peaks[mb] > budget:
                    bad = mb
                    break
                ok, mb = mb, mb * 2
            while bad is not None and bad - ok > 1:      # bisection
                mid = (ok + bad) // 2
                peaks[mid] = _peak(model, seq, mid, p, every)
                ok, bad = (mid, bad) if peaks[mid] <= budget else (ok, mid)
            out[(p, seq)] = (ok, peaks.get(ok, 0))
    return out


def predicted(model: dict, seq: int, mb: int, policy: str, every: int) -> float:
    from parallel.planning.planner import Layout, ModelSpec, TrainSpec, predict
    spec = ModelSpec(model["n_layer"], model["n_embd"], model["n_head"], model["vocab_size"], seq)
    return predict(spec, Layout(1, 1, 1, 0, 1), TrainSpec(mb, activation=policy, every=every, device="cpu")).peak_bytes


def planner_largest(model: dict, seq: int, policy: str, budget: int, max_mb: int, every: int) -> int:
    return max([mb for mb in range(1, max_mb + 1) if predicted(model, seq, mb, policy, every) <= budget] or [0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128, help="sequence length of the timing part")
    ap.add_argument("--mb", type=int, default=8, help="micro-batch of the timing part")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seqs", nargs="+", type=int, default=[64, 128, 256])
    ap.add_argument("--budget-mib", type=float, default=64.0)
    ap.add_argument("--max-mb", type=int, default=256)
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--skip-budget", action="store_true")
    a = ap.parse_args(argv)
    if "none" not in a.policies:
        ap.error("--policies must include none (the ratios are against it)")
    model = {"vocab_size": a.vocab, "seq_len": a.seq, "n_layer": a.layers, "n_head": a.heads, "n_embd": a.hidden}
    print(f"model {model}; one gloo rank, fp32 AdamW; every = {a.every}")
    if not a.skip_time:
        t = run_ranks(time_policies, 1, model, a.seq, a.mb, tuple(a.policies), a.rounds, a.every, timeout=3600)[0]
        print(f"\nstep time, micro-batch {a.mb} × seq {a.seq}, {a.rounds} paired rounds (median):")
        print(f"{'policy':<10} {'step s':>8} {'÷ none':>7}  (per-round ratios: min–max)")
        for p in a.policies:
            ratios = [x / y for x, y in zip(t[p], t["none"])]
            print(f"{p:<10} {statistics.median(t[p]):8.4f} {statistics.median(ratios):7.3f}  "
                  f"({min(ratios):.3f}–{max(ratios):.3f})")
    if not a.skip_budget:
        budget = int(a.budget_mib * 2 ** 20)
        got = run_ranks(largest_fitting, 1, model, tuple(a.seqs), tuple(a.policies), budget, a.max_mb, a.every,
                        timeout=3600)[0]
        print(f"\nlargest micro-batch within {a.budget_mib:g} MiB (measured peak of live bytes, step 2; "
              f"planner's estimate for it; planner's own largest):")
        print(f"{'policy':<10} {'seq':>5} {'mb':>5} {'mb×seq':>8} {'measured':>11} {'estimate':>11} {'ratio':>6} "
              f"{'planner mb':>10}")
        for seq in a.seqs:
            for p in a.policies:
                mb, peak = got[(p, seq)]
                est = predicted(model, seq, mb, p, a.every) if mb else 0.0
                pl = planner_largest(model, seq, p, budget, a.max_mb, a.every)
                ratio = f"{est / peak:6.3f}" if peak else "     -"
                print(f"{p:<10} {seq:>5} {mb:>5} {mb * seq:>8} {peak:>11} {est:>11.0f} {ratio} {pl:>10}"
                      + ("  (max-mb reached)" if mb == a.max_mb else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
