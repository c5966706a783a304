"""Progressive layer dropping (arXiv 2010.13369): the schedule, and the same blocks dropped in every
layout — dp2, tp2, pp2 with PLD on equal one process with PLD on (fp32 losses, 1e-5)."""
import math

import pytest
import torch
from engine_cases import config, layout, train
from harness import run_ranks
from reference import assert_close_curve
from torch.utils.data import default_collate

from parallel.layer_drop import LayerDrop, apply_layer_drop

PLD = ["pld.enabled=true", "pld.theta=0.5", "pld.gamma=0.5", "train.steps=6"]


def test_schedule_is_the_papers_and_deterministic():
    d = LayerDrop(theta=0.5, gamma=0.1, seed=3, n_blocks=4)
    assert d.theta_t(0) == 1.0 and d.keep_prob(0, 3) == 1.0 and d.dropped(0) == []
    t = 7
    th = 0.5 * math.exp(-0.7) + 0.5
    assert d.keep_prob(t, 1) == pytest.approx(1 - 2 / 4 * (1 - th))
    assert d.keep_prob(10 ** 6, 3) == pytest.approx(0.5)                  # the top block tends to θ̄
    # the same seed draws the same blocks; the frequency follows p_l (4000 draws of each block)
    assert [LayerDrop(0.5, 0.1, 3, 4).dropped(s) for s in range(50)] == [d.dropped(s) for s in range(50)]
    far = [d.dropped(10 ** 6 + s) for s in range(4000)]
    for layer in range(4):
        rate = sum(layer in x for x in far) / len(far)
        assert rate == pytest.approx((layer + 1) / 4 * 0.5, abs=0.03), layer


def reference_with_pld(cfg):
    """tests/reference.py's plain loop, with the blocks made droppable and the step set each step."""
    from parallel.config import import_object
    from parallel.data import global_indices
    from parallel.loss import resolve_loss
    from parallel.optim.factory import optimizer_factory
    torch.manual_seed(cfg.train.seed)
    model = import_object(cfg.model.factory, "model.factory")(**cfg.model.kwargs)
    pld = apply_layer_drop(model, cfg.pld.theta, cfg.pld.gamma, cfg.train.seed)
    data = import_object(cfg.data.factory, "data.factory")(**cfg.data.kwargs)
    opt = optimizer_factory(cfg.optimizer)(list(model.parameters()))
    losses = []
    for t in range(cfg.train.steps):
        pld.step = t
        x, y = default_collate([data[i] for i in global_indices(t, cfg.data.global_batch_size, len(data),
                                                                 cfg.train.seed, cfg.data.shuffle)])
        opt.zero_grad()
        loss = resolve_loss(cfg.loss)(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [pld.dropped(t) for t in range(cfg.train.steps)]


def _run(rank, world, overrides):
    losses, engine = train(rank, world, "gpt", overrides)
    return losses, engine.layer_drop.dropped_count


@pytest.mark.parametrize("lay", [pytest.param(layout(2, 1, 1, 1), marks=pytest.mark.slow),
                                 pytest.param(layout(1, 2, 1, 0), marks=pytest.mark.slow), layout(1, 1, 2, 0)],
                         ids=["dp2", "tp2", "pp2"])
def test_layouts_drop_the_same_blocks_as_one_process(lay):
    want, dropped = reference_with_pld(config("gpt", PLD))
    assert sum(map(len, dropped)) >= 3, dropped                  # the runs really drop blocks
    res = run_ranks(_run, 2, lay + PLD)
    for losses, _ in res:
        assert_close_curve(losses, want, 1e-5, f"pld {lay}")
    assert sum(c for _, c in res) > 0


def test_without_pld_nothing_changes_and_bad_values_are_refused():
    from parallel.config import ConfigError
    with pytest.raises(ConfigError, match="pld.theta"):
        config("gpt", ["pld.enabled=true", "pld.theta=0"], world=1)
    from parallel.config.deepspeed import map_deepspeed
    ov, report = map_deepspeed({"progressive_layer_drop": {"enabled": True, "theta": 0.6, "gamma": 0.01}}, {}, 1)
    assert ov["pld"] == {"enabled": True, "theta": 0.6, "gamma": 0.01}
    assert any("pld.gamma" in line for line in report)
