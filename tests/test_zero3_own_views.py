"""ZeRO-3's gathered parameters inside the own shard are views of it (parallel/zero/own_views.py): the all-gather
copies only the straddling parameters' own pieces, not the whole own shard (issue 18: 2Ψ/N·b bytes a step and rank).

* the plan of a unit: the parameters wholly inside [lo, hi) and the pieces of those that straddle its edges;
* the ring all-gather with ``fill_own=False`` sends from the shard and leaves the own chunk unwritten;
* a GPT trained with ZeRO-3 at dp = 2 (every collective on the ring; fp32 and bf16; block units and per-module
  units): the bytes ``copy_`` writes into the gathered flat buffers drop from the whole own shard per gather to the
  straddlers' pieces — exactly Σ_units gathers_u · straddle_u — and losses, parameters and masters are bitwise the
  plain gather's.
"""
import pytest
import torch
from harness import run_ranks
from test_zero import OPTS
from test_zero import train as zero_train
from test_zero3_grad_parts import KW

from parallel.config import ZeroConfig

G, STEPS = 8, 3


def test_plan_inside_and_straddling_pieces():
    from parallel.data_parallel.bucket import FlatBucket
    from parallel.zero.own_views import plan
    ps = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 4, 6, 2)]          # 15 elements, padded 16, S = 8
    named = [(f"p{i}", p) for i, p in enumerate(ps)]
    r0, r1 = FlatBucket(0, named, 2, 0), FlatBucket(0, named, 2, 1)
    assert plan(r0) == (frozenset({0, 1}), [(2, 7, 8)])                    # p2 = [7, 13) straddles 8
    assert plan(r1) == (frozenset({3}), [(2, 8, 13)])                       # p3 = [13, 15), padding after


def _gather(rank, world, fill_own):
    from parallel.comm import all_gather_into, ring
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    old, ring.MIN_BYTES = ring.MIN_BYTES, 0
    try:
        shard = torch.arange(1000, dtype=torch.float32) + 1000 * rank
        out = torch.full((2000,), -1.0)
        all_gather_into(out, shard, g, fill_own=fill_own)
    finally:
        ring.MIN_BYTES = old
    return out


def test_ring_gather_skips_own_chunk():
    full = torch.arange(2000, dtype=torch.float32)
    for out in run_ranks(_gather, 2, True):
        assert torch.equal(out, full)
    for r, out in enumerate(run_ranks(_gather, 2, False)):
        other = 1 - r
        assert torch.equal(out[other * 1000:(other + 1) * 1000], full[other * 1000:(other + 1) * 1000])
        assert (out[r * 1000:(r + 1) * 1000] == -1).all()                 # the own chunk: not written


class _Into(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes ``copy_`` writes into each unit's gathered flat buffer."""

    def __init__(self, units):
        super().__init__()
        self.units = units
        self.bytes = [0] * len(units)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "copy_":
            ptr = {u.flat_param.untyped_storage().data_ptr(): i for i, u in enumerate(self.units)}   # (regathered:
            i = ptr.get(args[0].untyped_storage().data_ptr() or -1)                                 # new storage)
            if i is not None:
                self.bytes[i] += args[0].numel() * args[0].element_size()
        return func(*args, **(kwargs or {}))


def _train(rank, world, views, precision, blocks):
    from examples.gpt import GPT
    from parallel.comm import ring
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    from parallel.zero.own_views import plan
    from parallel.zero.stage3 import Stage3Params
    old, ring.MIN_BYTES = ring.MIN_BYTES, 0
    Stage3Params.own_views = views
    try:
        g = Mesh(dp=world).group("dp")
        torch.manual_seed(0)
        model = GPT(**KW)
        zero = ZeroOptimizer(model, OPTS["adamw"], g, ZeroConfig(stage=3), precision=precision,
                             unit_types=(type(model.blocks[0]),) if blocks else None)
        units = zero.stage3.units
        losses, into = [], []
        for t in range(STEPS):
            with _Into(units) as c:
                losses += zero_train(zero, model, g, G, 1, start=t)[0]
            into.append(c.bytes)
        with zero.gathered():
            params = [p.detach().clone() for p in model.parameters()]
        es = units[0].flat_param.element_size()
        return dict(losses=losses, into=into, params=params, masters=[b.master.clone() for b in zero._all],
                    gathers=zero.stage3.gathers,
                    shard=[u.shard * es for u in units], straddle=[sum(e - a for _, a, e in plan(u)[1]) * es
                                                                   for u in units])
    finally:
        ring.MIN_BYTES = old
        Stage3Params.own_views = True


@pytest.mark.parametrize("precision,blocks", [("fp32", True), ("bf16", False)])
def test_gather_copies_only_straddlers_bitwise(precision, blocks):
    new = run_ranks(_train, 2, True, precision, blocks)
    base = run_ranks(_train, 2, False, precision, blocks)
    for n, b in zip(new, base):
        assert n["losses"] == b["losses"]                                  # bitwise
        assert all(torch.equal(x, y) for x, y in zip(n["params"], b["params"]))
        assert all(torch.equal(x, y) for x, y in zip(n["masters"], b["masters"]))
        assert n["gathers"] == b["gathers"]
        # per unit and step: the plain gather copies the whole own shard each time, the views the straddlers' pieces
        for nu, bu in zip(n["into"], b["into"]):
            assert all(x % h == 0 and x // h * s == y for x, y, h, s in zip(bu, nu, b["shard"], b["straddle"])), \
                (bu, nu, b["shard"], b["straddle"])
        if blocks:                                                          # per module: a Linear's weight straddles
            assert sum(map(sum, n["into"])) * 2 < sum(map(sum, b["into"])), (n["into"], b["into"])
