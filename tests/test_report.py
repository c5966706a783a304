"""python -m launch.report: the pictures of a run and the numbers they are drawn from.

Two short runs on 2 gloo ranks (pp=2 under ZB-H1, so F, I and W boxes; dp=2 with ZeRO-1, no
pipeline). Checked: the three PNGs exist, decode, are of a sane size and carry colour (not a blank
canvas; the timeline shows the F/I/W colours); the timeline rows are each rank's executed actions
in schedule order, non-overlapping, with the recorded compute durations; the memory rows are the
model-state bytes the ranks' engines report; CLI errors name the fix.
"""
import os

import pytest
from harness import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runs(rank, world, base):
    from launch.train import run
    from parallel.config import load_config
    from parallel.mesh import Mesh
    out = {}
    for name, o, mesh in (("pp2", ["parallel.dp=1", "parallel.pp=2", "parallel.pp_schedule=zero_bubble"], dict(pp=2)),
                          ("dp2", ["zero.stage=1"], dict(dp=2))):
        cfg = load_config(os.path.join(ROOT, "configs/gpt_dp2.yaml"), o + [
            "train.steps=3", "train.log_every=2", f"train.metrics_file={base}/{name}/metrics.jsonl"]).validate(world)
        eng = run(cfg, Mesh(**mesh), print_fn=lambda *a, **k: None)["engine"]
        ex = eng.executor
        out[name] = {"state": eng.zero.model_state_bytes(),
                     "actions": [(a.kind, a.microbatch) for a in ex.schedule.actions[rank]] if ex else None}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    return str(base), run_ranks(_runs, 2, str(base))


def _colours(path):
    import matplotlib.image as mpimg
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 800, img.shape
    return {tuple((px[:3] * 255).round().astype(int)) for px in img.reshape(-1, img.shape[2])[::7]}


def test_pictures_and_their_inputs(runs):
    from launch.report import COLOURS, load_run, memory_rows, pick_step, timeline, write_report
    base, res = runs
    run_dir = os.path.join(base, "pp2")
    paths = write_report(run_dir)
    assert [os.path.basename(p) for p in paths] == ["loss.png", "timeline.png", "memory.png"]
    for p in paths:
        assert os.path.getsize(p) > 15_000, p
        assert len(_colours(p)) > 20, p                      # drawn, not blank
    rgb = {k: tuple(int(COLOURS[k][i:i + 2], 16) for i in (1, 3, 5)) for k in "FIW"}
    seen = _colours(paths[1])
    assert all(rgb[k] in seen for k in "FIW"), "timeline lacks the F/I/W colours"
    run = load_run(run_dir)
    entry = pick_step(run)
    assert entry["step"] == 2 and [s["step"] for s in run["ranks"]] == [0, 2]
    for rk in entry["ranks"]:
        rows = timeline(rk)
        assert [(label[0], int(label[1:])) for label, *_ in rows] == res[rk["rank"]]["pp2"]["actions"]
        assert [d for *_, d in rows] == [x[4] for x in rk["records"]]
        assert all(s1 >= s0 + d0 for (_, _, s0, d0), (_, _, s1, _) in zip(rows, rows[1:]))
    for rank, cats, peak in memory_rows(entry):
        want = res[rank]["pp2"]["state"]
        assert cats == {k: want[k] for k in ("params", "grads", "master", "optimizer")} and peak > 0
    assert [r["loss"] for r in run["metrics"]] == [r["loss"] for r in load_run(run_dir)["metrics"]]


def test_no_pipeline_one_box_per_rank(runs):
    from launch.report import load_run, pick_step, timeline, write_report
    base, res = runs
    run_dir = os.path.join(base, "dp2")
    out = os.path.join(base, "dp2_pictures")
    assert len(write_report(run_dir, out)) == 3 and os.path.isfile(os.path.join(out, "timeline.png"))
    entry = pick_step(load_run(run_dir), 0)
    for rk in entry["ranks"]:
        assert timeline(rk) == [("step", "step", 0.0, rk["step_s"])]
        assert rk["model_state_bytes"]["optimizer"] > 0


def test_cli_errors(runs, tmp_path, capsys, monkeypatch):
    from launch.report import main
    base, _ = runs
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "is not a directory: give the directory of train.metrics_file" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert f"train.metrics_file={tmp_path}/metrics.jsonl" in capsys.readouterr().err
    assert main([os.path.join(base, "pp2"), "--step", "1"]) == 2
    assert "step 1 was not gathered; gathered steps: [0, 2]" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert main([os.path.join(base, "pp2")]) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and 'pip install -e ".[report]"' in err
