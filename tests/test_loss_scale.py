"""fp16 loss scaling follows DeepSpeed's DynamicLossScaler, key by key, through the DeepSpeed config path.

The reference below restates DeepSpeed's rules (deepspeed/runtime/fp16/loss_scaler.py,
``DynamicLossScaler.update_scale``; the ``fp16`` block of https://www.deepspeed.ai/docs/config-json/):
S starts at 2**initial_scale_power with h = hysteresis; an overflow at update t sets t_last = t and
either uses up one unit of hysteresis (h > 1) or halves S down to min_loss_scale (DeepSpeed raises
when S is already there); a clean update with n = t - t_last - 1 > 0 and n % loss_scale_window == 0
doubles S and refills h (consecutive_hysteresis: every clean update refills h); t_last starts at -1.
Hand-computed sequences check the reference itself; the engine's sequences must equal it step by step.
"""
import json
import math
import random

import pytest
from harness import run_ranks

STOP = "stop"                       # DeepSpeed raises: the scale is at its minimum and hysteresis is used up
XOR = {"model": {"factory": "examples.xor:build"}, "loss": "mse", "parallel": {"dp": 2},
       "data": {"factory": "examples.xor:dataset", "global_batch_size": 8, "micro_batch_size": 2},
       "optimizer": {"name": "sgd", "lr": 0.1}, "train": {"seed": 38}}


def deepspeed_scales(overflows, steps, power, window, hysteresis, min_scale, consecutive=False, static=0):
    """The loss scale after each of ``steps`` updates under DeepSpeed's rules (STOP where it raises)."""
    if static:
        return [float(static)] * steps
    scale, left, last, out = 2.0 ** power, hysteresis, -1, []
    for t in range(steps):
        if t in overflows:
            if left > 1:
                left -= 1
            elif scale == min_scale:
                return out + [STOP]
            else:
                scale = max(scale / 2, min_scale)
            last = t
        else:
            if consecutive:
                left = hysteresis
            if t - last - 1 > 0 and (t - last - 1) % window == 0:
                left, scale = hysteresis, scale * 2
        out.append(scale)
    return out


def test_the_reference_against_hand_computed_sequences():
    # window 3, hysteresis 2: growth at the 4th clean update; 1st overflow absorbed, 2nd halves
    assert deepspeed_scales({4, 5}, 10, 4, 3, 2, 1) == [16, 16, 16, 32, 32, 16, 16, 16, 16, 32]
    # without consecutive_hysteresis h is refilled only by a growth; with it, by every clean update
    assert deepspeed_scales({0, 2, 4}, 5, 4, 3, 2, 1) == [16, 16, 8, 8, 4]
    assert deepspeed_scales({0, 2, 4}, 5, 4, 3, 2, 1, consecutive=True) == [16] * 5
    # the floor: 4 -> 2 -> 1, then an overflow at 1 stops the run (hysteresis 1: no absorption)
    assert deepspeed_scales({0, 1, 2}, 4, 2, 1000, 1, 1) == [2, 1, STOP]
    assert deepspeed_scales({0, 1}, 3, 1, 1000, 1, 0.5) == [1, 0.5, 0.5]   # max(S/2, min) before the floor
    assert deepspeed_scales({0, 1}, 3, 12, 500, 2, 1, static=128) == [128] * 3


def _mapped(tmp_path, fp16: dict, **train):
    from parallel.config import load_config
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                                "fp16": {"enabled": True, **fp16}, "zero_optimization": {"stage": 1}}))
    report: list = []
    tree = {**XOR, "train": {**XOR["train"], **train}}
    return load_config(data=tree, deepspeed=str(path), report=report).validate(2), report


def _engine_scales(rank, world, cfg, overflows, steps):
    """Train XOR with cfg; the batch of one rank (alternating) is +inf at the steps in ``overflows``."""
    from examples.xor import INPUTS, TARGETS, build
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    from parallel.precision import LossScaleError
    engine = parallelize(build(), cfg, Mesh(dp=world))
    scales, skipped = [], []
    for t in range(steps):
        # fp16 inputs, as DeepSpeed's auto_cast: false
        x = (INPUTS + math.inf if t in overflows and rank == t % world else INPUTS).half()
        try:
            engine.train_step((x, TARGETS.half()))
        except LossScaleError as e:
            return scales + [STOP], skipped, engine.zero.steps, str(e)
        scales.append(engine.last_result.loss_scale)
        skipped.append(engine.last_result.skipped)
    return scales, skipped, engine.zero.steps, None


