"""The launcher's errors end with their cause (issues 14 item 4, 17): pre-flight checks exit 2 before
any worker starts; a failed job's last line names the first failing rank, where it was and why,
or the signal that killed it."""
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT = os.path.join(ROOT, "configs", "gpt_dp2.yaml")


def build_rank1_raises(**kw):
    """examples.gpt:build on every rank but rank 1, which raises: a failure only a worker sees."""
    if os.environ.get("RANK") == "1":
        raise ValueError("rank 1 cannot build this model")
    from examples.gpt import build
    return build(**kw)


# --- pre-flight: exit 2, nothing started -----------------------------------------------------------

@pytest.fixture
def launcher(monkeypatch, capsys):
    """Run ``launch.__main__.main`` in this process with torchrun replaced by a recorder."""
    import torch.distributed.run
    started = []
    monkeypatch.setattr(torch.distributed.run, "main", lambda args: started.append(args))

    def run(*argv):
        from launch.__main__ import main
        started.clear()
        code = main(list(argv))
        err = capsys.readouterr().err.strip().splitlines()
        return code, (err[-1] if err else ""), bool(started)
    return run


def _psi():
    import torch

    from examples.gpt import build
    with torch.device("meta"):
        return sum(p.numel() for p in build(vocab_size=64, seq_len=16, n_layer=2, n_head=4, n_embd=32).parameters())


