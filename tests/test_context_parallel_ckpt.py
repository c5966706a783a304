"""Checkpoints under context parallelism (issue 23): parameters are replicated over cp and ZeRO shards over
dp×cp, so a checkpoint written at cp2 (ZeRO-1: the optimizer state split over the two cp ranks) resumes
at cp1 and cp4 on exactly the uninterrupted curve; and a transformers model leaves training with its own
attention implementation (the cp one is named only during a step), so ``save_pretrained`` does not carry
our registry name.
"""
import os
import shutil

import pytest
from engine_cases import config, train
from harness import run_ranks
from reference import assert_close_curve, reference_losses

STEPS = 4


def _save(rank, world, d):
    losses, engine = train(rank, world, "gpt", ["parallel.cp=2", "zero.stage=1", f"train.checkpoint.dir={d}",
                                                "train.checkpoint.every=2", f"train.steps={STEPS}"])
    return losses


def _resume(rank, world, d, cp):
    losses, engine = train(rank, world, "gpt", [f"parallel.cp={cp}", "zero.stage=1", f"train.checkpoint.dir={d}",
                                                "train.resume=true", f"train.steps={STEPS}"])
    return losses, engine.step_count


@pytest.mark.slow                                  # ~2 min here: the suite's budget
@pytest.mark.parametrize("worlds", [(1, 4)])
def test_checkpoint_at_cp2_resumes_at_cp1_and_cp4(tmp_path, worlds):
    d = str(tmp_path / "ck")
    full = run_ranks(_save, 2, d)[0]
    assert_close_curve(full, reference_losses(config("gpt", [f"train.steps={STEPS}"])), 1e-5, "cp2 zero-1")
    assert sorted(os.listdir(d)) == ["step_00000002", "step_00000004"]
    shutil.rmtree(os.path.join(d, "step_00000004"))               # resume from step 2
    for world in worlds:
        losses, step = run_ranks(_resume, world, d, world)[0]
        assert step == STEPS
        assert_close_curve(losses, full[2:], 1e-5, f"cp2 checkpoint resumed at cp{world}")


def _hf_names(rank, world, algorithm):
    from examples.hf_causal_lm import llama_tiny
    own = llama_tiny().config._attn_implementation
    losses, engine = train(rank, world, "llama", ["parallel.cp=2", f"parallel.cp_algorithm={algorithm}",
                                                  "train.steps=1"])
    names = [engine.template.config._attn_implementation] + \
        [m.config._attn_implementation for m in engine.stages]
    model = engine.full_model()
    if model is not None:
        names.append(model.config._attn_implementation)
    return own, names


@pytest.mark.slow
def test_hf_attention_implementation_is_restored_after_training():
    for own, names in run_ranks(_hf_names, 2, "ring"):
        assert own != "parallel3d_cp" and names and set(names) == {own}, (own, names)
