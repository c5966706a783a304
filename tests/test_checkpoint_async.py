"""train.checkpoint.async (issue 25, item 4): the state snapshotted to host memory at the step boundary and
written by a background thread while training continues — the same checkpoint bytes as a synchronous save,
an exact resume, and a failed background write that leaves the previous checkpoint the newest."""
import os

import pytest
import torch
from engine_cases import config, layout, train
from harness import run_ranks
from reference import assert_close_curve, reference_losses

LAY = layout(2, 1, 1, 1)


def _run(rank, world, d, extra, fail_at=None):
    import parallel.checkpoint.async_save as A
    from parallel.checkpoint.integrity import CheckpointError
    calls = []

    def fault():
        calls.append(1)
        if rank == 1 and len(calls) == fail_at:
            raise OSError("injected: the disk went away mid-write")

    A.FAULT = fault if fail_at else None
    try:
        losses, eng = train(rank, world, "gpt", LAY + [f"train.checkpoint.dir={d}"] + extra)
        eng.close()
        return losses, None
    except CheckpointError as e:
        return None, str(e)
    finally:
        A.FAULT = None


def _tensors(path):
    from parallel.checkpoint.sharded import load_full, read_meta
    meta = read_meta(path)
    return load_full(path, sorted(meta["shapes"]), meta)


@pytest.mark.slow
def test_async_checkpoint_equals_sync_and_resumes_exactly(tmp_path):
    a, s = str(tmp_path / "async"), str(tmp_path / "sync")
    every = ["train.checkpoint.every=2", "train.steps=4"]
    full = run_ranks(_run, 2, a, every + ["train.checkpoint.async=true"])[0][0]
    run_ranks(_run, 2, s, every)
    assert sorted(os.listdir(a)) == sorted(os.listdir(s)) == ["step_00000002", "step_00000004"]
    for step in ("step_00000002", "step_00000004"):
        ta, ts = _tensors(os.path.join(a, step)), _tensors(os.path.join(s, step))
        assert sorted(ta) == sorted(ts) and all(torch.equal(ta[k], ts[k]) for k in ta), step
    assert_close_curve(full, reference_losses(config("gpt", ["train.steps=4"])), 1e-4, "async dp2")
    import shutil
    shutil.rmtree(os.path.join(a, "step_00000004"))
    resumed = run_ranks(_run, 2, a, ["train.resume=true", "train.steps=4", "train.checkpoint.async=true"])[0][0]
    assert resumed == full[2:]                                  # the same numbers, bit for bit


def test_failed_background_write_keeps_the_previous_checkpoint(tmp_path):
    """Rank 1's write of the step-4 checkpoint fails mid-save (after its shards, before the commit): every
    rank reports it (none waits forever), step_4 is absent, step_2 is the newest and resumes exactly."""
    d = str(tmp_path / "ck")
    res = run_ranks(_run, 2, d, ["train.checkpoint.every=2", "train.steps=4", "train.checkpoint.async=true"],
                    fail_at=2, timeout=120)
    for losses, err in res:
        assert losses is None and "injected: the disk went away" in err and "not committed" in err, err
    assert sorted(n for n in os.listdir(d) if n.startswith("step")) == ["step_00000002"], os.listdir(d)
    assert not any(n.startswith(".tmp-") for n in os.listdir(d))
    resumed = run_ranks(_run, 2, d, ["train.resume=true", "train.steps=4"])[0][0]
    want = reference_losses(config("gpt", ["train.steps=4"]))
    assert_close_curve(resumed, want[2:], 1e-4, "resumed from step 2")
