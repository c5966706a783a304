"""Context parallelism's device paths at world size 1 (issue 23): what one GPU can check of ring attention and
Ulysses, which otherwise have only run on gloo CPU ranks. NCCL needs one GPU per rank, so cp > 1 on NCCL cannot
run on a single GPU; these checks cover the parts that do not depend on the number of ranks. Called by
benchmarks/gpu_check.py (and runnable alone: ``python benchmarks/gpu_check_cp.py``; on CPU a smoke run).

Checks (each prints ok / FAILED / skip with the numbers), q (b, h, s, d) against k/v (b, h_kv, s, d), GQA:
1. ring block kernels on the device at cp = 1 (parallel/context_parallel/blocks.py through ring_attention):
   output and q/k/v gradients = plain softmax attention (fp32, on the device), causal, within packed
   documents, and with a sliding window, to 2e-5;
2. the row-chunked kernels (SCORE_ELEMS forced down to 16 rows per chunk) = the one-chunk result (dK, dV summed
   over the chunks in another order: 1e-5), and the online-softmax merge of two key halves (blocks.merge) = the
   block over all keys (fp32, 1e-5);
3. bf16 inputs: the ring keeps its partial output and log-sum-exp in fp32 and rounds once, so its error
   against the fp32 result is at most that of torch's bf16 SDPA (× 1.5 + 1e-3); the same merge with the
   partial output rounded to bf16 after each half (what a bf16 accumulator would do) is reported next to it;
4. Ulysses at cp = 1: its all-to-alls through the real backend (NCCL on CUDA: all_to_all_single at world 1)
   and SDPA on the head shard = plain attention (2e-5);
Reported, not asserted: forward + backward seconds of the ring at cp = 1 (its blockwise kernels, rows a few at a
time) ÷ torch's SDPA on the same causal attention (b 1, 16 heads, d 64, s 4096 bf16 on CUDA; s 128 fp32 on CPU) —
what the ring's unfused blocks cost against a fused kernel.
5. CUDA only: the ring's forward + backward at cp = 1 under ``torch.cuda.set_sync_debug_mode("error")`` — no
   host sync per block (a sync raises and is reported with the op that made it); Ulysses likewise.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from parallel.context_parallel import blocks  # noqa: E402
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


def run(device: torch.device, check, group=None, speed: bool = True) -> None:
    """The checks of the module docstring on ``device``; ``check(name, ok, detail)`` prints and counts; ``group``: a
    cp group of one rank (default: a world-1 mesh's); ``speed``: also time the ring against SDPA (reported)."""
    if group is None:
        from parallel.mesh import Mesh
        group = Mesh(cp=1, device=device).group("cp")
    q, k, v, dout = _inputs(device)
    b, s = q.shape[0], q.shape[2]
    errs = {}
    for name, (vis, allow) in _masks(b, s, device).items():
        got = _grads(lambda q_, k_, v_, vis=vis: ring_attention(q_, k_, v_, group, True, vis), q, k, v, dout)
        errs[name] = _err(got, _grads(lambda q_, k_, v_, allow=allow: _plain(q_, k_, v_, allow), q, k, v, dout))
    check("cp ring kernels", max(errs.values()) <= 2e-5, f"{device.type} fp32, max |Δ| vs plain attention (output, "
          f"dq, dk, dv): " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))

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
    check("cp row chunks + merge", max(e_chunk, e_merge) <= 1e-5, f"chunked vs one chunk {e_chunk:.1e}; merge of two "
          f"key halves vs all keys {e_merge:.1e} (output and lse)")

    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    ref = _plain(q, k, v, _masks(b, s, device)["causal"][1])
    ring_b = ring_attention(qb, kb, vb, group).float()
    sdpa_b = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True).float()
    o1, l1 = blocks.block_forward(qb, kb[:, :, :s // 2], vb[:, :, :s // 2], allow, d_scale(q))
    o2, l2 = blocks.block_forward(qb, kb[:, :, s // 2:], vb[:, :, s // 2:], allow, d_scale(q))
    full = _plain(q, k, v, torch.ones(b, s, s, dtype=torch.bool, device=device)).reshape(o1.shape)
    m32 = blocks.merge(o1, l1, o2, l2)[0]
    m16 = blocks.merge(o1.bfloat16().float(), l1, o2.bfloat16().float(), l2)[0].bfloat16().float()
    e_ring, e_sdpa = (ring_b - ref).abs().max().item(), (sdpa_b - ref).abs().max().item()
    check("cp bf16 merge", e_ring <= 1.5 * e_sdpa + 1e-3, f"max |Δ| vs fp32: ring {e_ring:.2e}, torch SDPA bf16 "
          f"{e_sdpa:.2e}; two-half merge with fp32 partials {(m32 - full).abs().max().item():.2e}, with bf16-rounded "
          f"partials {(m16 - full).abs().max().item():.2e}")

    uly = _grads(lambda q_, k_, v_: ulysses_attention(q_, k_, v_, group), q, k, v, dout)
    e_uly = _err(uly, _grads(lambda q_, k_, v_: _plain(q_, k_, v_, _masks(b, s, device)["causal"][1]), q, k, v, dout))
    check("cp ulysses", e_uly <= 2e-5, f"{dist.get_backend()} all_to_all_single at world 1 + SDPA, max |Δ| vs plain "
          f"attention {e_uly:.1e}")

    if speed:
        _speed(device, group)
    if device.type != "cuda":
        print("[skip] cp host syncs: CPU run (torch.cuda.set_sync_debug_mode needs CUDA)")
        return
    found = {}
    for name, fn in (("ring", lambda q_, k_, v_: ring_attention(q_, k_, v_, group, True,
                                                                 _masks(b, s, device)["documents"][0])),
                     ("ulysses", lambda q_, k_, v_: ulysses_attention(q_, k_, v_, group))):
        _grads(fn, q, k, v, dout)                              # warm-up: kernels chosen, caches filled
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            _grads(fn, q, k, v, dout)
            found[name] = "none"
        except RuntimeError as e:
            found[name] = " ".join(str(e).split())[:200]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    check("cp host syncs", all(f == "none" for f in found.values()),
          "; ".join(f"{n}: {f}" for n, f in found.items()))


def _speed(device, group, repeats: int = 3) -> None:
    cuda = device.type == "cuda"
    q, k, v, dout = _inputs(device, b=1, h=16, hk=16, s=4096 if cuda else 128, d=64,
                            dtype=torch.bfloat16 if cuda else torch.float32)
    fns = {"ring": lambda q_, k_, v_: ring_attention(q_, k_, v_, group),
           "sdpa": lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)}
    best = {}
    for name, fn in fns.items():
        _grads(fn, q, k, v, dout)                              # warm-up
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            _grads(fn, q, k, v, dout)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    r, f = best["ring"], best["sdpa"]
    print(f"[info] cp ring vs SDPA at cp = 1: forward + backward {r * 1e3:.1f} ms vs {f * 1e3:.1f} ms = {r / f:.2f}× "
          f"({device.type}, s = {q.shape[2]}, {q.dtype}; best of {repeats})")


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
