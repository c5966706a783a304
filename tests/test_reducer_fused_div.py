"""ZeRO-0/1/2 divide each gradient by N as they copy it into its bucket (issue 18; parallel/data_parallel/fused_div.py).

Before, a step copied every gradient into the flat bucket (``copy_``: Ψ·4 bytes written) and then divided the bucket
in place (ZeRO-0: ``div_``, another read and write of Ψ·4 bytes; ZeRO-1/2: of the reduced shard, Ψ/N); torch DDP
with ``gradient_as_bucket_view`` does both in one ``mul_out``. Now ``torch.div(grad, N, out=view)``: no ``copy_``
and no ``div_`` of gradients at one micro-batch. Parameters are bitwise equal to the unfused path
(``reducer.fuse_div = False``): ZeRO-0 at N = 2 and N = 3 (the same IEEE division per element), ZeRO-1/2 at N = 2
(division by 2 is exact); ZeRO-1/2 at N = 3 keep the division after the reduce-scatter (the counts unchanged);
m = 2 micro-batches are not fused (the sum is divided once).
"""
import pytest
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


def _run(rank, world, fuse, m, stage):
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    group = Mesh(dp=world).group("dp")
    model = make_model("gpt")
    zero = ZeroOptimizer(model, OPTS["adamw"], group, ZeroConfig(stage=stage, bucket_mb=0.02))
    zero.reducer.fuse_div = fuse
    train(zero, model, group, G, 1, m=1)                 # first step: grads are the bucket views already
    counts = _counted_step(zero, model, group)
    losses, _ = train(zero, model, group, G, 3, m=m, start=1)
    return dict(counts=counts, psi=sum(p.numel() for p in model.parameters()),
                buckets=len(zero.buckets), losses=losses, params=[p.detach().clone() for p in model.parameters()])


def _pair(rank, world, m, stage):
    return _run(rank, world, True, m, stage), _run(rank, world, False, m, stage)


def _check(world, m, stage=0):
    for fused, plain in run_ranks(_pair, world, m, stage):
        assert fused["buckets"] > 1
        copied, divs = plain["counts"]
        assert copied >= 4 * fused["psi"] and divs == plain["buckets"], plain["counts"]
        if stage and world & (world - 1):
            assert fused["counts"] == plain["counts"]               # fp32 shard divided after: unchanged
        else:
            assert copied - fused["counts"][0] == 4 * fused["psi"] and fused["counts"][1] == 0, fused["counts"]
            # (ZeRO-1 below the ring's size, here: gloo's reduce-scatter copies the flat once more itself)
        assert fused["losses"] == plain["losses"]
        assert all(torch.equal(a, b) for a, b in zip(fused["params"], plain["params"]))


def test_fused_division_cuts_the_copy_and_is_bitwise_equal_dp2():
    _check(2, 1)


def test_fused_division_bitwise_equal_dp3_and_accumulation():
    _check(3, 1)
    _check(2, 2)


@pytest.mark.parametrize("stage", [1, 2])
def test_fused_division_zero12(stage):
    _check(2, 1, stage)
    _check(3, 1, stage)
