"""The ring's two block paths (parallel/context_parallel/fused.py vs blocks.py) at cp = 1 on this machine's device:
forward + backward seconds of ring attention, best of ``--repeats``, and the largest |fused − reference| over the
output and dq, dk, dv (causal, GQA when h_kv < h). What decided ring.FUSED's CPU default (docs/context_parallel.md).

    python benchmarks/bench_cp_blocks.py --shapes 1,16,16,128,64 2,4,2,512,32 1,16,16,2048,64

Each shape is b,h,h_kv,s,d; fp32 on CPU, bf16 on CUDA. On a shared CPU machine the times are "loaded": report the
load average with them (printed).
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parallel.context_parallel import ring  # noqa: E402
from parallel.mesh import Mesh  # noqa: E402


def _run(q, k, v, do, group):
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    o = ring.ring_attention(qs, ks, vs, group)
    o.backward(do)
    return [o.detach().float(), qs.grad.float(), ks.grad.float(), vs.grad.float()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["1,16,16,128,64", "2,4,2,512,32", "1,16,16,2048,64"])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=300))
    group = Mesh(cp=1, device=device).group("cp")
    dtype = torch.bfloat16 if cuda else torch.float32
    print(f"device {device}, torch {torch.__version__}, load average {open('/proc/loadavg').read().split()[:3]}")
    for shape in a.shapes:
        b, h, hk, s, d = map(int, shape.split(","))
        g = torch.Generator().manual_seed(0)
        q, do = (torch.randn(b, h, s, d, generator=g).to(device, dtype) for _ in range(2))
        k, v = (torch.randn(b, hk, s, d, generator=g).to(device, dtype) for _ in range(2))
        best, res = {}, {}
        for name, on in (("reference", False), ("fused", True)):
            with ring.fused_blocks(on):
                res[name] = _run(q, k, v, do, group)
                ts = []
                for _ in range(a.repeats):
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    _run(q, k, v, do, group)
                    if cuda:
                        torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
            best[name] = min(ts)
        err = max((x - y).abs().max().item() for x, y in zip(res["fused"], res["reference"]))
        print(f"b {b} h {h} h_kv {hk} s {s} d {d} {dtype}: reference {best['reference'] * 1e3:.1f} ms, fused "
              f"{best['fused'] * 1e3:.1f} ms, reference ÷ fused {best['reference'] / best['fused']:.2f}; "
              f"max |fused − reference| {err:.1e}", flush=True)
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
