"""Generation with a model whose weights exceed a memory budget: parallel3d's streamed inference from
the NVMe store side by side with Hugging Face accelerate's disk offload, on the same model in one run.

    python benchmarks/bench_offload_infer.py --dir /var/tmp --budget-mib 512 --new 16

Both engines start from the same safetensors file and run the same greedy loop (one full forward
per generated token over the last ``seq_len`` tokens), so their tokens must agree:

* ``parallel3d``: the GPT is built on the meta device; :class:`parallel.zero.inference.StreamedInference`
  reads the file one tensor at a time (``SafetensorsFile``: pread, no memory map), writes it unit by
  unit (one per transformer block and per embedding, plus the root's final norm and head) into an
  :class:`~parallel.offload.NvmeStore` of ``4 × budget/4`` buffers read with O_DIRECT, and streams
  the units back for every forward, one unit read ahead.
* ``accelerate``: ``init_empty_weights`` + ``infer_auto_device_map(max_memory={"cpu": budget})`` +
  ``load_checkpoint_and_dispatch(..., offload_folder=...)``: what fits the budget stays in memory,
  the rest is offloaded to disk (numpy memmaps) and loaded per module by accelerate's hooks.

Each engine runs in its own process (so peak RSS, ``ru_maxrss``, is its own); RSS after imports is
reported as well, since torch alone accounts for a few hundred MiB. Tokens/s are from the timed
generation after one warm-up forward. Page cache: accelerate's memmaps read through it, so on a
machine with free memory its "disk" re-reads come from RAM; our store runs twice, with O_DIRECT (every
token reads the disk, what a model much larger than RAM sees) and buffered (the page cache helps).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _greedy(call, idx, n, seq_len):
    with torch.no_grad():
        for _ in range(n):
            out = call(idx[:, -seq_len:])
            nxt = out[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], 1)
    return idx


def _save(kw, path):
    from safetensors.torch import save_file

    from examples.gpt import GPT
    torch.manual_seed(0)
    model = GPT(**kw)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, path)   # tied: once
    return sum(p.numel() for p in model.parameters())


def _ours(kw, path, workdir, budget, prompt, n_new, threads, direct, quant, q):
    torch.set_num_threads(threads)
    from examples.gpt import GPT, Block
    from parallel.offload import NvmeStore
    from parallel.zero.inference import SafetensorsFile, StreamedInference
    base = _rss_mib()
    with torch.device("meta"):                                  # as accelerate's init_empty_weights
        meta = GPT(**kw)
    store = NvmeStore(workdir, buffer_count=4, buffer_bytes=budget // 4, name="infer.bin", direct=direct)
    t0 = time.perf_counter()
    with SafetensorsFile(path) as f:                            # pread, one tensor at a time (no mmap)
        eng = StreamedInference(meta, store, unit_types=(Block, torch.nn.Embedding), weights=f, prefetch_depth=1,
                                quantize=quant, group_size=64)
    build = time.perf_counter() - t0
    _greedy(eng, prompt, 1, kw["seq_len"])                      # warm-up (and the module trace)
    before = eng.stats
    t0 = time.perf_counter()
    out = _greedy(eng, prompt, n_new, kw["seq_len"])
    dt = time.perf_counter() - t0
    s = eng.stats
    q.put(dict(tokens=out.tolist(), tok_s=n_new / dt, rss=_rss_mib(), base=base, build_s=build, direct=store.direct,
               read=s["bytes_read"] - before["bytes_read"], wait=s["fetch_wait_s"] - before["fetch_wait_s"],
               resident=s["peak_resident_bytes"], weights=s["weight_bytes"]))
    eng.close()


def _accelerate(kw, path, workdir, budget, prompt, n_new, threads, q):
    torch.set_num_threads(threads)
    from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch

    from examples.gpt import GPT
    base = _rss_mib()
    with init_empty_weights():
        model = GPT(**kw)
    t0 = time.perf_counter()
    dmap = infer_auto_device_map(model, max_memory={"cpu": budget}, no_split_module_classes=["Block"])
    model = load_checkpoint_and_dispatch(model, path, device_map=dmap, offload_folder=workdir,
                                         no_split_module_classes=["Block"])
    build = time.perf_counter() - t0
    model.eval()
    _greedy(model, prompt, 1, kw["seq_len"])
    t0 = time.perf_counter()
    out = _greedy(model, prompt, n_new, kw["seq_len"])
    dt = time.perf_counter() - t0
    on_disk = sum(1 for v in dmap.values() if v == "disk")
    q.put(dict(tokens=out.tolist(), tok_s=n_new / dt, rss=_rss_mib(), base=base, build_s=build, disk_modules=on_disk,
               modules=len(dmap)))


def _guarded(target, args, q):
    try:
        target(*args, q)
    except BaseException:
        import traceback
        q.put(RuntimeError(f"{target.__name__} failed:\n{traceback.format_exc()}"))


def _run(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_guarded, args=(target, args, q))
    p.start()
    res = q.get()
    p.join()
    if isinstance(res, BaseException):
        raise res
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=None, help="where the checkpoint, the store and accelerate's offload go")
    ap.add_argument("--budget-mib", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quant", action="store_true", help="fp32 vs int8 vs int4 weight-only streams (O_DIRECT) instead")
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="p3d-infer-", dir=a.dir)
    kw = dict(vocab_size=a.vocab, seq_len=a.seq, n_layer=a.layers, n_head=max(1, a.hidden // 64), n_embd=a.hidden,
              tie=False)                # untied: accelerate reloads parameters one by one and would break a tie
    ckpt = os.path.join(root, "gpt.safetensors")
    n = _run(_save_proc, kw, ckpt)                              # the full model exists only in this process
    budget = a.budget_mib * 2**20
    prompt = torch.randint(0, a.vocab, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    engines = {"direct": (_ours, True, None), "cached": (_ours, False, None), "acc": (_accelerate,)}
    if a.quant:
        engines = {"direct": (_ours, True, None), "int8": (_ours, True, "int8"), "int4": (_ours, True, "int4")}
    runs = {k: [] for k in engines}
    for _ in range(a.repeats):                                  # interleaved: load drifts hit every engine
        for k, (fn, *extra) in engines.items():
            workdir = os.path.join(root, "store" if fn is _ours else "acc")
            os.makedirs(workdir, exist_ok=True)
            runs[k].append(_run(fn, kw, ckpt, workdir, budget, prompt, a.new, a.threads, *extra))
    med = {k: dict(v[0], tok_s=statistics.median(r["tok_s"] for r in v), rss=max(r["rss"] for r in v))
           for k, v in runs.items()}
    if a.quant:
        _report_quant(a, n, runs, med)
        shutil.rmtree(root, ignore_errors=True)
        return
    ours, cached, acc = med["direct"], med["cached"], med["acc"]
    same = all(r["tokens"] == runs["acc"][0]["tokens"] for v in runs.values() for r in v)
    print(f"# GPT {n / 1e6:.0f}M params = {4 * n / 2**30:.2f} GiB fp32 weights; memory budget {a.budget_mib} MiB; "
          f"prompt {a.prompt}, {a.new} new tokens greedy (full forward per token), {a.threads} threads; "
          f"median of {a.repeats} interleaved runs per engine (peak RSS: the largest); load average "
          f"{os.getloadavg()[0]:.1f}")
    print("\n| engine | tokens/s | peak RSS MiB | RSS after imports MiB | load s | notes |\n|---|---|---|---|---|---|")
    for name, r in (("O_DIRECT: from the disk", ours), ("buffered: page cache, as accelerate", cached)):
        print(f"| parallel3d StreamedInference, nvme store, {name} | {r['tok_s']:.2f} | {r['rss']:.0f} | "
              f"{r['base']:.0f} | {r['build_s']:.1f} | {r['read'] / a.new / 2**30:.2f} GiB read per token, waiting "
              f"on reads {r['wait']:.1f} s; peak resident weights {r['resident'] / 2**20:.0f} MiB |")
    print(f"| accelerate disk offload | {acc['tok_s']:.2f} | {acc['rss']:.0f} | {acc['base']:.0f} | "
          f"{acc['build_s']:.1f} | {acc['disk_modules']} of {acc['modules']} device-map entries on disk |")
    print(f"\nsame tokens from both engines: {same}")
    shutil.rmtree(root, ignore_errors=True)


def _report_quant(a, n, runs, med):
    """fp32 vs int8 vs int4 from the same disk at the same store budget: tokens/s, bytes read, greedy tokens."""
    print(f"# GPT {n / 1e6:.0f}M params = {4 * n / 2**30:.2f} GiB fp32 weights; store budget {a.budget_mib} MiB "
          f"(O_DIRECT); prompt {a.prompt}, {a.new} new tokens greedy; {a.threads} threads; median of {a.repeats} "
          f"interleaved runs; paired ratio = median over repeats of (tok/s ÷ the same repeat's fp32); load "
          f"average {os.getloadavg()[0]:.1f}")
    print("\n| stream | tokens/s | ÷ fp32 [min, max] | GiB read per token | peak resident weights MiB | peak RSS MiB "
          "| greedy tokens = fp32 |\n|---|---|---|---|---|---|---|")
    for k in ("direct", "int8", "int4"):
        r = med[k]
        ratios = [x["tok_s"] / f["tok_s"] for x, f in zip(runs[k], runs["direct"])]
        same = all(x["tokens"] == runs["direct"][0]["tokens"] for x in runs[k])
        print(f"| {'fp32' if k == 'direct' else k} | {r['tok_s']:.2f} | {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] | {r['read'] / a.new / 2**30:.3f} | "
              f"{r['resident'] / 2**20:.0f} | {r['rss']:.0f} | {same} |")


def _save_proc(kw, path, q):
    q.put(_save(kw, path))


if __name__ == "__main__":
    main()
