"""Checkpoints of offloaded engines: the optimizer state read from its store (cpu or NVMe) is saved
like any other, a resume into the same offloaded layout or into a plain in-memory one continues the
uninterrupted curve, and a plain checkpoint resumes into an offloaded engine."""
import os
import shutil

import pytest
from engine_cases import config, layout, train
from harness import run_ranks
from reference import assert_close_curve, reference_losses

STEPS = 8


def _offload(kind, d):
    if kind == "none":
        return []
    if kind == "cpu":
        return ["zero.offload.optimizer=cpu"]
    return ["zero.offload.optimizer=nvme", "zero.offload.params=nvme", f"zero.offload.nvme_path={d}",
            "zero.offload.buffer_mb=1"]


def _run(rank, world, lay, ck, resume):
    over = lay + [f"train.checkpoint.dir={ck}", "train.checkpoint.every=4", f"train.steps={STEPS}",
                  f"train.resume={str(resume).lower()}"]
    losses, engine = train(rank, world, "gpt", over)
    return losses, engine.step_count, engine.full_state_dict()


SAVE = {"cpu": (2, "cpu"), "nvme": (3, "nvme")}
RESUME = {"cpu": [(1, "none"), (2, "cpu")], "nvme": [(3, "nvme"), (2, "cpu"), (0, "none")]}


# cpu: the slow suite (budget)
@pytest.mark.parametrize("kind", [pytest.param("cpu", marks=pytest.mark.slow), "nvme"])
def test_offloaded_checkpoint_resumes_into_any_layout(tmp_path, kind):
    ck, store = str(tmp_path / "ck"), str(tmp_path / "store")
    os.makedirs(store)
    stage, off = SAVE[kind]
    losses, step, sd = run_ranks(_run, 2, layout(2, 1, 1, stage) + _offload(off, store), ck, False)[0]
    want, model = reference_losses(config("gpt", [f"train.steps={STEPS}"]), return_model=True)
    assert_close_curve(losses, want, 1e-5, f"stage {stage} offload {off}")
    ref = model.state_dict()
    assert sorted(sd) == sorted(ref)
    for k, v in sd.items():                                   # consolidation reads the store too
        assert (v - ref[k]).abs().max() <= 1e-4 * max(1.0, ref[k].abs().max().item()), k
    shutil.rmtree(os.path.join(ck, f"step_{STEPS:08d}"))      # resume from step 4
    for st, o in RESUME[kind]:
        got, step, _ = run_ranks(_run, 2, layout(2, 1, 1, st) + _offload(o, store), ck, True)[0]
        assert step == STEPS
        assert_close_curve(got, losses[4:], 1e-5, f"resumed into stage {st}, offload {o}")
        shutil.rmtree(os.path.join(ck, f"step_{STEPS:08d}"))
