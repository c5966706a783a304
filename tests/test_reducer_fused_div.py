"""ZeRO-0 divides each gradient by N as it copies it into its bucket view (issue 18).

Before, a step copied every gradient into the flat bucket (``copy_``: Ψ·4 bytes written) and then divided the bucket
in place (``div_``: another read and write of Ψ·4 bytes); torch DDP with ``gradient_as_bucket_view`` does both in one
``mul_out``. Now ``torch.div(grad, N, out=view)``: no ``copy_`` and no ``div_`` of gradients at one micro-batch, and
the same IEEE division per element, so parameters are bitwise equal to the unfused path (``reducer.fuse_div =
False``) at N = 2 and at N = 3 (1/N inexact), also at m = 2 micro-batches (no fusion: the sum is divided once).
"""
import torch
from harness import run_ranks
from test_zero import OPTS, global_batch, loss_of, make_model, train

from parallel.config import ZeroConfig

G = 6


def _counted_step(zero, model, group):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.copy_bytes, self.div_ = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name == "copy_":
                self.copy_bytes += args[0].numel() * args[0].element_size()
            self.div_ += name == "div_"
            return func(*args, **(kwargs or {}))
    N, r = group.size, group.rank
    x, y = global_batch(0, G)
    per = G // N
    zero.zero_grad()
    zero.prepare_step(1)
    loss = loss_of(model, x[r * per:(r + 1) * per], y[r * per:(r + 1) * per])
    with Count() as c:
        loss.backward()
        zero.reducer.finish()
    zero.step()
    return c.copy_bytes, c.div_


def _run(rank, world, fuse, m):
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    group = Mesh(dp=world).group("dp")
    model = make_model("gpt")
    zero = ZeroOptimizer(model, OPTS["adamw"], group, ZeroConfig(stage=0, bucket_mb=0.02))
    zero.reducer.fuse_div = fuse
    train(zero, model, group, G, 1, m=1)                 # first step: grads are the bucket views already
    counts = _counted_step(zero, model, group)
    losses, _ = train(zero, model, group, G, 3, m=m, start=1)
    return dict(counts=counts, psi=sum(p.numel() for p in model.parameters()),
                buckets=len(zero.buckets), losses=losses, params=[p.detach().clone() for p in model.parameters()])


def _pair(rank, world, m):
    return _run(rank, world, True, m), _run(rank, world, False, m)


def _check(world, m):
    for fused, plain in run_ranks(_pair, world, m):
        assert fused["buckets"] > 1
        assert fused["counts"][0] < 64 and fused["counts"][1] == 0, fused["counts"]   # no gradient copy_, div_
        copied, divs = plain["counts"]
        assert copied >= 4 * fused["psi"] and divs == plain["buckets"], plain["counts"]
        assert fused["losses"] == plain["losses"]
        assert all(torch.equal(a, b) for a, b in zip(fused["params"], plain["params"]))


def test_fused_division_cuts_the_copy_and_is_bitwise_equal_dp2():
    _check(2, 1)


def test_fused_division_bitwise_equal_dp3_and_accumulation():
    _check(3, 1)
    _check(2, 2)
