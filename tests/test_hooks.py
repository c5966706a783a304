"""Extension points instead of patches (issue 15), each asserted exactly on 2 ranks: the engine's
phase callbacks, the pipeline executor's action callback, the checkpoint write hook, and the
non-finite policy inside the optimizer step (train.on_nonfinite)."""
import math
import os
import re

import pytest
import torch
from harness import run_ranks

from parallel.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT = os.path.join(ROOT, "configs", "gpt_dp2.yaml")      # G = 8 samples, micro-batches of 2 per dp rank


def _engine(world, over):
    from launch.train import build_dataset, build_model, load_batch
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    cfg = load_config(GPT, ["train.metrics_file=null", *over]).validate(world)
    p = cfg.parallel
    engine = parallelize(build_model(cfg), cfg, Mesh(pp=p.pp, dp=p.dp, tp=p.tp))
    ds = build_dataset(cfg)
    return engine, lambda t: load_batch(ds, t, cfg, p.dp, engine.mesh.local_rank("dp"))


# --- phase callbacks on the engine, action callback on the executor -------------------------------

def _phases(rank, world, d, over):
    engine, batch = _engine(world, over)
    seen, actions = [], []
    remove = engine.add_callback(lambda phase, step: seen.append((phase, step)))
    stop_actions = engine.executor.add_action_callback(actions.append) if engine.executor else None
    for t in range(2):
        engine.train_step(batch(t))
    engine.save(os.path.join(d, "step_00000002"))
    remove()
    if stop_actions:
        stop_actions()
    n_seen, n_actions = len(seen), len(actions)
    engine.train_step(batch(2))                          # removed: nothing more is reported
    sched = engine.executor.schedule.actions[engine.pp.rank] if engine.executor else None
    return seen, actions, sched, (len(seen) - n_seen, len(actions) - n_actions)


def test_phase_callbacks_see_each_micro_batch_then_the_update_then_the_save(tmp_path):
    # dp = 2: m = 2 micro-batches per rank, each a forward then the gradient of its output
    for seen, actions, sched, after in run_ranks(_phases, 2, str(tmp_path), []):
        step = [("forward", 0), ("backward", 0)] * 2 + [("optimizer", 0)]
        step1 = [("forward", 1), ("backward", 1)] * 2 + [("optimizer", 1)]
        assert seen == step + step1 + [("checkpoint", 1), ("checkpoint_written", 1)]
        assert actions == [] and sched is None and after == (0, 0)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_pipeline_phases_and_actions_follow_the_schedule(tmp_path, schedule):
    # pp = 2: m = 4; the executor reports each action of this rank's list, and every F is a stage
    # forward, every B the gradient of that stage's output arriving
    over = ["parallel.dp=1", "parallel.pp=2", f"parallel.pp_schedule={schedule}"]
    for rank, (seen, actions, sched, after) in enumerate(run_ranks(_phases, 2, str(tmp_path), over)):
        assert [a.kind for a in sched].count("F") == 4 and {a.stage for a in sched} == {rank}
        assert actions == sched + sched                                  # two steps
        phase = {"F": "forward", "B": "backward"}
        want = [(phase[a.kind], 0) for a in sched] + [("optimizer", 0)] + \
            [(phase[a.kind], 1) for a in sched] + [("optimizer", 1)] + [("checkpoint", 1), ("checkpoint_written", 1)]
        assert seen == want
        assert after == (0, 0)


# --- the checkpoint write hook ----------------------------------------------------------------------

def _write_hook(rank, world, d):
    from parallel.checkpoint.sharded import Piece, load_full, save_pieces
    final, tmp = os.path.join(d, "step_00000001"), os.path.join(d, ".tmp-step_00000001")
    piece = Piece("model/w", (4,), torch.arange(4.0)[2 * rank:2 * rank + 2], torch.arange(2 * rank, 2 * rank + 2), True)
    at_hook = []
    save_pieces([piece], final, {"step": 1}, {"rank": rank},
                on_written=lambda: at_hook.append((sorted(os.listdir(tmp)), os.path.exists(final))))
    full = load_full(final, ["model/w"])["model/w"]
    return at_hook, os.path.exists(tmp), sorted(os.listdir(final)), full.tolist()


def test_checkpoint_write_hook_runs_once_after_this_ranks_shards_before_the_commit(tmp_path):
    for rank, (at_hook, tmp_left, files, full) in enumerate(run_ranks(_write_hook, 2, str(tmp_path))):
        assert len(at_hook) == 1
        present, committed = at_hook[0]
        assert not committed and "meta.json" not in present                  # nothing committed yet
        assert f"rank_{rank}.pt" in present and ".metadata" in present
        assert any(re.fullmatch(rf"__{rank}_\d+\.distcp", f) for f in present)   # this rank's shards
        assert not tmp_left and "meta.json" in files and {"rank_0.pt", "rank_1.pt"} <= set(files)
        assert full == [0.0, 1.0, 2.0, 3.0]


# --- the non-finite policy inside the step ----------------------------------------------------------

def _nonfinite(rank, world, mode):
    engine, batch = _engine(world, [f"train.on_nonfinite={mode}"])

    def nan_at_1(phase, step):                          # rank 1's outputs in step 1 become NaN
        return (lambda t: t * float("nan")) if (phase, step, rank) == ("forward", 1, 1) else None
    engine.add_callback(nan_at_1)
    losses = [engine.train_step(batch(0))]
    sd0 = {k: v.clone() for k, v in (engine.full_state_dict() or {}).items()}
    try:
        losses.append(engine.train_step(batch(1)))
        err = None
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    sd1 = engine.full_state_dict() or {}
    same = all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    r = engine.last_result
    return losses, err, same, engine.step_count, engine.scheduler.last_epoch, \
        (r.grad_norm, r.skipped, r.loss_scale, r.message, r.nonfinite_skip)


def test_nonfinite_gradient_skip_keeps_the_weights_and_counts_the_step():
    for losses, err, same, steps, epoch, res in run_ranks(_nonfinite, 2, "skip"):
        assert err is None and math.isfinite(losses[0]) and math.isnan(losses[1])
        assert same                                     # rank 0 compared the full weights before and after
        assert steps == 2 and epoch == 1                # the step counts; the schedule does not advance
        assert math.isnan(res[0]) and res[1:] == (True, 1.0, "non-finite gradient: update skipped "
                                                  "(train.on_nonfinite=skip)", True)


def test_nonfinite_gradient_stop_names_the_step_and_applies_nothing():
    for losses, err, same, steps, epoch, res in run_ranks(_nonfinite, 2, "stop"):
        assert err == ("NonFiniteError: step 1: the loss or gradient is non-finite (gradient norm² parts "
                       "[0.0, nan, 0.0]); the update was not applied. Check the data of global batch 1 (dataset "
                       "positions [8, 16)), lower optimizer.lr, or set train.on_nonfinite=skip to skip such steps")
        assert same and steps == 1 and epoch == 1 and len(losses) == 1
        assert res[1:] == (False, 1.0, None, False)     # the last result is still step 0's
