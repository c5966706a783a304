"""Persistent buffers (BatchNorm's running statistics and batch count) go through checkpoints and
consolidation: after training, the consolidated state_dict holds the trained buffers (not the
template's initial ones) and a resume — into the same or another layout — restores them exactly."""
import os

import torch
from harness import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNN_YAML = os.path.join(ROOT, "configs", "cnn_dp2.yaml")


def _engine(layout, world):
    from launch.train import build_model
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    dp, pp = layout
    over = ["train.metrics_file=null", f"parallel.dp={dp}", f"parallel.pp={pp}", "data.global_batch_size=16",
            f"data.micro_batch_size={16 // dp}"]
    cfg = load_config(CNN_YAML, overrides=over).validate(world)
    return cfg, parallelize(build_model(cfg), cfg, Mesh(pp=pp, dp=dp))


def _buffers(engine) -> dict:
    return {n: b.detach().clone() for st in engine.stages for n, b in st.named_buffers()}


def _save_and_resume(rank, world, path, save_layout, load_layout):
    from launch.train import build_dataset, load_batch
    cfg, engine = _engine(save_layout, world)
    ds = build_dataset(cfg)
    initial = {n: b.clone() for n, b in engine.template.named_buffers()}
    for t in range(3):
        engine.train_step(load_batch(ds, t, cfg, engine.dp.size, engine.dp.rank))
    trained = _buffers(engine)
    sd = engine.full_state_dict()
    engine.save(path)
    _, fresh = _engine(load_layout, world)
    before = _buffers(fresh)
    fresh.load(path)
    after = _buffers(fresh)
    sd2 = fresh.full_state_dict()
    return {"initial": initial, "trained": trained, "sd": sd, "before": before, "after": after, "sd2": sd2}


def _check(results):
    full = {}
    for r in results:
        full.update(r["trained"])
    assert any(k.endswith("running_mean") for k in full) and any(k.endswith("num_batches_tracked") for k in full)
    initial = results[0]["initial"]
    for k, v in full.items():
        if k.endswith("running_mean"):
            assert (v - initial[k]).abs().max() > 1e-3, f"{k}: training did not move it, the test could not fail"
        assert torch.equal(results[0]["sd"][k], v), f"consolidated {k} is not the trained value"
        assert torch.equal(results[0]["sd2"][k], v), f"consolidated {k} after the resume is not the trained value"
    assert int(full["1.bn.num_batches_tracked"]) == 3
    for r in results:
        for k, v in r["after"].items():
            assert torch.equal(v, full[k]), f"resumed {k} differs from the saved one"
            if k.endswith("running_mean"):
                assert not torch.equal(r["before"][k], v)


def test_buffers_survive_checkpoint_and_consolidation_dp2(tmp_path):
    _check(run_ranks(_save_and_resume, 2, str(tmp_path / "step_3"), (2, 1), (2, 1)))


def test_buffers_reshard_from_pp2_to_dp2(tmp_path):
    _check(run_ranks(_save_and_resume, 2, str(tmp_path / "step_3"), (1, 2), (2, 1)))