def test_preflight_refuses_before_any_worker_starts(launcher, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a directory")
    nvme = ["zero.stage=1", "zero.offload.optimizer=nvme"]
    cases = {   # overrides -> the cause the last line must state
        "nvme_missing": (nvme + [f"zero.offload.nvme_path={tmp_path}/nope"],
                         f"zero.offload.nvme_path '{tmp_path}/nope' does not exist; create it (mkdir -p "
                         f"{tmp_path}/nope)"),
        "nvme_file": (nvme + [f"zero.offload.nvme_path={tmp_path}/a_file"],
                      f"zero.offload.nvme_path '{tmp_path}/a_file' is not a directory"),
        "ckpt_unwritable": ([f"train.checkpoint.dir={tmp_path}/a_file/ck", "train.checkpoint.every=1"],
                            f"train.checkpoint.dir='{tmp_path}/a_file/ck' is not a writable directory "
                            f"(NotADirectoryError: Not a directory)"),
        "steps_0": (["train.steps=0"], "train.steps=0: there is nothing to train"),
        "model_import": (["model.factory=no_such_module_p3d:build"],
                         "model.factory='no_such_module_p3d:build': cannot import module 'no_such_module_p3d'"),
        "data_attr": (["data.factory=examples.gpt:no_such_dataset"],
                      "data.factory='examples.gpt:no_such_dataset': module 'examples.gpt' has no attribute "
                      "'no_such_dataset'"),
        "data_file": (["data.factory=examples.gpt:char_dataset", f"data.kwargs={{path: {tmp_path}/corpus.txt}}"],
                      f"data.kwargs.path='{tmp_path}/corpus.txt' does not exist (data.factory="
                      f"'examples.gpt:char_dataset' reads it)"),
    }
    for name, (over, cause) in cases.items():
        code, last, started = launcher("--config", GPT, "train.metrics_file=null", *over)
        assert (code, started) == (2, False), (name, code, last)
        assert last.startswith("config error (pre-flight check; no worker was started): ") and cause in last, \
            (name, last)
    # a bad flag is a usage error: 2, like argparse's own
    code, last, started = launcher("--config", GPT, "--no-such-flag")
    assert (code, started) == (2, False) and "unknown flag '--no-such-flag'" in last
    # nvme free space: the whole job's optimizer state, 12 bytes × Ψ × 2 copies, is the lower bound
    import shutil
    need = 24 * _psi()
    usage = shutil.disk_usage(str(tmp_path))
    for free, ok in ((need - 1, False), (need, True)):
        monkeypatch.setattr(shutil, "disk_usage", lambda p, f=free: usage._replace(free=f))
        code, last, started = launcher("--config", GPT, "train.metrics_file=null", *nvme,
                                       f"zero.offload.nvme_path={tmp_path}")
        if ok:
            assert (code, started) == (0, True), last
        else:
            assert (code, started) == (2, False)
            assert f"has {free / 2**30:.2f} GiB free but the job offloads at least {need / 2**30:.2f} GiB there" \
                   in last and f"for {_psi():,} parameters" in last, last


# --- the summary: which rank failed first -----------------------------------------------------------

def _failure(tmp, rank, exitcode, record=None):
    """torchrun's ProcessFailure for a worker that wrote ``record`` (write_record's arguments) or none."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from launch import failures
    path = os.path.join(tmp, f"error-{rank}-{exitcode}-{len(os.listdir(tmp))}.json")
    if record is not None:
        assert failures.write_record(rank, *record, environ={failures.ENV: path}) == path
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=path)


def test_summary_names_the_first_failing_rank_not_the_torn_down_one(tmp_path):
    from launch.failures import summarize
    tmp, t = str(tmp_path), time.time()
    err = ("setup (build model)", "error", "RuntimeError: model.factory 'm:f' raised ValueError: x", 1)
    peer = ("step 3 (backward)", "peer", "RuntimeError: Connection reset by peer", 1)
    # torchrun tears rank 0 down (SIGTERM, no record) after rank 1's error: rank 1 is named, exit 1
    lines, code = summarize({0: _failure(tmp, 0, -15), 1: _failure(tmp, 1, 1, err)})
    assert code == 1
    assert lines[-1] == ("launch: rank 1 failed at setup (build model) (exit 1): RuntimeError: model.factory 'm:f' "
                         "raised ValueError: x")
    assert lines[0] == "launch: job failed; other ranks: rank 0: SIGTERM (exit -15), stopped by torchrun"
    # a SIGKILLed rank left no record; the healthy one reported a peer failure afterwards
    lines, code = summarize({0: _failure(tmp, 0, 1, peer), 1: _failure(tmp, 1, -9)})
    assert code == 1 and lines[-1].startswith("launch: rank 1 was killed by SIGKILL (exit -9)")
    assert "rank 0: exit 1, stopped: peer failure" in lines[0]
    # two own errors: the earlier one (by the record's time), whatever the rank order
    a = ("step 2 (forward)", "error", "InjectedFault: late", 1, "", t)
    b = ("step 2 (optimizer)", "error", "NonFiniteError: early", 1, "", t - 0.25)
    assert summarize({0: _failure(tmp, 0, 1, a), 1: _failure(tmp, 1, 1, b)})[0][-1] == \
        "launch: rank 1 failed at step 2 (optimizer) (exit 1): NonFiniteError: early"
    # watchdogs: the rank whose phase stalled first, and the launcher exits 3 as the watchdog did
    w0 = ("step 2 (forward)", "timeout", "watchdog: no progress for 12.1 s (train.timeout_s=12)", 3, "", t - 12.0)
    w1 = ("step 2 (backward)", "timeout", "watchdog: no progress for 12.0 s (train.timeout_s=12)", 3, "", t - 11.9)
    lines, code = summarize({0: _failure(tmp, 0, 3, w0), 1: _failure(tmp, 1, 3, w1)})
    assert code == 3 and lines[-1] == ("launch: rank 0 stopped making progress at step 2 (forward) (exit 3): "
                                       "watchdog: no progress for 12.1 s (train.timeout_s=12)")
    # only peer failures on this node of a multi-node job: the cause is on another node ...
    lines, _ = summarize({2: _failure(tmp, 2, 1, peer), 3: _failure(tmp, 3, -15)})
    assert lines[-1].startswith("launch: no rank on this node failed by itself; rank 2 stopped first, at step 3 "
                                "(backward) (exit 1)")
    # ... but in a single-node job it is the rank that was stopped from outside (kill -TERM)
    lines, _ = summarize({2: _failure(tmp, 2, 1, peer), 3: _failure(tmp, 3, -15)}, single_node=True)
    assert lines[-1] == ("launch: rank 3 was stopped by SIGTERM (exit -15) from outside the job (no error of its "
                         "own); the other ranks stopped after it")
    # a rank that exited 1 before it could write a record still outranks a torn-down one
    for single in (False, True):
        lines, _ = summarize({0: _failure(tmp, 0, -15), 1: _failure(tmp, 1, 1)}, single_node=single)
        assert lines[-1].startswith("launch: rank 1 exited with status 1 before it could report where"), lines


# --- the launcher end to end: two workers, the last line ----------------------------------------------

def _launch(*args):
    env = {**os.environ, "P3D_ENABLE_FAULTS": "1",                      # train.fault: the test switch
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "launch", "--config", GPT, "train.metrics_file=null", *args], cwd=ROOT,
                       env=env, timeout=240, capture_output=True, text=True)
    return r.returncode, r.stderr.strip().splitlines()


def test_worker_setup_failure_is_named_last():
    code, err = _launch("model.factory=test_launch_errors:build_rank1_raises", "train.steps=2")
    assert code == 1, err[-20:]
    assert err[-1] == ("launch: rank 1 failed at setup (build model) (exit 1): RuntimeError: model.factory "
                       "'test_launch_errors:build_rank1_raises' raised ValueError: rank 1 cannot build this model "
                       "(check model.kwargs={'vocab_size': 64, 'seq_len': 16, 'n_layer': 2, 'n_head': 4, "
                       "'n_embd': 32})"), err[-20:]
    assert re.fullmatch(r"launch: job failed; other ranks: rank 0: (SIGTERM \(exit -15\), stopped by torchrun|"
                        r"exit 1, stopped: peer failure)", err[-2]), err[-20:]


def test_sigkilled_worker_is_named_with_its_signal():
    code, err = _launch("train.fault={rank: 1, step: 1, phase: forward, kind: kill}", "train.steps=3")
    assert code == 1, err[-20:]
    assert err[-1] == ("launch: rank 1 was killed by SIGKILL (exit -9) (the kernel's OOM killer or kill -9? see "
                       "dmesg); it left no error record; the other ranks stopped after it"), err[-20:]
