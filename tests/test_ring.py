"""The p2p ring reduce-scatter / all-gather used for gloo groups: equal to gloo's own collectives
(bit for bit at N = 2, where each sum is a + b), for fp32 and bf16, several operations in flight
at once (as ZeRO's buckets are), sizes that do not divide into sub-chunks evenly."""
import pytest
import torch
from harness import run_ranks


def _ring(rank, world):
    import torch.distributed as dist

    import parallel.comm.ring as ring
    from parallel.comm.ring import MIN_BYTES, ring_all_gather, ring_reduce_scatter, use_ring
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    out = {"use": (use_ring(g, torch.empty(MIN_BYTES // 4)), use_ring(g, torch.empty(MIN_BYTES // 4 - 1)))}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(rank)
        sizes = [world * n for n in (1, 1000, 333_331, 700_001)]
        fulls = [torch.randn(n).to(dtype) for n in sizes]
        outs = [torch.empty(n // world, dtype=dtype) for n in sizes]
        works = [ring_reduce_scatter(o, f, g, async_op=True) for o, f in zip(outs, fulls)]   # all in flight
        for w in reversed(works):
            w.wait()
        errs = []
        for f, o in zip(fulls, outs):
            want = f.float().clone()
            dist.all_reduce(want, group=g.pg)
            want = want.chunk(world)[rank]
            errs.append((o.float() - want).abs().max().item() / max(1.0, want.abs().max().item()))
        gathered = [torch.empty(n, dtype=dtype) for n in sizes]
        works = [ring_all_gather(big, o, g, async_op=True) for big, o in zip(gathered, outs)]
        assert not any(w.is_completed() for w in works)
        for w in works:
            w.wait()
        assert all(w.is_completed() for w in works)
        same = []
        for big, o in zip(gathered, outs):
            want = [torch.empty_like(o) for _ in range(world)]
            dist.all_gather(want, o, group=g.pg)
            same.append(torch.equal(big, torch.cat(want)))
        out[str(dtype)] = (errs, same)
    from parallel import comm  # the counted collectives take the ring too
    before = dict(ring.calls)
    y = torch.randn(world * 256, 300, generator=torch.Generator().manual_seed(rank))   # 2-D, ≥ MIN_BYTES
    want = y.clone()
    dist.all_reduce(want, group=g.pg)
    got = comm.reduce_scatter(y, g)
    gathered = comm.all_gather(got, g)
    out["comm"] = ((got - want.chunk(world)[rank]).abs().max().item(), (gathered - want).abs().max().item(),
                   {k: ring.calls[k] - before[k] for k in before})
    inplace = torch.full((world * 300_000,), float(rank))
    ring_all_gather(inplace, inplace.chunk(world)[rank], g)         # the shard is out's own slice
    out["inplace"] = torch.equal(inplace, torch.arange(world, dtype=torch.float32).repeat_interleave(300_000))
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_equals_gloo_collectives(world):
    for r in run_ranks(_ring, world):
        assert r["use"] == (True, False)
        assert r["inplace"]
        rs_err, ag_err, calls = r["comm"]
        assert rs_err <= 1e-5 and ag_err <= 1e-5 and calls == {"reduce_scatter": 1, "all_gather": 1}, r["comm"]
        for dtype, tol in (("torch.float32", 1e-6), ("torch.bfloat16", 2e-2)):
            errs, same = r[dtype]
            assert all(same), (dtype, same)
            if world == 2 or dtype == "torch.float32":
                # N = 2: a + b either way; N > 2: the ring sums in another order (fp32 rounding only)
                assert max(errs) <= (0.0 if world == 2 and dtype == "torch.float32" else tol), (dtype, errs)


def _zero_through_ring(rank, world, cfgs, G):
    from test_zero import _exact

    import parallel.comm.ring as ring
    old, ring.MIN_BYTES = ring.MIN_BYTES, 0                # every ZeRO collective takes the ring
    before = dict(ring.calls)
    try:
        out = _exact(rank, world, "gpt", cfgs, 20, G)
    finally:
        ring.MIN_BYTES = old
    return out, {k: ring.calls[k] - before[k] for k in before}


@pytest.mark.parametrize("world", [2, 3])
def test_zero_stages_through_the_ring_match_one_process(world):
    from test_zero import CLIP, _check_exact
    cfgs = [(1, "adamw", 2, CLIP, "leaf"), (2, "adamw", 1, None, "leaf"), (3, "adamw", 2, CLIP, "block")]
    res = run_ranks(_zero_through_ring, world, cfgs, 4 * world)
    _check_exact([r[0] for r in res], cfgs, f"gpt dp={world} (ring)")
    for _, calls in res:
        assert calls["reduce_scatter"] > 0 and calls["all_gather"] > 0, calls
