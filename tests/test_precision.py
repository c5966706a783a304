"""Mixed precision: policies, the dynamic loss scaler, bf16/fp16 ZeRO tracking the fp32 loop, and
fp16 overflow skipping the step on every rank.

Tolerance: bf16/fp16 (params, compute and gradient reduction in 16 bits, fp32 master weights) track
the fp32 single-process loss curve to 1e-2 relative over 8 steps of the small GPT (measured ≤ 4e-3).
"""
import pytest
import torch
from harness import run_ranks
from test_zero import CLIP, assert_curve, mean_over_ranks, reference_losses, train, zero_run

from parallel.config import ZeroConfig


def test_precision_policies():
    from parallel.precision import Precision
    assert Precision.of("fp32").master is False and Precision.of("fp32").bytes_per_element == 4
    bf = Precision.of("bf16")
    assert bf.master and bf.param_dtype == torch.bfloat16 and bf.reduce_dtype == torch.bfloat16
    assert bf.bytes_per_element == 2 and not bf.scaler().enabled and bf.scaler().scale == 1.0
    assert Precision.of("fp16").scaler().enabled
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        Precision.of("int8")


def test_loss_scaler_backoff_growth_and_message():
    from parallel.precision import LossScaler
    s = LossScaler(init_scale=2.0 ** 16, growth_interval=3, hysteresis=1)
    assert s.update(True) == "step skipped: fp16 gradient overflow, loss scale 65536 -> 32768"
    assert s.scale == 2.0 ** 15 and s.skipped_steps == 1
    for _ in range(3):
        assert s.update(False) is None
    assert s.scale == 2.0 ** 15                      # three clean steps: not yet (DeepSpeed: W + 1 after an overflow)
    s.update(False)
    assert s.scale == 2.0 ** 16                      # the fourth doubles it
    h = LossScaler(init_scale=8.0, hysteresis=2)
    assert h.update(True) == "step skipped: fp16 gradient overflow, loss scale 8 kept (hysteresis 2 -> 1)"
    t = LossScaler(init_scale=8.0, hysteresis=2)
    t.load_state_dict(h.state_dict())
    assert t.state_dict() == h.state_dict() == {"enabled": True, "scale": 8.0, "iter": 1, "last_overflow": 0,
                                                "hysteresis_left": 1, "skipped_steps": 1}
    assert t.update(True) == "step skipped: fp16 gradient overflow, loss scale 8 -> 4"     # the restored count acts
    old = LossScaler(init_scale=8.0)
    old.load_state_dict({"enabled": True, "scale": 4.0, "good_steps": 5, "skipped_steps": 2})   # earlier format
    assert (old.scale, old.iter, old.last_overflow, old.hysteresis_left) == (4.0, 5, -1, 2)
    off = LossScaler(enabled=False)
    assert off.scale == 1.0 and off.update(True) is None and off.scale == 1.0
    with pytest.raises(ValueError, match=r"loss_scale.hysteresis=0 must be an integer >= 1"):
        LossScaler(hysteresis=0)


def _low_precision(rank, world, precisions):
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    ref = reference_losses("gpt", "adamw", 8, 8, CLIP) if rank == 0 else None
    out = {}
    for prec in precisions:
        for stage in range(4):
            losses, _, zero, model = zero_run(g, "gpt", "adamw", 8, 8, stage, m=2, clip=CLIP, precision=prec)
            dtypes = ({p.dtype for p in model.parameters()} if stage < 3
                      else {b.shard_param.dtype for b in zero.buckets})
            out[(prec, stage)] = (losses, dtypes, {b.master.dtype for b in zero._all})
    return ref, out


@pytest.mark.parametrize("precisions", [("bf16", "fp16")])
def test_low_precision_tracks_fp32(precisions):
    res = run_ranks(_low_precision, 2, precisions)
    ref = res[0][0]
    for key in res[0][1]:
        got = mean_over_ranks([r[1][key] for r in res])
        assert_curve(got, ref, 1e-2, f"{key}")
        _, dtypes, masters = res[0][1][key]
        assert dtypes == {torch.bfloat16 if key[0] == "bf16" else torch.float16} and masters == {torch.float32}


def _overflow(rank, world, stage):
    from test_zero import OPTS, global_batch, loss_of, make_model

    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    g = Mesh(dp=world).group("dp")
    model = make_model("gpt")
    zero = ZeroOptimizer(model, OPTS["adamw"], g, ZeroConfig(stage=stage, bucket_mb=0.05), precision="fp16")
    train(zero, model, g, 8, 1)
    before = zero.full_state_dict()
    x, y = global_batch(1, 8)
    zero.zero_grad()
    loss = loss_of(model, x[rank * 4:rank * 4 + 4], y[rank * 4:rank * 4 + 4])
    if rank == 0:
        loss = loss * float("inf")                    # only one rank overflows: all must skip
    (loss * zero.loss_scale).backward()
    res = zero.step()
    after = zero.full_state_dict()
    unchanged = all(torch.equal(before["params"][n], after["params"][n]) for n in before["params"])
    same_state = all(torch.equal(before["state"][n]["exp_avg"], after["state"][n]["exp_avg"]) for n in before["state"])
    nxt = train(zero, model, g, 8, 1, start=2)[0][0]
    return res.skipped, res.message, res.loss_scale, unchanged, same_state, after["steps"], zero.loss_scale, nxt


@pytest.mark.parametrize("stage", [2, 3])
def test_fp16_overflow_skips_the_step_everywhere(stage):
    res = run_ranks(_overflow, 2, stage)
    for skipped, msg, scale, unchanged, same_state, steps, scale_after, nxt in res:
        # DeepSpeed's default hysteresis 2: the first overflow is absorbed, the scale stays
        assert skipped and msg == "step skipped: fp16 gradient overflow, loss scale 65536 kept (hysteresis 2 -> 1)"
        assert scale == 65536.0 and scale_after == 65536.0
        assert unchanged and same_state and steps == 1       # nothing moved, the step was not counted
        assert nxt == nxt and abs(nxt) < 10                  # the next step trains normally (finite)
