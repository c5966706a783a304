"""Where the data-parallel mean is taken, before or after the reduce-scatter, is the same on every rank
(parallel/data_parallel/fused_div.py: ``fuses``), also for a bucket that got no gradient on one rank.

A reduce-scatter sums the ranks' buckets. When the choice followed which gradients this rank had divided on the
way in, a rank with no gradient for any parameter of a bucket divided its reduced shard after the sum, while its
peer had already divided its gradients before it: that rank's shard was (g/N + 0)/N, half the mean at N = 2.
SGD shows the factor at once (Adam almost hides it: it moved the losses of test_zero_lockstep by 2e-4 when ZeRO-3
was first fused). dp2, one micro-batch, SGD; one process is the reference:

* ZeRO-1/2, one bucket per parameter: ``side`` runs on the rows whose first token is 0 mod 4 — rank 0's at
  step 1, rank 1's at step 2. On the base its weights were off by 1.9e-3 (divided twice on the other rank).
* ZeRO-3, a region of experts (parallel/zero/regions.py, its units reduced in finish): at step 1 rank 1 routes
  no token to expert 3. Its gradients were divided twice there before (ZeRO-3 was then left out of the fused
  division); now they are divided once and the region's units divide on the way in.
* ZeRO-2, ``no_sync``: one micro-batch inside it (.side on rank 1's rows: not divided on the way in), one synced
  (.side on rank 0's: divided on the way in before). Base: .side off by 1.2e-3; now no_sync turns the fusion off.
Every weight equal to one process to 1e-6, and bitwise equal to the unfused path (``reducer.fuse_div = False``).
"""
import torch
from harness import run_ranks
from test_zero_fanout import BATCHES
from test_zero_fanout import Net as MoeNet
from test_zero_fanout import _loss as moe_loss
from test_zero_unused_params import Net, _batch, _loss

STEPS = 3


def _sgd(ps):
    return torch.optim.SGD(ps, lr=0.1)


def _reference(make, batch, loss_of):
    torch.manual_seed(0)
    model = make()
    opt = _sgd(model.parameters())
    for t in range(STEPS):
        model.step = t
        opt.zero_grad()
        loss_of(model, batch(t)).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _dense_batch(t):                  # step 2: the rows of micro-batch 1 (rank 1's take .side)
    return _batch(t, 1 if t == 2 else 0)


def _moe_batch(t):
    return torch.tensor(BATCHES[t])


def _run(rank, world, stage, fuse):
    from parallel.config import ZeroConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    torch.manual_seed(0)
    model = Net() if stage < 3 else MoeNet()
    zero = ZeroOptimizer(model, _sgd, Mesh(dp=world).group("dp"), ZeroConfig(stage=stage, bucket_mb=1e-6))
    zero.reducer.fuse_div = fuse
    rows = (4 if stage < 3 else 2) // world
    had, fused = [], 0
    for t in range(STEPS):
        model.step = t
        x = (_dense_batch(t) if stage < 3 else _moe_batch(t))[rows * rank:rows * (rank + 1)]
        zero.zero_grad()
        zero.prepare_step(1)
        (_loss if stage < 3 else moe_loss)(model, x).backward()
        zero.finish_grad_sync()
        # per bucket: did this rank get a gradient for any of its parameters (ZeRO-3 regions: b._count)
        had.append({b.names[0]: int(any(b._count)) for b in zero.reducer.buckets})
        fused += sum(any(b.divided) for b in zero.reducer.buckets)
        zero.step()
    if stage == 3:
        with zero.stage3.gathered():
            weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return weights, had, fused


def _check(stage, want, bucket, steps):
    res = {fuse: run_ranks(_run, 2, stage, fuse, timeout=120) for fuse in (True, False)}
    for t in steps:                                   # the case: the bucket had gradients on one rank only
        assert [r[1][t][bucket] for r in res[True]] in ([0, 1], [1, 0]), (t, [r[1][t] for r in res[True]])
    for r in range(2):
        got = res[True][r][0]
        for n, w in want.items():
            torch.testing.assert_close(got[n], w, rtol=0, atol=1e-6, msg=f"stage {stage} rank {r} {n}")
            assert torch.equal(got[n], res[False][r][0][n]), (stage, r, n)       # bitwise = unfused (N = 2)
        assert res[True][r][2] > 0 and res[False][r][2] == 0, (stage, r, res[True][r][2])   # fused on the way in


def test_zero12_bucket_without_gradients_on_one_rank_is_divided_once():
    want = _reference(Net, _dense_batch, _loss)
    for stage in (1, 2):
        _check(stage, want, "side.weight", (1, 2))


def test_zero3_region_expert_without_tokens_on_one_rank_is_divided_once():
    want = _reference(MoeNet, _moe_batch, moe_loss)
    _check(3, want, "blocks.0.moe.experts.3.weight", (1,))


def _no_sync(rank, world, fuse):
    """ZeRO-2, one step of two micro-batches: the first inside no_sync() (rank 1's rows take .side), the second
    synced (rank 0's rows take .side; prepare_step(1): one synced backward)."""
    from parallel.config import ZeroConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    torch.manual_seed(0)
    model = Net()
    zero = ZeroOptimizer(model, _sgd, Mesh(dp=world).group("dp"), ZeroConfig(stage=2, bucket_mb=1e-6))
    zero.reducer.fuse_div = fuse
    zero.zero_grad()
    zero.prepare_step(1)
    for k, x in enumerate(NO_SYNC_ROWS):
        with zero.no_sync() if k == 0 else torch.enable_grad():
            (_loss(model, x[2 * rank:2 * rank + 2]) / 2).backward()
    zero.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


NO_SYNC_ROWS = (_batch(2, 1), _batch(1, 0))


def test_zero2_no_sync_then_a_synced_backward_divides_once():
    torch.manual_seed(0)
    model = Net()
    opt = _sgd(model.parameters())
    for x in NO_SYNC_ROWS:
        (_loss(model, x) / 2).backward()
    opt.step()
    res = {fuse: run_ranks(_no_sync, 2, fuse, timeout=120) for fuse in (True, False)}
    for r in range(2):
        for n, w in model.named_parameters():
            torch.testing.assert_close(res[True][r][n], w.detach(), rtol=0, atol=1e-6, msg=f"rank {r} {n}")
            assert torch.equal(res[True][r][n], res[False][r][n]), (r, n)
