"""ZeRO-1/2 gradient bookkeeping, counted (issue 18): per step, the elements each in-place division and copy
touches, from a TorchDispatchMode around one training step on 2 gloo ranks (one bucket of ≥ 256 KiB, so
the reduce-scatter runs on parallel.comm.ring). fp32 gradients are divided by N after the reduce-scatter,
on the rank's shard only (Ψ/N elements, was Ψ), and stage 1 reduces its chunk of the flat gradient in place
(no copy-back of the shard, was Ψ/N). Since parallel/data_parallel/fused_div.py (N = 2, a power of two) the
division is taken as each gradient enters the flat buffer (``torch.div(grad, N, out=view)``, neither a copy_ nor a
div_): no copy_ and no div_ of gradients at all; with ``reducer.fuse_div = False`` the counts above still hold.
Losses equal one process's (1e-5)."""
from collections import Counter

import torch
from harness import run_ranks
from test_zero import OPTS, assert_curve, global_batch, loss_of, reference_run
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.config import ZeroConfig

KW = dict(vocab_size=64, seq_len=16, n_layer=2, n_head=4, n_embd=64)      # ≈ 0.1 M params: 0.42 MB, one bucket
G, STEPS = 8, 2


class Moved(TorchDispatchMode):
    """Elements written by in-place divisions (div_) and copies (copy_) of tensors (not scalars: the norm's
    and the loss's one-element bookkeeping) while active."""

    def __init__(self):
        super().__init__()
        self.n = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("div_", "copy_") and args[0].numel() > 1:
            self.n[name] += args[0].numel()
        return func(*args, **(kwargs or {}))


def _model():
    from examples.gpt import GPT
    torch.manual_seed(0)
    return GPT(**KW)


def _ref():
    return reference_run(None, "adamw", STEPS, G, model=_model())[0]


def _run(rank, world):
    from parallel.comm import ring
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    g = Mesh(dp=world).group("dp")
    out = {"ref": _ref() if rank == 0 else None}
    for stage, fused in ((1, True), (2, True), (1, False), (2, False)):
        model = _model()
        zero = ZeroOptimizer(model, OPTS["adamw"], g, ZeroConfig(stage=stage))
        zero.reducer.fuse_div = fused
        per = G // world
        losses, moved, rs = [], None, ring.calls["reduce_scatter"]
        for t in range(STEPS):
            x, y = global_batch(t, G)
            x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
            mode = Moved()
            with mode:
                zero.zero_grad()
                zero.prepare_step(1)
                loss = loss_of(model, x, y)
                loss.backward()
                zero.step()
            losses.append(loss.item())
            moved = mode.n                                   # the last step's (the first also builds state)
        out[stage, fused] = dict(losses=losses, div=moved["div_"], copy=moved["copy_"],
                          rings=ring.calls["reduce_scatter"] - rs, shard=sum(b.shard for b in zero.buckets),
                          psi=sum(p.numel() for p in model.parameters()), buckets=len(zero.buckets))
    return out


def test_zero12_divide_the_shard_and_copy_nothing_back():
    res = run_ranks(_run, 2)
    ref = res[0]["ref"]
    for stage in (1, 2):
        got = [sum(r[stage, True]["losses"][i] for r in res) / 2 for i in range(STEPS)]
        assert_curve(got, ref, 1e-5, f"stage {stage}")
        assert all(r[stage, True]["losses"] == r[stage, False]["losses"] for r in res)     # bitwise (N = 2)
        for r in res:
            for fused in (True, False):
                c = r[stage, fused]
                assert c["buckets"] == 1 and c["rings"] == STEPS, c            # the ring path ran
                if fused:                                                      # divided on the way in: no
                    assert c["div"] == 0 and c["copy"] == 0, (stage, c)        # copy_, no div_, no copy-back
                    continue
                assert c["div"] == c["shard"], (stage, c)                      # Ψ/N divided, not Ψ
                # the only copies: each parameter's first gradient into the flat gradient (Ψ); no shard copy-back
                assert c["copy"] == c["psi"], (stage, c)
