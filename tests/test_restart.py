"""Restarts lose nothing: torchrun --max-restarts resumes from the newest complete checkpoint and
the loss curve continues as if uninterrupted (issue 9)."""
import json
import os
import subprocess
import sys

import pytest
from reference import assert_close_curve, reference_losses

from parallel.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow     # two launches with a restart, ~35 s idle
def test_rank_killed_at_step_7_restarts_and_matches_an_uninterrupted_run(tmp_path):
    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    over = ["train.steps=20", "data.shuffle=true", f"train.metrics_file={metrics}", "train.checkpoint.every=5",
            f"train.checkpoint.dir={ck}", "train.timeout_s=300",
            "train.fault={rank: 1, step: 7, phase: forward, kind: kill}"]
    env = {**os.environ, "PYTHONPATH": ROOT, "P3D_PEAK_FLOPS": "1e12", "P3D_ENABLE_FAULTS": "1"}
    r = subprocess.run([sys.executable, "-m", "launch", "--config", "configs/gpt_dp2.yaml", "--max-restarts", "1",
                        "--monitor-interval", "0.1", *over], cwd=ROOT, env=env, timeout=400, capture_output=True,
                       text=True)
    out = r.stdout + r.stderr
    (tmp_path / "launch.log").write_text(out)
    assert r.returncode == 0, out[-4000:]
    assert "rank 1: injected fault: kill on rank 1 at step 7 (forward)" in out, out[-6000:]
    assert f"restart 1 (TORCHELASTIC_RESTART_COUNT): resumed from {ck}/step_00000005 (step 5," in out
    assert out.count("injected fault") == 1                  # attempt 0 only: the restarted job runs through
    recs = [json.loads(line) for line in open(metrics)]
    assert [rec["step"] for rec in recs] == list(range(20))  # steps 5 and 6 were redone and logged once
    assert [json.loads(line)["step"] for line in open(tmp_path / "ranks.jsonl")] == list(range(20))
    want = reference_losses(load_config(os.path.join(ROOT, "configs/gpt_dp2.yaml"),
                                        ["train.steps=20", "data.shuffle=true"]))
    assert_close_curve([rec["loss"] for rec in recs], want, 1e-5, "killed at step 7, restarted")
    assert sorted(os.listdir(ck)) == [f"step_{s:08d}" for s in (5, 10, 15, 20)]


def test_truncate_metrics_keeps_steps_before_the_resumed_one(tmp_path):
    from launch.train import truncate_metrics
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n" for s in range(8)) + '{"step": 8, "lo')
    truncate_metrics(str(p), 5)
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == [0, 1, 2, 3, 4]
    truncate_metrics(str(tmp_path / "absent.jsonl"), 3)      # nothing to do
