"""Plain data parallelism: bucketed gradient all-reduce launched from gradient hooks during backward,
accumulation with no_sync() or prepare_step(m), exact against the single-process loop."""
import pytest
import torch
from harness import run_ranks
from test_zero import OPTS, assert_curve, global_batch, loss_of, make_model, mean_over_ranks, reference_losses

from parallel.parameters import param_info


def _dp_train(rank, world, mode, steps, G):
    from parallel.data_parallel.module import DataParallel
    from parallel.mesh import Mesh
    mesh = Mesh(dp=world)
    g = mesh.group("dp")
    ref = reference_losses("gpt", "adamw", steps, G) if rank == 0 else None
    model = make_model("gpt")
    dp = DataParallel(model, g, bucket_mb=0.02)
    opt = OPTS["adamw"](list(model.parameters()))
    per, m = G // world, 2
    mb = per // m
    losses, seen, wire, sums = [], [], [], []
    psi = sum(p.numel() for p in model.parameters())
    for t in range(steps):
        x, y = global_batch(t, G)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()                                # torch's: sets p.grad = None
        s0 = mesh.stats.snapshot()
        tot = 0.0
        for j in range(m):
            xm, ym = x[j * mb:(j + 1) * mb], y[j * mb:(j + 1) * mb]
            if mode == "no_sync" and j < m - 1:
                with dp.no_sync():
                    loss = loss_of(dp, xm, ym) / m
                    loss.backward()
                assert mesh.stats.diff(mesh.stats.snapshot(), s0) == {}     # nothing sent inside no_sync
            else:
                if mode == "prepare" and j == 0:
                    dp.prepare_step(m)
                emb_out = []                           # the embedding's gradient comes last in backward
                hk = model.wte.register_forward_hook(lambda mod, a, out, emb_out=emb_out: emb_out.append(out))
                loss = loss_of(dp, xm, ym) / m
                hk.remove()
                if j == m - 1:                         # the micro-batch whose backward reduces
                    emb_out[0].register_hook(lambda g_: seen.append(dp.reducer.launches["hooks"]))
                loss.backward()
            tot += loss.item()
        d = mesh.stats.diff(mesh.stats.snapshot(), s0)["dp"]
        wire.append(d["all_reduce"]["wire_bytes"])
        sums.append(float(sum(p.grad.double().sum() for p in model.parameters())))
        opt.step()
        losses.append(tot)
    return ref, losses, seen, wire, sums, psi, len(dp.reducer.buckets), dict(dp.reducer.launches)


@pytest.mark.parametrize("world,mode", [(2, "no_sync"), (2, "prepare"), (4, "no_sync")])
def test_data_parallel_exact_overlapped_and_counted(world, mode):
    G = 4 * world
    res = run_ranks(_dp_train, world, mode, 10, G)
    assert_curve(mean_over_ranks(res, key=1), res[0][0], 1e-4, f"DataParallel dp={world} {mode}")
    N = world
    for r in res:
        _, _, seen, wire, sums, psi, nb, launches = r
        assert nb >= 3 and launches == {"hooks": nb, "finish": 0}
        # When backward reaches the embedding every other bucket is already on the wire: overlap.
        assert seen == [nb - 1] * 10
        for w in wire[1:]:                               # 2(N-1)/N·Ψ·4 bytes per step, accumulation included
            # (step 1 also agrees on the bucket launch order: a broadcast and an 8-byte all-reduce)
            assert w == pytest.approx(2 * (N - 1) / N * psi * 4, rel=1e-9)
        assert sums == res[0][4]                         # every rank holds the same averaged gradient


def _deferred_dp(rank, world):
    from parallel.data_parallel.module import DataParallel
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    model = make_model("gpt")
    param_info(model.wte.weight).defer_reduce = True
    dp = DataParallel(model, g, bucket_mb=0.02)
    x, y = global_batch(0, 8)
    loss_of(dp, x[rank * 4:rank * 4 + 4], y[rank * 4:rank * 4 + 4]).backward()
    local = model.wte.weight.grad.clone()
    dp.finish_grad_sync()
    return local, model.wte.weight.grad.clone(), model.lm_head.weight.grad is model.wte.weight.grad


def test_deferred_param_waits_for_finish():
    (l0, r0, tied0), (l1, r1, _) = run_ranks(_deferred_dp, 2)
    assert not torch.equal(l0, l1) and tied0
    assert torch.allclose(r0, (l0 + l1) / 2, rtol=1e-6, atol=1e-9) and torch.equal(r0, r1)


def test_bad_inputs():
    from parallel.comm import Group
    from parallel.data_parallel.module import DataParallel
    with pytest.raises(TypeError, match="mesh.group"):
        DataParallel(make_model("gpt"), "dp")
    g = Group(None, "dp", (0,), 0)
    with pytest.raises(ValueError, match="bucket_mb"):
        DataParallel(make_model("gpt"), g, bucket_mb=-1)
    m = make_model("gpt")
    m.wpe.half()
    with pytest.raises(ValueError, match="mixed dtypes"):
        DataParallel(m, g)
