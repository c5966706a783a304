"""Ring attention's messages are matched by issue order alone (parallel/context_parallel/ring.py), as NCCL
matches point-to-point messages — it ignores tags — so the ring is NCCL-safe in this respect without a GPU.

With every ring message sent with tag 0 (``order_matched``: gloo then matches by order per pair of ranks only)
the output and the q/k/v gradients are bitwise those of the tagged run, and equal one process's attention to
1e-5; each rank's recorded issue order satisfies, for every pair (r, p), "the j-th message r sends to p is the
j-th message p receives from r" (kind and bytes). The K‖V and fp32 dK‖dV messages have equal sizes in fp32, so
a swapped pair would be silent: only the numbers catch it. Default: cp2 (causal, packed documents with GQA).
Slow: cp4 (causal, a sliding window that skips chunk pairs), and GPT training through the engine at cp4 with
tag 0 = tagged, bitwise.
"""
import contextlib

import pytest
import torch
from harness import run_ranks
from test_context_parallel import _packed_positions, _reference_attention


def _run(cp, tensors, world, r, window):
    """This rank's ring attention output and q/k/v gradients for the whole-sequence ``tensors``."""
    from parallel.context_parallel import shard
    q, k, v, dout = tensors
    ql, kl, vl = (shard(t, world, r, dim=2).requires_grad_() for t in (q, k, v))
    o = cp.attention(ql, kl, vl, causal=True, window=window)
    o.backward(shard(dout, world, r, dim=2))
    return [o.detach(), ql.grad, kl.grad, vl.grad]


def _attention(rank, world, cases):
    from parallel.context_parallel import ContextParallel, shard
    from parallel.context_parallel.ring import order_matched
    from parallel.mesh import Mesh
    mesh = Mesh(cp=world)
    out = []
    for b, s, h, hk, d, packed, window in cases:
        gen = torch.Generator().manual_seed(0)
        q, dout = (torch.randn(b, h, s, d, generator=gen) for _ in range(2))
        k, v = (torch.randn(b, hk, s, d, generator=gen) for _ in range(2))
        pos = _packed_positions(b, s) if packed else None
        cp = ContextParallel(mesh.group("cp"), "ring")
        cp.shard_batch(torch.zeros(b, s, dtype=torch.long), None, pos)
        r = mesh.local_rank("cp")
        tagged = _run(cp, (q, k, v, dout), world, r, window)
        log: list = []
        with order_matched(log):
            zero = _run(cp, (q, k, v, dout), world, r, window)
        err = None
        if window is None:
            qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
            ref = _reference_attention(qr, kr, vr, pos)
            ref.backward(dout)
            err = max((a - shard(w, world, r, dim=2)).abs().max().item()
                      for a, w in zip(tagged, (ref, qr.grad, kr.grad, vr.grad)))
        out.append(dict(bitwise=all(torch.equal(a, z) for a, z in zip(tagged, zero)), log=log, err=err,
                        me=torch.distributed.get_rank()))
    return out


def _check(res, cases, world):
    for i, case in enumerate(cases):
        logs = {r[i]["me"]: r[i]["log"] for r in res}
        for r in res:
            got = r[i]
            assert got["bitwise"], (case, got["me"])
            assert got["err"] is None or got["err"] <= 1e-5, (case, got["me"], got["err"])
            kinds = {k for _, _, k, _ in got["log"]}
            assert kinds == {"kv", "acc"}, kinds                   # forward and backward both ran their ring
            assert len(got["log"]) == 2 * ((world - 1) + 2 * (world - 1)), len(got["log"])
        for a, log in logs.items():
            for p in logs:
                sent = [(k, n) for op, q, k, n in log if op == "send" and q == p]
                recv = [(k, n) for op, q, k, n in logs[p] if op == "recv" and q == a]
                assert sent == recv, (case, a, p, sent, recv)


CP2 = [(2, 16, 4, 4, 8, False, None), (2, 16, 4, 2, 8, True, None)]
CP4 = [(2, 32, 4, 2, 8, False, None), (1, 32, 4, 4, 8, False, 6)]


def test_ring_tag_zero_cp2_is_bitwise_and_order_matched():
    _check(run_ranks(_attention, 2, CP2), CP2, 2)


@pytest.mark.slow
def test_ring_tag_zero_cp4_is_bitwise_and_order_matched():
    _check(run_ranks(_attention, 4, CP4), CP4, 4)


def _train(rank, world):
    from engine_cases import config

    from parallel.config import import_object
    from parallel.context_parallel.ring import order_matched
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    cfg = config("gpt", [f"parallel.cp={world}", "parallel.cp_algorithm=ring", "train.steps=2"], world)
    data = import_object(cfg.data.factory, "data.factory")(**cfg.data.kwargs)
    losses = []
    for tags in (True, False):
        torch.manual_seed(0)
        eng = parallelize(import_object(cfg.model.factory, "model.factory")(**cfg.model.kwargs), cfg, Mesh(cp=world))
        with contextlib.nullcontext() if tags else order_matched():
            losses.append([eng.train_step(rank_batch(data, t, 8, 1, 0)) for t in range(2)])
        eng.close()
    return losses


@pytest.mark.slow
def test_gpt_cp4_ring_tag_zero_trains_bitwise_like_tagged():
    for tagged, zero in run_ranks(_train, 4):
        assert tagged == zero and len(tagged) == 2


def _gpu_check_cp(rank, world):
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from gpu_check_cp import run

    from parallel.mesh import Mesh
    out = []
    run(torch.device("cpu"), lambda name, ok, detail: out.append((name, ok, detail)), Mesh(dp=world).group("cp"),
        speed=False)
    return out


def test_gpu_check_cp_runs_on_cpu():
    """benchmarks/gpu_check_cp.py's checks (the ring's kernels on both block paths, row chunks, the merge in fp32 and
    bf16, the fused path's bf16 gradients, Ulysses at cp = 1) pass on CPU: the script the GPU run uses works."""
    for res in run_ranks(_gpu_check_cp, 2):
        assert [n for n, _, _ in res] == ["cp ring kernels (reference)", "cp ring kernels (fused)",
                                          "cp row chunks + merge", "cp bf16 merge", "cp bf16 fused gradients",
                                          "cp ulysses"]
        assert all(ok for _, ok, _ in res), res