def test_deepspeed_fp16_block_sets_the_scale_sequence(tmp_path):
    """configs/deepspeed/fp16.json's numbers: initial_scale_power 12, window 500, hysteresis 2, min 1."""
    cfg, report = _mapped(tmp_path, {"loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
                                     "hysteresis": 2, "min_loss_scale": 1})
    ls = cfg.loss_scale
    assert (ls.initial, ls.growth_interval, ls.hysteresis, ls.min, ls.static, ls.consecutive_hysteresis) == \
        (4096.0, 500, 2, 1.0, None, False)
    assert "fp16.hysteresis = 2 -> loss_scale.hysteresis = 2" in report
    overflows, steps = {3, 4, 5, 520, 540}, 560
    want = deepspeed_scales(overflows, steps, 12, 500, 2, 1)
    assert (want[2], want[3], want[4], want[5]) == (4096, 4096, 2048, 1024)   # absorbed, halved, halved again
    assert (want[505], want[506], want[520], want[540], want[559]) == (1024, 2048, 2048, 1024, 1024)
    for scales, skipped, updates, err in run_ranks(_engine_scales, 2, cfg, overflows, steps):
        assert err is None and scales == want
        assert [t for t, s in enumerate(skipped) if s] == sorted(overflows) and updates == steps - len(overflows)


@pytest.mark.parametrize("consecutive", [False, True])
def test_small_window_random_overflows_step_by_step(tmp_path, consecutive):
    """Window 3 is reached many times; 300 updates with overflows at seeded random steps (p = 0.15)
    and in bursts of 4 (which outlast hysteresis 3 even when every clean update refills it)."""
    from parallel.precision import Precision
    cfg, _ = _mapped(tmp_path, {"initial_scale_power": 8, "loss_scale_window": 3, "hysteresis": 3,
                                "min_loss_scale": 0.25, "consecutive_hysteresis": consecutive})
    rng = random.Random(1)
    overflows = {t for t in range(300) if rng.random() < 0.15} | {b + i for b in range(40, 300, 60) for i in range(4)}
    want = deepspeed_scales(overflows, 300, 8, 3, 3, 0.25, consecutive)
    s = Precision.of(cfg.precision).scaler(cfg.loss_scale)
    got = []
    for t in range(300):
        try:
            s.update(t in overflows)
        except RuntimeError:
            got.append(STOP)
            break
        got.append(s.scale)
    assert got == want
    moves = [b / a for a, b in zip(want, want[1:], strict=False) if b != STOP and b != a]
    assert moves.count(2.0) >= 5 and moves.count(0.5) >= 5               # growth and backoff both happen
    other = deepspeed_scales(overflows, 300, 8, 3, 3, 0.25, not consecutive)
    assert other != want                                                  # the key changes the sequence


def test_min_scale_stops_or_is_kept_with_on_nonfinite_skip(tmp_path):
    """DeepSpeed stops at the floor (train.on_nonfinite=stop, the default); skip keeps S = min_loss_scale."""
    overflows = {0, 1, 2, 4}
    ds = deepspeed_scales(overflows, 6, 2, 1000, 1, 1)
    for on, want in (("stop", ds), ("skip", [2, 1, 1, 1, 1, 1])):
        cfg, _ = _mapped(tmp_path, {"initial_scale_power": 2, "hysteresis": 1, "min_loss_scale": 1},
                         on_nonfinite=on)
        for scales, skipped, _, err in run_ranks(_engine_scales, 2, cfg, overflows, 6):
            assert scales == want, on
            if on == "stop":
                assert err.startswith("fp16 gradient overflow at step 2 with the loss scale already at its minimum "
                                      "loss_scale.min=1") and "train.on_nonfinite=skip" in err
            else:
                assert skipped == [True, True, True, False, True, False]


def test_static_scale_never_moves_and_skips_overflowing_steps(tmp_path):
    cfg, report = _mapped(tmp_path, {"loss_scale": 128, "hysteresis": 1})
    assert cfg.loss_scale.static == 128.0
    overflows = {1, 2, 3}
    for scales, skipped, updates, err in run_ranks(_engine_scales, 2, cfg, overflows, 6):
        assert err is None and scales == deepspeed_scales(overflows, 6, 16, 1000, 1, 1, static=128) == [128.0] * 6
        assert skipped == [False, True, True, True, False, False] and updates == 3


def test_bad_values_name_the_key():
    from parallel.config import ConfigError, load_config
    for key, v in (("hysteresis", 0), ("growth_interval", 0), ("min", 0.0), ("static", -1.0)):
        with pytest.raises(ConfigError, match=f"loss_scale.{key}={v} must be positive"):
            load_config(data={**XOR, "precision": "fp16", "loss_scale": {key: v}}).validate(2)
