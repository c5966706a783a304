"""What a new user runs into first: configs and inputs that must fail once, before any worker starts,
naming the key and the fix (found by trying the README's commands from a fresh install)."""
import pytest

from parallel.config import ConfigError, load_config

BASE = {
    "model": {"factory": "examples.gpt:build"},
    "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": 8, "micro_batch_size": 2},
    "parallel": {"dp": 2},
}


def cfg(*overrides, world=2):
    return load_config(data=BASE, overrides=list(overrides)).validate(world)


@pytest.mark.parametrize("overrides,needle", [
    # configs/hf_causal_lm.yaml has warmup_steps 10: `train.steps=3` for a quick try failed inside the workers
    (["scheduler.name=warmup_cosine", "scheduler.warmup_steps=10", "train.steps=3"],
     "train.steps=3 (the decay horizon while scheduler.total_steps is unset) is before the end of the warm-up "
     "(scheduler.warmup_steps=10): raise train.steps to at least 10 or lower scheduler.warmup_steps"),
    (["scheduler.name=warmup_linear", "scheduler.warmup_steps=10", "scheduler.total_steps=4"],
     "scheduler.total_steps=4 is before the end of the warm-up (scheduler.warmup_steps=10): raise "
     "scheduler.total_steps to at least 10 or lower scheduler.warmup_steps"),
    (["scheduler.name=constant", "scheduler.warmup_steps=2"], "scheduler.name=constant has no warm-up"),
    # torch's optimizers refused these on every rank at setup, without naming the key
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1 must not be negative"),
    (["optimizer.eps=-1"], "optimizer.eps=-1.0 must not be negative"),
    (["optimizer.name=sgd", "optimizer.momentum=-1"], "optimizer.momentum=-1.0 must not be negative"),
    (["optimizer.betas=[0.9, 1.5]"], "optimizer.betas=[0.9, 1.5] must each be in [0, 1)"),
])
def test_checked_by_validate(overrides, needle):
    with pytest.raises(ConfigError) as e:
        cfg(*overrides)
    assert needle in str(e.value), str(e.value)


def test_launcher_reason_keeps_the_first_listed_problem():
    """A message that lists its problems below a line ending in ':' (the tp plan's refusal) ended the launcher's
    last line at that ':' — the cause itself was cut off."""
    from launch.failures import reason_of
    exc = ValueError("tensor-parallel plan cannot be applied to GPT with tp = 2:\n"
                     "  - blocks.0.attn.qkv: 3 heads, not divisible by tp = 2; use a tp that divides the head count\n"
                     "  - blocks.1.attn.qkv: 3 heads, not divisible by tp = 2\n  - blocks.0.attn.n_head = 3\n")
    assert reason_of(exc) == ("ValueError: tensor-parallel plan cannot be applied to GPT with tp = 2: "
                              "blocks.0.attn.qkv:"
                              " 3 heads, not divisible by tp = 2; use a tp that divides the head count (and 2 more)")
    assert reason_of(RuntimeError("one line\nsecond line")) == "RuntimeError: one line"
    assert reason_of(KeyError()) == "KeyError"


def test_a_model_without_a_tp_plan_is_shown_one():
    """A plain MLP under parallel.tp=2 was told 'set parallel.tp_plan' with no hint of its form."""
    from torch import nn

    from parallel.tensor_parallel.auto_plan import derive_plan
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    with pytest.raises(ValueError) as e:
        derive_plan(mlp, 2, None)
    assert "e.g. parallel.tp_plan='{0: colwise, 2: rowwise}' (0 split by output columns" in str(e.value)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 10))
    with pytest.raises(ValueError, match="Sequential has 1 Linear layer.s. and no pair to split"):
        derive_plan(cnn, 2, None)


def test_hf_example_builds_architectures_without_sdpa():
    """`python examples/hf_causal_lm.py --model-type bloom` (or gemma2) failed on every rank: the example forced
    attn_implementation='sdpa', which these architectures lack."""
    from examples.hf_causal_lm import build
    kw = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    assert build("bloom", **kw).config._attn_implementation == "eager"
    assert build("llama", intermediate_size=64, **kw).config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="does not support"):
        build("bloom", attn_implementation="sdpa", **kw)               # an explicit choice is kept


@pytest.mark.parametrize("args,needle", [
    (["--config", "configs/nope.yaml", "--world", "2"], "config file 'configs/nope.yaml' does not exist"),
    (["--config", "configs/gpt_dp2.yaml", "--world", "3"], "but the job has 3 processes"),
    (["--config", "configs/gpt_dp2.yaml", "--world", "2", "--rank", "0,5"], "--rank 5 is outside the world [0, 2)"),
    (["--config", "configs/gpt_dp2.yaml", "--world", "2", "--rank", "x"], "--rank 'x': give a rank or a list"),
    (["--config", "configs/gpt_dp2.yaml", "--world", "2", "data.micro_batch_size=3"],
     "data.micro_batch_size=3 does not divide"),
])
def test_simulate_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    """launch.simulate printed tracebacks with exit 1 for bad input — the status that means 'engine and planner
    disagree' — and did not validate the config against --world at all."""
    from launch.simulate import main
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m launch.simulate: config error: ") and needle in err, err
    assert err.count("\n") == 1


