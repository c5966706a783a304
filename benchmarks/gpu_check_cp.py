"""Context parallelism's device paths at world size 1 (issue 23): what one GPU can check of ring attention and
Ulysses, which otherwise have only run on gloo CPU ranks. NCCL needs one GPU per rank, so cp > 1 on NCCL cannot
run on a single GPU; these checks cover the parts that do not depend on the number of ranks. Called by
benchmarks/gpu_check.py (and runnable alone: ``python benchmarks/gpu_check_cp.py``; on CPU a smoke run).

Checks (each prints ok / FAILED / skip with the numbers), q (b, h, s, d) against k/v (b, h_kv, s, d), GQA:
1. ring block kernels on the device at cp = 1, on both block paths — "reference" (the fp32 row-chunked blocks of
   parallel/context_parallel/blocks.py) and "fused" (torch's fused kernels, parallel/context_parallel/fused.py) —
   output and q/k/v gradients = plain softmax attention (fp32, on the device), causal, within packed
   documents, with a sliding window, and not causal, to 2e-5;
2. the row-chunked kernels (SCORE_ELEMS forced down to 16 rows per chunk) = the one-chunk result (dK, dV summed
   over the chunks in another order: 1e-5), and the online-softmax merge of two key halves (blocks.merge) = the
   block over all keys (fp32, 1e-5);
3. bf16 inputs: the ring keeps its partial output and log-sum-exp in fp32 and rounds once, so its error
   against the fp32 result is at most that of torch's bf16 SDPA (× 1.5 + 1e-3); the same merge with the
   partial output rounded to bf16 after each half (what a bf16 accumulator would do) is reported next to it;
   the fused ring's bf16 output and gradients likewise (CUDA: the flash kernels) against SDPA's;
4. Ulysses at cp = 1: its all-to-alls through the real backend (NCCL on CUDA: all_to_all_single at world 1)
   and SDPA on the head shard = plain attention (2e-5);
Reported: forward + backward seconds of the ring at cp = 1, both block paths, ÷ torch's SDPA on the same causal
attention (b 1, 16 heads, d 64; bf16 on CUDA at s 4096 and 16384; s 128 fp32 on CPU). Asserted on CUDA: the fused
ring ≤ SPEED_LIMIT (2×) SDPA at s = 16384 (why 2×: :func:`_speed`).
5. CUDA only: the ring's forward + backward at cp = 1 under ``torch.cuda.set_sync_debug_mode("error")`` — no
   host sync per block (a sync raises and is reported with the op that made it), both block paths (documents) and
   the fused causal one; Ulysses likewise. (The first GPU run's failure: most likely the check's own host→device
   copy of the document ids inside the checked region — read from the code — now built before it.)
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from parallel.context_parallel import blocks, ring  # noqa: E402
from parallel.context_parallel.masks import Visibility  # noqa: E402
from parallel.context_parallel.ring import ring_attention  # noqa: E402
from parallel.context_parallel.ulysses import ulysses_attention  # noqa: E402


def _plain(q, k, v, allow):
    """softmax(q·kᵀ/√d masked)·v in fp32, GQA by repeating k/v; ``allow`` (b, s, s) bool."""
    g = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    sc = q.float() @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(sc.masked_fill(~allow[:, None], float("-inf")), -1) @ v


def _inputs(device, b=2, h=4, hk=2, s=64, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(b, h, s, d, generator=g) for _ in range(2))
    k, v = (torch.randn(b, hk, s, d, generator=g) for _ in range(2))
    return [t.to(device, dtype) for t in (q, k, v, dout)]


def _masks(b, s, device):
    """{name: (Visibility or None, (b, s, s) allow)}: causal, packed documents, a sliding window of 9."""
    i = torch.arange(s, device=device)
    causal = (i[:, None] >= i[None, :])[None].expand(b, s, s)
    docs = torch.stack([torch.cumsum((torch.arange(s) % n == 0).long(), 0) for n in (11, 23)][:b]).to(device)
    win = causal & ((i[:, None] - i[None, :]) < 9)[None]
    return {"causal": (None, causal), "documents": (Visibility(docs), causal & (docs[:, :, None] == docs[:, None])),
            "window 9": (Visibility(window=9), win)}


def _grads(fn, q, k, v, dout):
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(qs, ks, vs)
    out.backward(dout.to(out.dtype))
    return [out.detach().float(), qs.grad.float(), ks.grad.float(), vs.grad.float()]


def _err(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


PATHS = {"reference": False, "fused": True}     # ring.fused_blocks(on): the ring's two block paths
SPEED_LIMIT = 2.0                                # CUDA: fused ring fwd+bwd at cp = 1 ≤ this × SDPA's (see _speed)


def run(device: torch.device, check, group=None, speed: bool = True) -> None:
    """The checks of the module docstring on ``device``; ``check(name, ok, detail)`` prints and counts; ``group``: a
    cp group of one rank (default: a world-1 mesh's); ``speed``: also time the ring against SDPA (reported)."""
    if group is None:
        from parallel.mesh import Mesh
        group = Mesh(cp=1, device=device).group("cp")
    q, k, v, dout = _inputs(device)
    b, s = q.shape[0], q.shape[2]
    masks = _masks(b, s, device)
    cases = {n: (True, vis, allow) for n, (vis, allow) in masks.items()}
    cases["not causal"] = (False, None, torch.ones(b, s, s, dtype=torch.bool, device=device))

    def kernels():
        for path, on in PATHS.items():
            errs = {}
            for name, (causal, vis, allow) in cases.items():
                with ring.fused_blocks(on):
                    got = _grads(lambda q_, k_, v_, c=causal, vis=vis: ring_attention(q_, k_, v_, group, c, vis),
                                 q, k, v, dout)
                errs[name] = _err(got, _grads(lambda q_, k_, v_, allow=allow: _plain(q_, k_, v_, allow), q, k, v, dout))
            check(f"cp ring kernels ({path})", max(errs.values()) <= 2e-5, f"{device.type} fp32, max |Δ| vs plain "
                  f"attention (output, dq, dk, dv): " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))

    def chunks_merge():
        with ring.fused_blocks(False):
            whole = _grads(lambda q_, k_, v_: ring_attention(q_, k_, v_, group), q, k, v, dout)
            old = blocks.SCORE_ELEMS
            blocks.SCORE_ELEMS = 16 * q.shape[0] * q.shape[1] * s          # 16 query rows per chunk: 4 chunks
            try:
                chunked = _grads(lambda q_, k_, v_: ring_attention(q_, k_, v_, group), q, k, v, dout)
            finally:
                blocks.SCORE_ELEMS = old
        allow = torch.ones(1, s, s // 2, dtype=torch.bool, device=device)
        o1, l1 = blocks.block_forward(q, k[:, :, :s // 2], v[:, :, :s // 2], allow, d_scale(q))
        o2, l2 = blocks.block_forward(q, k[:, :, s // 2:], v[:, :, s // 2:], allow, d_scale(q))
        om, lm = blocks.merge(o1, l1, o2, l2)
        ow, lw = blocks.block_forward(q, k, v, torch.ones(1, s, s, dtype=torch.bool, device=device), d_scale(q))
        e_chunk, e_merge = _err(chunked, whole), max(_err([om], [ow]), _err([lm], [lw]))
        check("cp row chunks + merge", max(e_chunk, e_merge) <= 1e-5, f"chunked vs one chunk {e_chunk:.1e}; merge "
              f"of two key halves vs all keys {e_merge:.1e} (output and lse)")

    def bf16():
        allow = torch.ones(1, s, s // 2, dtype=torch.bool, device=device)
        qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
        ref = _plain(q, k, v, masks["causal"][1])
        sdpa_b = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True).float()
        e_sdpa = (sdpa_b - ref).abs().max().item()
        e_ring = {}
        for path, on in PATHS.items():
            with ring.fused_blocks(on):
                e_ring[path] = (ring_attention(qb, kb, vb, group).float() - ref).abs().max().item()
        o1, l1 = blocks.block_forward(qb, kb[:, :, :s // 2], vb[:, :, :s // 2], allow, d_scale(q))
        o2, l2 = blocks.block_forward(qb, kb[:, :, s // 2:], vb[:, :, s // 2:], allow, d_scale(q))
        full = _plain(q, k, v, torch.ones(b, s, s, dtype=torch.bool, device=device)).reshape(o1.shape)
        m32 = blocks.merge(o1, l1, o2, l2)[0]
        m16 = blocks.merge(o1.bfloat16().float(), l1, o2.bfloat16().float(), l2)[0].bfloat16().float()
        check("cp bf16 merge", max(e_ring.values()) <= 1.5 * e_sdpa + 1e-3, "max |Δ| vs fp32: ring " +
              ", ".join(f"{p} {e:.2e}" for p, e in e_ring.items()) + f", torch SDPA bf16 {e_sdpa:.2e}; two-half merge "
              f"with fp32 partials {(m32 - full).abs().max().item():.2e}, with bf16-rounded partials "
              f"{(m16 - full).abs().max().item():.2e}")
        want = _grads(lambda q_, k_, v_: _plain(q_, k_, v_, masks["causal"][1]), q, k, v, dout)
        sdpa = lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)  # noqa
        e_sdpa = _err(_grads(sdpa, qb, kb, vb, dout), want)
        with ring.fused_blocks(True):
            e_fused = _err(_grads(lambda q_, k_, v_: ring_attention(q_, k_, v_, group), qb, kb, vb, dout), want)
        check("cp bf16 fused gradients", e_fused <= 1.5 * e_sdpa + 1e-3, f"max |Δ| vs fp32 (output, dq, dk, dv): fused "
              f"ring {e_fused:.2e}, torch SDPA bf16 {e_sdpa:.2e}")

    def ulysses():
        uly = _grads(lambda q_, k_, v_: ulysses_attention(q_, k_, v_, group), q, k, v, dout)
        e_uly = _err(uly, _grads(lambda q_, k_, v_: _plain(q_, k_, v_, masks["causal"][1]), q, k, v, dout))
        check("cp ulysses", e_uly <= 2e-5, f"{dist.get_backend()} all_to_all_single at world 1 + SDPA, max |Δ| vs "
              f"plain attention {e_uly:.1e}")

    def syncs():
        if device.type != "cuda":
            print("[skip] cp host syncs: CPU run (torch.cuda.set_sync_debug_mode needs CUDA)")
            return
        found, docs = {}, masks["documents"][0]          # built before the sync-checked region (a host→device copy)
        ring_docs = lambda q_, k_, v_: ring_attention(q_, k_, v_, group, True, docs)            # noqa: E731
        for name, on, fn in (("ring reference", False, ring_docs), ("ring fused", True, ring_docs),
                             ("ring fused causal", True, lambda q_, k_, v_: ring_attention(q_, k_, v_, group)),
                             ("ulysses", False, lambda q_, k_, v_: ulysses_attention(q_, k_, v_, group))):
            with ring.fused_blocks(on):
                _grads(fn, q, k, v, dout)                          # warm-up: kernels chosen, caches filled
                torch.cuda.synchronize(device)
                torch.cuda.set_sync_debug_mode("error")
                try:
                    _grads(fn, q, k, v, dout)
                    found[name] = "none"
                except RuntimeError as e:
                    found[name] = " ".join(str(e).split())[:300]
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        check("cp host syncs", all(f == "none" for f in found.values()),
              "; ".join(f"{n}: {f}" for n, f in found.items()))

    sections = [("cp ring kernels", kernels), ("cp row chunks + merge", chunks_merge), ("cp bf16", bf16),
                ("cp ulysses", ulysses)] + ([("cp speed", lambda: _speed(device, group, check))] if speed else [])
    for name, fn in sections + [("cp host syncs", syncs)]:
        try:                                            # one failing check must not hide the others' results
            fn()
        except Exception as e:                         # noqa: BLE001 — reported as FAILED with its traceback
            traceback.print_exc()
            check(name, False, f"raised {type(e).__name__}: {e}")


def _time(fn, args, cuda, device, repeats):
    _grads(fn, *args)                                          # warm-up
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        _grads(fn, *args)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def _speed(device, group, check=None, repeats: int = 3) -> None:
    """Ring (reference and fused blocks) ÷ SDPA, forward + backward at cp = 1, causal, b 1, 16 heads, d 64: on CUDA
    bf16 at s = 4096 and 16384 (reference only at 4096: ~1 s a call), on CPU fp32 at s = 128. Asserted on CUDA at
    s = 16384: fused ≤ SPEED_LIMIT × SDPA. At cp = 1 the fused ring is SDPA's own flash kernels plus fp32 work
    linear in s (the merge into the fp32 accumulator, the (b, n, h, d) copy, dq/dk/dv accumulators and casts) and
    two tiny extra launches in the backward; at s = 16384 the kernels' s² work dominates that, so 2× leaves room
    for the linear part while still failing loudly on anything like the reference's 1297× (s = 4096)."""
    cuda = device.type == "cuda"
    sdpa = lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)      # noqa: E731
    rng = lambda q_, k_, v_: ring_attention(q_, k_, v_, group)                                # noqa: E731
    for s in ((4096, 16384) if cuda else (128,)):
        args = _inputs(device, b=1, h=16, hk=16, s=s, d=64, dtype=torch.bfloat16 if cuda else torch.float32)
        f = _time(sdpa, args, cuda, device, repeats)
        ratio = {}
        for path, on in PATHS.items():
            if on or not cuda or s <= 4096:
                with ring.fused_blocks(on):
                    r = _time(rng, args, cuda, device, repeats)
                ratio[path] = r / f
                print(f"[info] cp ring ({path}) vs SDPA at cp = 1: forward + backward {r * 1e3:.2f} ms vs "
                      f"{f * 1e3:.2f} ms = {r / f:.2f}× ({device.type}, s = {s}, {args[0].dtype}; best of {repeats})")
        if cuda and s == 16384 and check is not None:
            check("cp fused ring speed", ratio["fused"] <= SPEED_LIMIT, f"fused ring ÷ SDPA forward + backward at "
                  f"cp = 1, s = {s}: {ratio['fused']:.2f}× (limit {SPEED_LIMIT}×)")


def d_scale(q: torch.Tensor) -> float:
    return q.shape[-1] ** -0.5


def main() -> int:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=300))
    fails = []

    def check(name, ok, detail):
        fails.append(not ok)
        print(f"[{'ok' if ok else 'FAILED'}] {name}: {detail}")
    try:
        run(device, check)
    finally:
        dist.destroy_process_group()
    return 1 if any(fails) else 0


if __name__ == "__main__":
    sys.exit(main())
