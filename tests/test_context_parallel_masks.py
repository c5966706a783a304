"""Context parallelism with a sliding window and with a dense (b, 1, s, s) mask (parallel/context_parallel/masks.py):
ring and Ulysses attention against plain masked softmax attention (fp32, forward and backward, 1e-5), and
the errors. (A transformers model with a sliding window through the registered attention: the slow test.)"""
import pytest
import torch
from harness import run_ranks

from parallel.context_parallel.masks import Visibility, dense_allow


def _reference(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    sc = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(sc.masked_fill(~mask[:, None], float("-inf")), -1) @ v


def _masks(b, s):
    """name → (the (b, s, s) mask one process applies, window, dense mask given to the cp context)."""
    i = torch.arange(s)
    causal = i[:, None] >= i[None, :]
    gen = torch.Generator().manual_seed(1)
    dense = (torch.rand(b, s, s, generator=gen) < 0.4) | torch.eye(s, dtype=torch.bool)   # sees future keys too
    doc = torch.tensor([0] * 7 + [1] * (s - 7))
    same = doc[:, None] == doc[None, :]
    return {"window5": ((causal & (i[:, None] - i[None, :] < 5)).expand(b, s, s), 5, None, None),
            "window3+docs": ((causal & same & (i[:, None] - i[None, :] < 3)).expand(b, s, s), 3, None, doc),
            "dense": (dense, None, dense[:, None].float().log().clamp(min=torch.finfo(torch.float32).min), None)}


def _case(rank, world, algorithm, rows=None):
    import parallel.context_parallel.blocks as blocks
    from parallel.context_parallel import ContextParallel, shard
    from parallel.mesh import Mesh
    mesh = Mesh(cp=world)
    b, h, hk, s, d = 2, 4, 2, 16, 8
    out = {}
    for name, (want_mask, window, dense, doc) in _masks(b, s).items():
        gen = torch.Generator().manual_seed(0)
        q, dout = (torch.randn(b, h, s, d, generator=gen) for _ in range(2))
        k, v = (torch.randn(b, hk, s, d, generator=gen) for _ in range(2))
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        ref = _reference(qr, kr, vr, want_mask)
        ref.backward(dout)
        cp = ContextParallel(mesh.group("cp"), algorithm)
        pos = None if doc is None else torch.cat([torch.arange(7), torch.arange(s - 7)])
        cp.shard_batch(torch.zeros(b, s, dtype=torch.long), None, pos)
        if dense is not None:
            cp.docs = Visibility(allow=dense_allow(dense, b, s))            # what micro.shard_micro sets
        r = mesh.local_rank("cp")
        ql, kl, vl = (shard(t, world, r, dim=2).requires_grad_() for t in (q, k, v))
        old, blocks.ROWS = blocks.ROWS, rows or blocks.ROWS
        try:
            o = cp.attention(ql, kl, vl, causal=True, window=window)
            o.backward(shard(dout, world, r, dim=2))
        finally:
            blocks.ROWS = old
        out[name] = max((a - shard(w, world, r, dim=2)).abs().max().item()
                        for a, w in ((o, ref), (ql.grad, qr.grad), (kl.grad, kr.grad), (vl.grad, vr.grad)))
    return out


def _all(rank, world):
    return {(a, rows): _case(rank, world, a, rows) for a, rows in (("ring", None), ("ulysses", None), ("ring", 3))}


def test_sliding_window_and_dense_mask_match_one_process():
    for res in run_ranks(_all, 2):
        for key, errs in res.items():
            assert set(errs) == {"window5", "window3+docs", "dense"}
            assert max(errs.values()) < 1e-5, (key, errs)


def test_mask_errors():
    with pytest.raises(ValueError, match="per-head attention mask"):
        dense_allow(torch.zeros(2, 4, 8, 8), 2, 8)
    with pytest.raises(ValueError, match="additive bias"):
        dense_allow(torch.full((2, 1, 8, 8), -1.5), 2, 8)
    with pytest.raises(ValueError, match="neither a \\(b, s\\) padding"):
        dense_allow(torch.zeros(2, 1, 8, 4, dtype=torch.bool), 2, 8)
    with pytest.raises(ValueError, match="positive number of tokens"):
        Visibility(window=0)
    from parallel.batch import MicroBatch as Micro
    from parallel.comm import Group
    from parallel.context_parallel import ContextParallel
    from parallel.context_parallel.micro import shard_micro
    cp = ContextParallel(Group(None, "cp", (0, 1), 0))
    m = torch.eye(8, dtype=torch.bool)[None, None].clone()
    m[0, 0, 3, 3] = False                                                  # query 3 sees nothing
    mb = Micro(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long), {"attention_mask": m})
    with pytest.raises(ValueError, match="hides every key from some query"):
        shard_micro(cp, mb, "plain", None)