def test_metrics_file_that_is_a_directory_is_refused_before_any_worker(tmp_path):
    """train.metrics_file=<a directory> passed the pre-flight check and failed on rank 0 with a bare
    IsADirectoryError at setup."""
    from launch.preflight import PreflightError, check_paths
    c = cfg(f"train.metrics_file={tmp_path}")
    with pytest.raises(PreflightError, match=r"train.metrics_file=.* is a directory: give a file path, e.g. "
                                             r"train.metrics_file=.*metrics.jsonl"):
        check_paths(c)
    check_paths(cfg(f"train.metrics_file={tmp_path}/m.jsonl"))


def test_hf_example_script_runs_from_another_directory(tmp_path, monkeypatch):
    """`cd /tmp && python /path/to/repo/examples/hf_causal_lm.py ...` passed the launcher's pre-flight import (the
    script had put the repo on its own sys.path) and then failed on every worker: No module named 'examples'."""
    import os
    import subprocess
    import sys

    import launch.__main__ as launcher
    from examples.hf_causal_lm import main
    seen = {}
    monkeypatch.setattr(launcher, "main", lambda argv: seen.update(env=os.environ["PYTHONPATH"]) or 0)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["--tp", "2"]) == 0
    r = subprocess.run([sys.executable, "-c", "import examples.hf_causal_lm"], cwd=tmp_path, capture_output=True,
                       env={**os.environ, "PYTHONPATH": seen["env"]})
    assert r.returncode == 0, r.stderr


def test_consolidate_bad_input_is_one_line(tmp_path, capsys):
    """launch.consolidate printed tracebacks for a damaged checkpoint and for a model.factory it cannot import
    (the workers' PYTHONPATH is not the consolidating shell's)."""
    import json

    from launch.consolidate import main
    ck = tmp_path / "ck" / "step_00000002"
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text('{"bad json')
    assert main([str(tmp_path / "ck"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m launch.consolidate: CheckpointError: checkpoint ") and "is damaged" in err, err
    assert err.count("\n") == 1
    (ck / "meta.json").write_text(json.dumps({"model": {"factory": "no_such_pkg.models:build", "kwargs": {}}}))
    assert main([str(ck), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot import module 'no_such_pkg.models'" in err and "put that directory on PYTHONPATH" in err, err


def test_cross_entropy_refuses_soft_labels_and_float_ids_naming_the_fix():
    """Soft labels (B, S, V) gave torch's "Expected input batch_size (32) to match target batch_size (2048)";
    float ids "expected target dtype to be Long". Integer ids of either shape still train."""
    import torch

    from parallel.loss import cross_entropy
    logits = torch.randn(2, 16, 64)
    ids = torch.randint(0, 64, (2, 16))
    with pytest.raises(ValueError, match=r"logits \(2, 16, 64\) need targets of shape \(2, 16\) \(int64; -100 = not "
                                         r"scored\), got torch.float32 \(2, 16, 64\).*Soft labels"):
        cross_entropy(logits, torch.softmax(torch.randn(2, 16, 64), -1))
    with pytest.raises(ValueError, match=r"got torch.float32 \(2, 16\)\. Class ids stored as floats: return them as "
                                         r"torch.long"):
        cross_entropy(logits, ids.float())
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids.reshape(-1))
    torch.testing.assert_close(cross_entropy(logits, ids), want)
    torch.testing.assert_close(cross_entropy(logits, ids.reshape(-1)), want)


@pytest.mark.parametrize("flag", [["--nproc-per-node", "3"], ["--nproc_per_node=3"], ["--nproc", "3"]])
def test_torchruns_nproc_flag_is_checked_before_any_worker(flag, capsys):
    """`--nproc-per-node 3` with dp = 2 went through to torchrun: three workers started and each failed with
    exit 2; it is the launcher's --nproc, so the config check refuses it before any worker starts."""
    from launch.__main__ import main, split_argv
    known, torchrun, _ = split_argv(["--config", "configs/gpt_dp2.yaml"] + flag)
    assert known.nproc == 3 and not torchrun
    assert main(["--config", "configs/gpt_dp2.yaml"] + flag) == 2
    assert "parallel.dp*tp*pp = 2*1*1 = 2 but the job has 3 processes" in capsys.readouterr().err
