"""Checkpoints that would resume wrongly are refused, damaged ones are named, disk use is bounded
(issue 17): the structure, data contract and per-file checksums recorded in meta.json are checked
before anything loads; a damaged newest checkpoint stops the resume unless
train.checkpoint.fallback; keep_last removes only this job's older checkpoints; a failed save
removes its own .tmp; an out-of-vocabulary token is a DataError. One process, a 2-layer GPT."""
import errno
import json
import os
import re

import pytest
import torch
from harness import run_ranks

from parallel.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT = os.path.join(ROOT, "configs", "gpt_dp2.yaml")      # G = 8, vocab 64, 2 layers, 64 samples


def _run(rank, world, over):
    """launch.train.run on one rank: (losses or 'Type: message', the log lines)."""
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = load_config(GPT, ["train.metrics_file=null", "parallel.dp=1", *over]).validate(world)
    log = []
    try:
        out = run(cfg, Mesh(dp=1), print_fn=lambda *a, **k: log.append(" ".join(map(str, a))))["losses"]
    except Exception as e:
        out = f"{type(e).__name__}: {e}"
    return out, log


def run1(*over):
    return run_ranks(_run, 1, list(over))[0]


def ck(d, every=2):
    return [f"train.checkpoint.dir={d}", f"train.checkpoint.every={every}"]


def test_other_structure_is_refused(tmp_path):
    d = tmp_path / "ck"
    assert isinstance(run1("train.steps=2", "model.kwargs.n_layer=4", *ck(d))[0], list)
    err, _ = run1("train.steps=4", "train.resume=true", *ck(d))               # 4-layer checkpoint, 2-layer model
    assert err.startswith(f"CheckpointError: cannot resume from {d}/step_00000002: the checkpoint's model has other "
                          f"tensors: 24 this model lacks ['blocks.2.attn.proj.bias'") and "..." in err, err
    assert "Point train.checkpoint.dir at a checkpoint of this model" in err
    d2 = tmp_path / "ck2"                                                     # heads 4 -> 2: every shape equal
    assert isinstance(run1("train.steps=2", *ck(d2))[0], list)
    err, _ = run1("train.steps=4", "train.resume=true", "model.kwargs.n_head=2", *ck(d2))
    assert "model.kwargs n_head: 4 saved vs 2 now); its tensors have the same shapes" in err, err


def test_other_data_contract_is_refused(tmp_path):
    d = tmp_path / "ck"
    assert isinstance(run1("train.steps=2", *ck(d))[0], list)
    err, _ = run1("train.steps=4", "train.resume=true", "data.global_batch_size=16", *ck(d))
    assert err == (f"CheckpointError: cannot resume from {d}/step_00000002: it was trained with "
                   f"data.global_batch_size=8, this job has 16. The data position is step × global batch (2 × 8 = 16 "
                   f"samples), so resuming would skip or repeat samples: resume with data.global_batch_size=8, or "
                   f"point train.checkpoint.dir at an empty directory to start afresh"), err
    err, _ = run1("train.steps=4", "train.resume=true", "data.kwargs.seed=1", *ck(d))
    assert "it was trained with data.kwargs={'n': 64, 'seq_len': 16, 'vocab_size': 64, 'seed': 0}, this job has" in err


