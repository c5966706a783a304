"""More of the engine's paths on the device at world size 1 (called by benchmarks/gpu_check.py; runnable alone:
``python benchmarks/gpu_check_paths.py``, on CPU a smoke run). Every CI test runs these paths on gloo CPU ranks;
this checks that they also hold with the parameters on CUDA, where host/device copies, pinned buffers, streams
and CUDA kernels (fused AdamW, cuBLAS, SDPA) replace the CPU ones.

Each variant trains the tiny GPT 3 steps on one batch and is compared with the plain ZeRO-1 run of the same
precision: fp32 variants to 1e-5 (relative, the arithmetic is the same up to summation order), the 8-bit moments
and fp16 to 5e-2 (they change the arithmetic: finite, decreasing, close), and each reports where its state
lives (device, pinned host, NVMe files).
"""
from __future__ import annotations

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

KW = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, seq_len=32)


def _train(device, precision="fp32", zero=None, optimizer=None, activation=None, steps=3):
    from gpu_check import _batch, _engine  # the engine and batch gpu_check.py's own checks use
    eng = _engine(KW, 2, zero or {"stage": 1}, precision, device, activation, optimizer=optimizer)
    data = _batch(KW, 2, device)
    losses = [eng.train_step(data) for _ in range(steps)]
    return losses, sorted({str(p.device) for p in eng.module.parameters()})


def run(device, check) -> None:
    cuda = device.type == "cuda"
    ref = {p: _train(device, p)[0] for p in ("fp32", "bf16")}
    with tempfile.TemporaryDirectory() as nvme:
        variants = [
            ("zero-3 module units fp32", "fp32", {"stage": 3}, None, None, 1e-5),
            ("zero-3 block units fp32", "fp32", {"stage": 3, "units": "block"}, None, None, 1e-5),
            ("zero-2 bf16", "bf16", {"stage": 2}, None, None, 1e-5),
            ("zero-3 bf16", "bf16", {"stage": 3}, None, None, 1e-5),
            ("optimizer offload nvme fp32", "fp32", {"stage": 2, "offload": {"optimizer": "nvme", "nvme_path": nvme}},
             None, None, 1e-5),
            ("param + optimizer offload cpu, zero-3 fp32", "fp32",
             {"stage": 3, "offload": {"optimizer": "cpu", "params": "cpu"}}, None, None, 1e-5),
            ("recompute full fp32", "fp32", None, None, {"policy": "full"}, 1e-5),
            ("recompute selective fp32", "fp32", None, None, {"policy": "selective"}, 1e-5),
            ("optimizer fused=false fp32", "fp32", None, {"name": "adamw", "lr": 1e-3, "fused": False}, None, 1e-5),
            ("8-bit Adam moments fp32", "fp32", None, {"name": "adamw", "lr": 1e-3, "state_dtype": "int8"}, None,
             5e-2),
            ("fp16 with loss scaling", "fp16", None, None, None, 5e-2),
        ]
        for name, prec, zero, opt, act, tol in variants:
            try:
                losses, where = _train(device, prec, zero, opt, act)
            except Exception as e:                   # noqa: BLE001 — reported, the next variant still runs
                check(f"path {name}", False, f"raised {type(e).__name__}: {e}")
                continue
            base = ref["bf16" if prec == "bf16" else "fp32"]
            err = max(abs(a - b) / abs(b) for a, b in zip(losses, base))
            ok = all(v == v for v in losses) and losses[-1] < losses[0] and err <= tol
            check(f"path {name}", ok, f"losses {[round(v, 6) for v in losses]}, max relative Δ vs zero-1 "
                  f"{prec if prec != 'fp16' else 'fp32'} {err:.1e} (≤ {tol:g}); parameters on {where or '?'}"
                  + ("" if cuda else " (CPU smoke run)"))


if __name__ == "__main__":
    import datetime
    import socket

    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=120))
    fails = []
    run(torch.device("cuda", 0) if cuda else torch.device("cpu"),
        lambda n, ok, d: (fails.append(n) if not ok else None, print(f"[{'ok' if ok else 'FAILED'}] {n}: {d}")))
    dist.destroy_process_group()
    sys.exit(1 if fails else 0)
