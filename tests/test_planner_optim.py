"""The planner's optimizer accounting (parallel/planning/optim_states.py) against measured runs: LAMB, Muon
(LAMB's sum_sq all-reduces over dp and tp; Muon's gathers over dp), 8-bit Adam moments and 1-bit Adam after warm-up (its
error-feedback buffers; compressed all-to-all and all-gather in place of ZeRO's reduction), 1-bit LAMB and 0/1 Adam
(a sync step after var_freeze_step; slow). Per layout
3 training steps of the small GPT (as tests/test_planner.py; 1-bit with freeze_step=1, so step 3 is a
steady compressed step); the last step's model-state bytes and CommStats per rank must equal the
prediction exactly (bytes and calls)."""
import json
import os

import pytest
from harness import run_ranks
from planner_match import assert_comm_equal, assert_states_equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = {"vocab_size": 64, "seq_len": 16, "n_layer": 4, "n_head": 4, "n_embd": 32}
G, MB = 8, 2
ONEBIT = {"name": "onebit_adam", "freeze_step": 1}
ONEBIT_LAMB = {"name": "onebit_lamb", "freeze_step": 1}
ZERO_ONE = {"name": "zero_one_adam", "var_freeze_step": 1}     # step 3: after V, a sync step (H = 1)
FAST = [("dp2 zero1 lamb", dict(dp=2, zero=1), {"name": "lamb"}),
        ("dp2 zero2 int8", dict(dp=2, zero=2), {"state_dtype": "int8"}),
        ("dp2 zero2 onebit", dict(dp=2, zero=2), ONEBIT)]
SLOW = [("tp2 lamb", dict(tp=2), {"name": "lamb"}), ("dp2 zero3 lamb", dict(dp=2, zero=3), {"name": "lamb"}),
        ("dp2 zero0 int8", dict(dp=2), {"state_dtype": "int8"}),
        ("dp2 zero3 int8", dict(dp=2, zero=3), {"state_dtype": "int8"}),
        ("dp2 zero0 onebit", dict(dp=2), ONEBIT), ("dp2 zero1 onebit", dict(dp=2, zero=1), ONEBIT),
        ("dp2 zero0 muon", dict(dp=2), {"name": "muon"}), ("dp2 zero1 muon", dict(dp=2, zero=1), {"name": "muon"}),
        ("dp2 zero3 muon", dict(dp=2, zero=3), {"name": "muon"}),
        ("dp2 zero0 onebit_lamb", dict(dp=2), ONEBIT_LAMB), ("dp2 zero2 onebit_lamb", dict(dp=2, zero=2), ONEBIT_LAMB),
        ("dp2 zero0 zero_one", dict(dp=2), ZERO_ONE), ("dp2 zero1 zero_one", dict(dp=2, zero=1), ZERO_ONE),
        ("dp2 zero2 zero_one", dict(dp=2, zero=2), ZERO_ONE)]


def _overrides(lay: dict, opt: dict, run_dir: str) -> list:
    o = [f"parallel.{k}={lay.get(k, 1)}" for k in ("dp", "tp")] + [f"zero.stage={lay.get('zero', 0)}"]
    o += [f"optimizer.{k}={v}" for k, v in opt.items()]
    o += [f"model.kwargs={json.dumps(MODEL)}", f"data.global_batch_size={G}", f"data.micro_batch_size={MB}",
          "train.steps=3", "train.log_every=1", f"train.metrics_file={run_dir}/metrics.jsonl"]
    return o


def _run(rank, world, base_dir, layouts):
    from launch.train import run
    from parallel.config import load_config
    from parallel.mesh import Mesh
    for name, lay, opt in layouts:
        run_dir = os.path.join(base_dir, name.replace(" ", "_"))
        cfg = load_config(os.path.join(ROOT, "configs/gpt_dp2.yaml"), _overrides(lay, opt, run_dir)).validate(world)
        run(cfg, Mesh(dp=cfg.parallel.dp, tp=cfg.parallel.tp), print_fn=lambda *a, **k: None)
    return True


def _check(run_dir, name, lay, opt):
    from parallel.planning.planner import Layout, ModelSpec, TrainSpec, predict
    m = G // (lay.get("dp", 1) * MB)
    tr = TrainSpec(G, optimizer=opt.get("name", "adamw"), state_dtype=opt.get("state_dtype", "fp32"))
    pred = predict(ModelSpec(n_layer=4, hidden=32, heads=4, vocab=64, seq=16),
                   Layout(lay.get("dp", 1), lay.get("tp", 1), 1, lay.get("zero", 0), m), tr)
    with open(os.path.join(run_dir, "ranks.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]["ranks"]
    for r in last:
        rank = r["rank"]
        assert_states_equal(f"{name} rank {rank}", r["model_state_bytes"], pred.memory[rank])
        assert_comm_equal(f"{name} rank {rank}", r["comm"], pred.comm[rank])


def _measure_and_check(layouts, tmp_path):
    run_ranks(_run, 2, str(tmp_path), layouts, timeout=300)
    for name, lay, opt in layouts:
        _check(os.path.join(str(tmp_path), name.replace(" ", "_")), name, lay, opt)


def test_planner_accounts_for_lamb_8bit_and_1bit(tmp_path):
    _measure_and_check(FAST, tmp_path)


@pytest.mark.slow
def test_planner_accounts_for_more_optimizer_layouts(tmp_path):
    _measure_and_check(SLOW, tmp_path)
