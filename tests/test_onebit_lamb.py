"""1-bit LAMB (arXiv 2104.06069; parallel/optim/onebit_lamb.py): its warm-up is LAMB exactly and averages the
trust ratios; after the freeze its dp wire bytes are 1-bit Adam's (≤ 1/16 of LAMB's), ZeRO-1/2 compute what ZeRO-0
computes, and on the char LM (dp2, seed 0) it learns to within a stated margin of LAMB's loss. Resume and
full-state-dict exactness at stages 0 and 2: tests/test_onebit_zero.py."""
import math
import os

import pytest
import torch
from harness import run_ranks
from test_onebit_adam import _lm_run

from parallel.optim.lamb import Lamb
from parallel.optim.onebit_lamb import OneBitLamb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LR, FREEZE = 3e-2, 30


def test_warmup_is_lamb_and_the_trust_ratio_average_is_bias_corrected():
    torch.manual_seed(0)
    ref = torch.nn.Linear(6, 5)
    mine = torch.nn.Linear(6, 5)
    mine.load_state_dict(ref.state_dict())
    a = Lamb(ref.parameters(), lr=0.05, weight_decay=0.01)
    b = OneBitLamb(mine.parameters(), lr=0.05, weight_decay=0.01, freeze_step=3, coeff_beta=0.5)
    ratios = []
    for t in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(t))
        w_before = [p.detach().clone() for p in ref.parameters()]
        for m, opt in ((ref, a), (mine, b)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        # r_t = ‖Δw‖ / (η‖u‖) recovered from Lamb's own step: ‖Δw‖ = η·r·‖u‖ and ‖u‖ from its state
        ratios.append([])
        for p, w0 in zip(ref.parameters(), w_before):
            st = a.state[p]
            u = (st["exp_avg"] / (1 - 0.9 ** (t + 1))) / ((st["exp_avg_sq"] / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)
            u = u + 0.01 * w0
            ratios[-1].append(float((p.detach() - w0).norm() / (0.05 * u.norm())))
    for p, q in zip(ref.parameters(), mine.parameters()):
        assert torch.equal(p, q)                                   # the warm-up is LAMB, bit for bit
    for j, p in enumerate(mine.parameters()):                      # r̄ = Σ_t (1−β3)β3^(T−t) r_t, ÷ (1 − β3^T)
        avg = sum(0.5 * 0.5 ** (2 - t) * ratios[t][j] for t in range(3)) / (1 - 0.5 ** 3)
        assert b.frozen_coeff(b.state[p]) == pytest.approx(avg, rel=1e-4)
    with pytest.raises(ValueError, match="factor_min"):
        OneBitLamb(mine.parameters(), factor_min=2.0)


@pytest.mark.slow
def test_dp2_char_lm_bytes_zero_stages_and_convergence_against_lamb():
    """seed 0, 60 steps, freeze 30, lr 3e-2 (both), dp2. ZeRO-1/2: one bucket, shards a multiple of 8, so the
    chunks are ZeRO-0's, but LAMB's ‖w‖, ‖u‖ sum the pieces' squares in another order (as Lamb under ZeRO: equal
    to ~1e-7, not bitwise), and sign compression amplifies that after the freeze: warm-up losses to 1e-5, the
    final losses to 1 %."""
    lamb = run_ranks(_lm_run, 2, "lamb", 0, LR)[0]
    runs = {s: run_ranks(_lm_run, 2, "onebit_lamb", s, LR, freeze_step=FREEZE)[0] for s in (0, 1, 2)}
    one = runs[0]
    final = {s: sum(r[0][-5:]) / 5 for s, r in runs.items()}
    print(f"\nfinal loss by ZeRO stage {final}")
    for s in (1, 2):
        assert runs[s][0][:FREEZE] == pytest.approx(one[0][:FREEZE], rel=1e-5)
        assert final[s] == pytest.approx(final[0], rel=0.01)
    assert all(r[3] for r in runs.values())                         # replicas identical
    after = one[1][FREEZE + 1:]
    assert max(after) <= lamb[1][-1] / 16, (max(after), lamb[1][-1])
    a, o = sum(lamb[0][-5:]) / 5, sum(one[0][-5:]) / 5
    print(f"\n1-bit LAMB dp=2: wire bytes/step LAMB {lamb[1][-1]:.0f}, 1-bit {max(after):.0f} (1/"
          f"{lamb[1][-1] / max(after):.1f}); loss (mean of steps 56-60) LAMB {a:.4f}, 1-bit {o:.4f} "
          f"({(o - a) / a:+.2%}); first {lamb[0][0]:.4f}; max |w| LAMB {lamb[4]:.3f}, 1-bit {one[4]:.3f}")
    assert math.isfinite(o) and abs(o - a) <= 0.06 * a, (o, a)     # stated margin: 6 % (measured +4.7 %)
    assert o < 0.8 * one[0][0]


def _engine_losses(rank, world, stage):
    from launch.train import build_dataset, build_model, load_batch
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    over = ["train.metrics_file=null", f"zero.stage={stage}", "data.global_batch_size=8", "data.micro_batch_size=4",
            "optimizer.name=onebit_lamb", "optimizer.freeze_step=2", "optimizer.lr=0.01"]
    cfg = load_config(os.path.join(ROOT, "configs", "gpt_dp2.yaml"), overrides=over).validate(world)
    eng = parallelize(build_model(cfg), cfg, Mesh(dp=2))
    ds = build_dataset(cfg)
    losses = [float(eng.train_step(load_batch(ds, t, cfg, eng.dp.size, eng.dp.rank))) for t in range(5)]
    return losses, type(eng.zero.optimizer).__name__, eng.zero.optimizer.local_gradients


def test_config_key_trains_through_the_engine_and_refuses_what_it_cannot_do():
    """``optimizer.name: onebit_lamb`` (optimizer.freeze_step as for onebit_adam) builds OneBitLamb through the
    engine: 2 LAMB warm-up steps, then 3 compressed ones; ZeRO-1 follows ZeRO-0 (the same updates; LAMB's norms are
    summed over pieces, so to rounding); tp, ZeRO-3 and clipping are refused by validation with the reason."""
    from parallel.config import ConfigError, load_config
    from parallel.optim.factory import optimizer_factory
    cfg = load_config(os.path.join(ROOT, "configs", "gpt_dp2.yaml"),
                      overrides=["optimizer.name=onebit_lamb", "optimizer.freeze_step=3"]).validate(2)
    opt = optimizer_factory(cfg.optimizer)([torch.nn.Parameter(torch.ones(4))])
    assert isinstance(opt, OneBitLamb) and opt.param_groups[0]["freeze_step"] == 3
    (z0, k0, c0), (z1, k1, c1) = (run_ranks(_engine_losses, 2, s)[0] for s in (0, 1))
    assert k0 == k1 == "OneBitLamb" and c0 and c1, (k0, k1, c0, c1)      # past freeze_step: compressed phase
    assert all(math.isfinite(x) for x in z0) and z0 == pytest.approx(z1, rel=1e-4), (z0, z1)
    for bad, needle in ((["parallel.tp=2", "parallel.dp=1"], "parallel.tp=2"), (["zero.stage=3"], "zero.stage=3"),
                        (["train.grad_clip=1.0"], "grad_clip")):
        with pytest.raises(ConfigError, match=needle):
            load_config(os.path.join(ROOT, "configs", "gpt_dp2.yaml"),
                        overrides=["optimizer.name=onebit_lamb", *bad]).validate(2)
