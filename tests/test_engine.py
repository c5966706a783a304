"""3D composition: layouts reproduce the single-process loss curve; checkpoints reshard.

The issue's full matrix (three 8-rank layouts × two models × 20 steps) is marked slow: on this
2-core machine 8 ranks oversubscribe the cores. The default suite runs 2 × 2 × 2 / ZeRO-1 on both
models for 8 steps, and the checkpoint checks.
"""
import os
import shutil

import pytest
import torch

from engine_cases import config, layout, train
from harness import run_ranks
from reference import assert_close_curve, reference_losses


def _losses(rank, world, model, overrides):
    losses, engine = train(rank, world, model, overrides)
    return losses, {a: engine.mesh.stats.total(a) for a in ("dp", "tp", "pp")}


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_2x2x2_zero1_matches_single_process(model):
    steps = ["train.steps=8"]
    res = run_ranks(_losses, 8, model, layout(2, 2, 2, 1) + steps)
    want = reference_losses(config(model, steps))
    for losses, traffic in res:
        assert_close_curve(losses, want, 1e-4, f"{model} 2x2x2 zero-1")
    # every axis really carried traffic (the layout is not silently 1x1x1)
    assert all(res[0][1][a] > 0 for a in ("dp", "tp", "pp"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "llama"])
@pytest.mark.parametrize("lay", [layout(2, 2, 2, 1), layout(1, 2, 4, 2), layout(4, 2, 1, 2)],
                         ids=["2x2x2-z1", "1x2x4-z2", "4x2x1-z2"])
def test_issue_layouts_20_steps(model, lay):
    res = run_ranks(_losses, 8, model, lay, timeout=900)
    assert_close_curve(res[0][0], reference_losses(config(model)), 1e-4, f"{model} {lay}")


def _save(rank, world, d, steps):
    losses, engine = train(rank, world, "gpt", layout(2, 2, 2, 1) + [f"train.checkpoint.dir={d}",
                                                                   "train.checkpoint.every=4", f"train.steps={steps}"])
    sd = engine.full_state_dict()
    return losses, sd


def _resume(rank, world, d, lay, steps):
    losses, engine = train(rank, world, "gpt", lay + [f"train.checkpoint.dir={d}", "train.resume=true",
                                                       f"train.steps={steps}"])
    return losses, engine.step_count


def _consolidated_outputs(sd):
    from examples.gpt import build
    from engine_cases import GPT
    model = build(**GPT["kwargs"])
    model.load_state_dict(sd, strict=True)
    x = torch.arange(32).reshape(2, 16) % 64
    return model(x)


def test_checkpoint_reshards_into_other_layouts(tmp_path):
    d = str(tmp_path / "ck")
    steps = 8
    full = run_ranks(_save, 8, d, steps)
    uninterrupted, sd = full[0]
    want = reference_losses(config("gpt", [f"train.steps={steps}"]), return_model=True)
    assert_close_curve(uninterrupted, want[0], 1e-4, "2x2x2 zero-1")
    # the consolidated state_dict loads strictly into the unmodified model and gives its outputs
    ref_model = want[1]
    assert torch.allclose(_consolidated_outputs(sd), ref_model(torch.arange(32).reshape(2, 16) % 64),
                          rtol=1e-4, atol=1e-5)
    assert sorted(os.listdir(d)) == ["step_00000004", "step_00000008"]
    shutil.rmtree(os.path.join(d, "step_00000008"))             # resume from step 4
    for world, lay in [(8, layout(1, 4, 2, 3)), (1, layout(1, 1, 1, 0)), (4, layout(4, 1, 1, 2))]:
        losses, step0 = run_ranks(_resume, world, d, lay, steps)[0]
        assert step0 == steps
        assert_close_curve(losses, uninterrupted[4:], 1e-5, f"resumed into {lay}")