def _damage(path, how):
    if how == "flip":                                          # one byte of the first shard file
        f = os.path.join(path, "__0_0.distcp")
        b = bytearray(open(f, "rb").read())
        b[len(b) // 2] ^= 0x01
        open(f, "wb").write(bytes(b))
    elif how in ("truncate", "truncate_metadata"):
        f = os.path.join(path, "__0_0.distcp" if how == "truncate" else ".metadata")
        os.truncate(f, os.path.getsize(f) // 2)
    elif how == "no_meta":
        os.remove(os.path.join(path, "meta.json"))


@pytest.mark.parametrize("how,digests,message", [
    ("flip", True, "file __0_0.distcp does not match its checksum in meta.json"),
    ("truncate", True, "file __0_0.distcp has {half} bytes but meta.json records {full} (truncated)"),
    ("truncate_metadata", True, "file .metadata has {half} bytes but meta.json records {full} (truncated)"),
    ("truncate", False, "file __0_0.distcp has {half} bytes but its shards end at byte"),
    ("truncate_metadata", False, "file .metadata (DCP's index of the shards) cannot be read (UnpicklingError"),
    ("no_meta", True, "file meta.json is missing"),
])
def test_damaged_newest_checkpoint_stops_the_resume(tmp_path, how, digests, message):
    d = tmp_path / "ck"
    full, _ = run1("train.steps=4", *ck(d))
    newest = str(d / "step_00000004")
    meta = json.load(open(os.path.join(newest, "meta.json")))
    name = "__0_0.distcp" if how in ("flip", "truncate") else ".metadata"
    size = os.path.getsize(os.path.join(newest, name))
    assert meta["files"][name]["bytes"] == size and len(meta["files"]) == 3          # shard, .metadata, rank_0.pt
    if not digests:                                            # a checkpoint of the format before checksums
        del meta["files"]
        json.dump(meta, open(os.path.join(newest, "meta.json"), "w"))
    _damage(newest, how)
    err, _ = run1("train.steps=4", "train.resume=true", *ck(d))
    want = message.format(half=size // 2, full=size)
    assert err.startswith(f"CheckpointError: checkpoint {newest} is damaged: {want}"), err
    assert err.endswith("train.resume does not skip a damaged checkpoint: repair it or move it out of "
                        "train.checkpoint.dir, or set train.checkpoint.fallback=true to resume from the previous "
                        "one (step_00000002)"), err
    # with the fallback: the previous intact one, logged; the same losses as the uninterrupted run
    losses, log = run1("train.steps=4", "train.resume=true", "train.checkpoint.fallback=true", *ck(d))
    assert isinstance(losses, list) and len(losses) == 2, losses
    assert torch.allclose(torch.tensor(losses), torch.tensor(full[2:]), rtol=0, atol=1e-6), (losses, full)
    assert any(f"{newest} is damaged: {want}" in m and "trying the previous checkpoint" in m for m in log), log
    assert any(m.startswith(f"resumed from {d}/step_00000002 (step 2") and "skipping the damaged "
               "['step_00000004']" in m for m in log), log
    # the damaged step_4 was not this job's: saving step 4 again kept it, renamed
    kept = [n for n in os.listdir(d) if n.startswith("step_00000004.replaced-")]
    assert len(kept) == 1 and "__0_0.distcp" in os.listdir(d / kept[0]), os.listdir(d)
    assert json.load(open(d / "step_00000004" / "meta.json"))["step"] == 4


def test_only_checkpoint_damaged_is_not_a_fresh_start(tmp_path):
    d = tmp_path / "ck"
    assert isinstance(run1("train.steps=2", *ck(d))[0], list)
    _damage(str(d / "step_00000002"), "flip")
    for extra in ([], ["train.checkpoint.fallback=true"]):
        err, _ = run1("train.steps=4", "train.resume=true", *extra, *ck(d))
        assert isinstance(err, str) and "step_00000002 is damaged: file __0_0.distcp does not match" in err, err
        assert ("there is no earlier checkpoint" in err) if not extra else \
            (f"no intact checkpoint in {d}: all of ['step_00000002'] are damaged (" in err), err
    assert sorted(os.listdir(d)) == ["step_00000002"]          # nothing written, nothing deleted


def test_keep_last_removes_only_this_jobs_older_checkpoints(tmp_path):
    d = tmp_path / "ck"
    assert isinstance(run1("train.steps=2", *ck(d, every=1))[0], list)         # an earlier job: step_1, step_2
    _, log = run1("train.steps=6", "train.resume=true", "train.checkpoint.keep_last=2", *ck(d, every=1))
    assert sorted(os.listdir(d)) == ["step_00000001", "step_00000002", "step_00000005", "step_00000006"]
    assert [m for m in log if m.startswith("removed")] == [
        f"removed {d}/step_0000000{s} (train.checkpoint.keep_last=2)" for s in (3, 4)]
    from parallel.config import ConfigError
    with pytest.raises(ConfigError, match=r"train.checkpoint.keep_last=0 must be a positive number"):
        load_config(GPT, ["train.checkpoint.keep_last=0"]).validate(2)


def _failed_save(rank, world, d):
    from launch.train import build_model, save_checkpoint
    from parallel.checkpoint import step_dir
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    cfg = load_config(GPT, ["train.metrics_file=null", "parallel.dp=1"]).validate(world)
    engine = parallelize(build_model(cfg), cfg, Mesh(dp=1))

    def full(phase, step):
        if phase == "checkpoint_written":
            raise OSError(errno.ENOSPC, "No space left on device")
    engine.add_callback(full)
    try:
        save_checkpoint(engine, step_dir(d, 2), d)
    except Exception as e:
        return f"{type(e).__name__}: {e}", sorted(os.listdir(d))


def test_failed_save_removes_its_tmp_and_says_disk_full(tmp_path, monkeypatch):
    d = str(tmp_path / "ck")
    err, listing = run_ranks(_failed_save, 1, d)[0]
    assert err.startswith(f"CheckpointError: writing checkpoint {d}/step_00000002 failed: no space left on device. "
                          f"The partial save .tmp-step_00000002 was removed; there is no earlier checkpoint."), err
    assert listing == []
    # a disk that a failed job's partial save filled: the check says so (not "permissions")
    import launch.resume as r
    os.makedirs(os.path.join(d, ".tmp-step_00000004"))

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(r, "open", no_space, raising=False)
    with pytest.raises(r.CheckpointError) as e:
        r.check_writable(d)
    assert re.fullmatch(rf"train.checkpoint.dir='{d}': no space left on device \([\d.]+ MiB free\); it holds partial "
                        r"saves of failed jobs, never checkpoints: \['.tmp-step_00000004'\] \(remove them\): free "
                        r"space on that disk or point train.checkpoint.dir elsewhere", str(e.value)), str(e.value)


def test_token_id_outside_the_vocabulary_is_a_data_error():
    err, _ = run1("train.steps=1", "data.kwargs.vocab_size=80")
    from examples.gpt import random_tokens
    from parallel.data import global_indices
    ds = random_tokens(n=64, seq_len=16, vocab_size=80, seed=0)
    idx = global_indices(0, 8, 64)
    first = next(i for i in idx if int(ds[i][0].max()) >= 64)
    assert err.startswith(f"DataError: step 0: dataset index {first} holds token id {int(ds[first][0].max())}, "
                          f"outside the model's vocabulary of 64 (ids 0..63;"), err
