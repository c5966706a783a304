"""Quantized streamed inference in one process, paired: fp32 vs int8 / int4 with the weight-only matmul
kernels (``kernels=True``) and with dequantization (``kernels=False``), all from NVMe stores (O_DIRECT).

    python benchmarks/bench_quant_kernels.py --dir /var/tmp --hidden 512 --layers 8 --vocab 8192 --repeats 5

One GPT (random weights) is written into five stores; every repeat generates ``--new`` greedy tokens with each
engine in turn (interleaved, so load drifts hit every engine), and the paired ratio is each engine's tok/s ÷ the
same repeat's fp32 tok/s (median [min, max] over repeats). The cross-process benchmark with peak RSS is
``bench_offload_infer.py --quant``.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.gpt import GPT, Block  # noqa: E402
from parallel.offload import NvmeStore  # noqa: E402
from parallel.zero.inference import StreamedInference  # noqa: E402

ENGINES = {"fp32": (None, False), "int8": ("int8", True), "int4": ("int4", True),
           "int8-dequant": ("int8", False), "int4-dequant": ("int4", False)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget-mib", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    kw = dict(vocab_size=a.vocab, seq_len=a.seq, n_layer=a.layers, n_head=max(1, a.hidden // 64), n_embd=a.hidden,
              tie=False)
    torch.manual_seed(0)
    model = GPT(**kw)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    n_params = sum(p.numel() for p in model.parameters())
    del model
    root = tempfile.mkdtemp(prefix="p3d-qk-", dir=a.dir)
    engines = {}
    for name, (quant, kernels) in ENGINES.items():
        store = NvmeStore(root, buffer_count=4, buffer_bytes=a.budget_mib * 2**20 // 4,
                          name=f"{name}.bin", direct=True)
        engines[name] = StreamedInference(GPT(**kw), store, unit_types=(Block, torch.nn.Embedding), weights=state,
                                          quantize=quant, group_size=64, kernels=kernels)
    del state
    prompt = torch.randint(0, a.vocab, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    for eng in engines.values():
        eng.generate(prompt, 1)                                     # warm-up and the module trace
    rates = {k: [] for k in engines}
    tokens = {}
    for _ in range(a.repeats):
        for k, eng in engines.items():
            t0 = time.perf_counter()
            tokens[k] = eng.generate(prompt, a.new)
            rates[k].append(a.new / (time.perf_counter() - t0))
    print(f"# GPT {n_params / 1e6:.0f}M params, untied; {a.threads} thread(s); prompt {a.prompt}, {a.new} new greedy "
          f"tokens; store budget {a.budget_mib} MiB O_DIRECT; {a.repeats} interleaved repeats in one process; load "
          f"average {os.getloadavg()[0]:.1f}")
    print("\n| stream | tok/s (median) | ÷ fp32, paired median [min, max] | MiB read per forward | tokens = fp32 |")
    print("|---|---|---|---|---|")
    for k, eng in engines.items():
        ratios = [r / f for r, f in zip(rates[k], rates["fp32"])]
        read = eng.stats["weight_bytes"] / 2**20
        print(f"| {k} | {statistics.median(rates[k]):.2f} | {statistics.median(ratios):.2f} [{min(ratios):.2f}, "
              f"{max(ratios):.2f}] | {read:.1f} | {torch.equal(tokens[k], tokens['fp32'])} |")
    for eng in engines.values():
        eng.close()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
