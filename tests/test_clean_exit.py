"""Clean exits (launch.lifecycle, "Clean exit"): a job that trained every step exits 0, every time.

The cause of the rare ``terminate called without an active exception`` at exit: the engine's parameter
gradient hooks kept the engine — and through it every process group — alive in a cycle the garbage
collector cannot follow, so gloo's threads ran on into interpreter finalization. The fast test shows that
a dropped engine is now collected (its hooks hold the reducer weakly) and that groups do not pile up;
the slow one launches many short transformers jobs on 2 ranks and requires exit status 0 from each.
"""
import gc
import os
import subprocess
import sys
import weakref

import pytest
import zoo
from harness import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _engine_alive_after_del(rank, world, close):
    from launch.lifecycle import gloo_threads
    from launch.train import run
    from parallel.mesh import Mesh
    before = gloo_threads()                                   # the pool's world group (earlier tasks' are gone)
    result = run(zoo.config("llama", world, dp=2, zero=2), Mesh(dp=2), print_fn=lambda *a, **k: None)
    ref = weakref.ref(result["engine"].zero.reducer)        # it holds the dp group
    if close:
        result["engine"].close()
    del result
    gc.collect()
    return ref() is not None, before


def test_dropped_engines_release_their_groups():
    """The reducer's parameter hooks hold it weakly, so a dropped engine is collected with or without
    Engine.close (before: the hooks' cycle through C++ autograd metadata kept it, its groups and their
    gloo threads alive); and a long-lived rank does not accumulate groups across tasks (the harness
    destroys the mesh groups after each task: parallel/mesh.release_meshes)."""
    runs = [run_ranks(_engine_alive_after_del, 2, close) for close in (False, True, False, False)]
    assert all(alive is False for res in runs for alive, _ in res)
    before = [[n for _, n in res] for res in runs]
    assert before[1:] == [before[1]] * 3 and before[1][0] >= 2, before        # constant: no groups pile up


def _launch(i, out):
    layout = [["parallel.dp=2"], ["parallel.tp=2"], ["parallel.pp=2"]][i % 3]
    args = ["--config", "configs/hf_causal_lm.yaml", *layout, "model.kwargs.hidden_size=32",
            "model.kwargs.intermediate_size=64", "model.kwargs.num_hidden_layers=2", "data.kwargs.seq_len=16",
            "data.global_batch_size=8", "data.micro_batch_size=2", "train.steps=3", "train.log_every=1",
            "scheduler.name=constant", "scheduler.warmup_steps=0", f"train.metrics_file={out}/m{i}.jsonl",
            f"train.checkpoint.dir={out}/ck{i}", "train.checkpoint.every=3"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, env=env, timeout=300,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_fifty_short_transformers_jobs_exit_zero(tmp_path):
    runs = int(os.environ.get("P3D_CLEAN_EXIT_RUNS", 50))
    bad = []
    for i in range(runs):
        r = _launch(i, tmp_path)
        text = r.stdout + r.stderr
        if r.returncode != 0 or "terminate called" in text or "gloo threads still alive" in text:
            bad.append((i, r.returncode, text[-600:]))
        with open(tmp_path / f"m{i}.jsonl") as f:
            assert len(f.readlines()) == 3, f"run {i}: not every step was logged"
    assert not bad, f"{len(bad)} of {runs} jobs did not exit cleanly: {bad[:3]}"



@pytest.mark.slow
def test_ring_collectives_do_not_keep_groups_alive(tmp_path):
    """The quickstart (2×2×2, buckets large enough for the gloo ring, comm/ring.py) ends with no gloo
    thread alive on any rank: the ring's per-group tag counters and backend lookups once lived in module
    dicts keyed by the process group, which kept those groups (and their threads) alive past
    destroy_process_group (seen by hand on the old code: 3 gloo threads left on every rank)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "P3D_DEBUG_EXIT": "1"}
    r = subprocess.run([sys.executable, "-m", "launch", "--config", "configs/quickstart.yaml", "train.steps=1",
                        "train.finish=null", f"train.metrics_file={tmp_path}/m.jsonl"], cwd=ROOT, env=env, timeout=300,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "still alive" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
