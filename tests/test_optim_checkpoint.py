"""Engine checkpoints (engine.save / engine.load) resume 1-bit Adam and 8-bit Adam bit-exactly in the
same layout: 1-bit Adam's step count travels in the pieces' ``step`` state and its error-feedback
buffers in the per-rank file (ZeRO-0 and ZeRO-1); 8-bit moments are written dequantized (fp32) and
requantized to the same codes on load; 0/1 Adam (ZeRO-0 and ZeRO-2) saved in the middle of a local
interval. Small GPT at dp=2, 3 steps, save, 3 more; a fresh engine
loads and runs the same 3."""
import os

import pytest
from harness import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 0/1 Adam: T_v = {1}, local steps from step 3 every 2nd step: the save after step 3 is mid-interval (the ranks'
# weights and momenta differ; dp rank 0 writes the pieces, each rank's m_i, u_i travel in its per-rank file)
ZERO_ONE = {"name": "zero_one_adam", "var_freeze_step": 1, "var_update_scaler": 1, "local_step_scaler": 1,
            "local_step_clipper": 2}


def _engine(world, over):
    from launch.train import build_model
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    over = ["train.metrics_file=null", "data.global_batch_size=8", "data.micro_batch_size=4", *over]
    cfg = load_config(os.path.join(ROOT, "configs", "gpt_dp2.yaml"), overrides=over).validate(world)
    return cfg, parallelize(build_model(cfg), cfg, Mesh(dp=2))


def resume(rank, world, path, before, after, probe=None):
    """configs/gpt_dp2.yaml with the overrides ``before``: 3 steps, save, 3 more (the reference); a fresh engine
    with the overrides ``after`` loads the checkpoint and runs the same 3. Returns (reference losses, resumed
    losses, ``probe`` of the saving engine, ``probe`` of the loading one)."""
    from launch.train import build_dataset, load_batch
    cfg, eng = _engine(world, before)
    ds = build_dataset(cfg)

    def steps(e, lo, hi):
        return [float(e.train_step(load_batch(ds, t, cfg, e.dp.size, e.dp.rank))) for t in range(lo, hi)]
    steps(eng, 0, 3)
    eng.save(path)
    ref = steps(eng, 3, 6)
    _, fresh = _engine(world, after)
    fresh.load(path)
    return ref, steps(fresh, 3, 6), probe and probe(eng), probe and probe(fresh)


@pytest.mark.slow
@pytest.mark.parametrize("stage,opt", [(0, {"name": "onebit_adam", "freeze_step": 2}),
                                       (1, {"name": "onebit_adam", "freeze_step": 2}),
                                       (1, {"name": "onebit_lamb", "freeze_step": 2}),
                                       (2, {"state_dtype": "int8"}),
                                       (0, ZERO_ONE), (2, ZERO_ONE)])
def test_engine_resume_is_exact(tmp_path, stage, opt):
    over = [f"zero.stage={stage}"] + [f"optimizer.{k}={v}" for k, v in opt.items()]
    for ref, got, _, _ in run_ranks(resume, 2, str(tmp_path / "ckpt"), over, over):
        assert got == ref, (got, ref)
