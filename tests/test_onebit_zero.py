"""1-bit Adam on the ZeRO partition (parallel/zero/onebit.py) and its checkpoints, at dp=2 on a tiny
MLP split over several buckets: the compressed phase's wire bytes equal the formula exactly, the
replicas stay bit-identical, a resume from state_dict() continues bit-exactly (stages 0, 1, 2; the
error-feedback buffers travel in it — without them the continuation differs), and the limits are
refused. Bytes and convergence on the char LM: tests/test_onebit_adam.py (slow)."""
import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
from harness import run_ranks

FREEZE, SAVE, END = 2, 5, 8


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _zero(stage, g, lamb=False, **kw):
    from parallel.config import ZeroConfig
    from parallel.optim.onebit_adam import OneBitAdam
    from parallel.optim.onebit_lamb import OneBitLamb
    from parallel.zero import ZeroOptimizer
    model = _model()
    cls = OneBitLamb if lamb else OneBitAdam
    zero = ZeroOptimizer(model, lambda ps: cls(ps, lr=1e-2, weight_decay=0.01, freeze_step=FREEZE), g,
                         ZeroConfig(stage=stage, bucket_mb=0.0003), **kw)
    return model, zero


def _steps(model, zero, g, lo, hi, after_step=None):
    """Steps lo … hi−1 of the tiny regression (rank r: rows 4r … 4r+3): per step the mean loss and the dp
    wire bytes (CommStats); ``after_step(model)``, if given, runs after each step (tests/test_zero_one_adam.py)."""
    from parallel.comm import CommStats
    losses, wire = [], []
    for t in range(lo, hi):
        gen = torch.Generator().manual_seed(t)
        x, y = torch.randn(8, 8, generator=gen), torch.randn(8, 4, generator=gen)
        x, y = x[4 * g.rank:4 * g.rank + 4], y[4 * g.rank:4 * g.rank + 4]
        before = g.stats.snapshot()
        zero.zero_grad()
        zero.prepare_step(1)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        zero.step()
        d = CommStats.diff(g.stats.snapshot(), before).get("dp", {})
        wire.append(sum(v["wire_bytes"] for v in d.values()))
        losses.append(loss.item())
        if after_step is not None:
            after_step(model)
    return losses, wire


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _resume(rank, world, stage, lamb=False):
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    model, zero = _zero(stage, g, lamb)
    _, wire = _steps(model, zero, g, 0, SAVE)
    sd = _roundtrip(zero.state_dict())
    full = _roundtrip(zero.full_state_dict())
    tail, wire2 = _steps(model, zero, g, SAVE, END)
    ref = _flat(model)
    out = {"tail": tail, "wire": wire + wire2, "params": ref, "buckets": [(b.shard, b.numel) for b in zero._all],
           "nbuckets": len(zero._all), "opt_bytes": zero.model_state_bytes()["optimizer"]}
    model2, zero2 = _zero(stage, g, lamb)
    zero2.load_state_dict(sd)
    out["tail2"], _ = _steps(model2, zero2, g, SAVE, END)
    out["params2"] = _flat(model2)
    sd["optimizer"]["onebit_comm"] = {}                           # the same checkpoint without the buffers
    model3, zero3 = _zero(stage, g, lamb)
    zero3.load_state_dict(sd)
    out["tail3"], _ = _steps(model3, zero3, g, SAVE, END)
    model4, zero4 = _zero(stage, g, lamb)                               # the full (per-name) state dict: exact too
    zero4.load_full_state_dict(full)
    out["tail4"], _ = _steps(model4, zero4, g, SAVE, END)
    out["params4"] = _flat(model4)
    model5, zero5 = _zero((stage + 1) % 3, g, lamb)                     # another stage: buffers restart, with a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zero5.load_full_state_dict(full)
    out["warned"] = [str(w.message) for w in caught if "restart at zero" in str(w.message)]
    out["tail5"], _ = _steps(model5, zero5, g, SAVE, END)
    same = [torch.empty_like(ref) for _ in range(world)]
    torch.distributed.all_gather(same, ref)
    out["replicas_equal"] = all(torch.equal(s, ref) for s in same)
    return out


@pytest.mark.parametrize("stage,lamb", [(0, False), (1, False), (2, False), (0, True), (2, True)])
def test_dp2_resume_is_exact_and_bytes_match(stage, lamb):
    """lamb: 1-bit LAMB (parallel/optim/onebit_lamb.py) — the same exchange, per-tensor factors on every rank."""
    r0, r1 = run_ranks(_resume, 2, stage, lamb)
    assert r0["nbuckets"] >= 2                                    # several buckets go through one exchange
    for r in (r0, r1):
        assert r["tail2"] == r["tail"] and torch.equal(r["params2"], r["params"])
        assert r["tail4"] == r["tail"] and torch.equal(r["params4"], r["params"])
        assert all(math.isfinite(v) for v in r["tail5"])
        assert r["replicas_equal"]
    assert r0["tail3"] != r0["tail"] or r1["tail3"] != r1["tail"]     # the buffers matter: the test can fail
    assert len(r0["warned"]) == 1 and "zero.stage" in r0["warned"][0] and not r1["warned"]
    if stage:
        N = 2
        exchange = sum(N * (-(-c // 8) + 4) for c, _ in r0["buckets"])   # signs + one fp32 scale per shard
        expect = 2 * (N - 1) / N * exchange + 2 * (N - 1) / N * 8        # all-to-all + all-gather + norm
        for w in r0["wire"][FREEZE + 1:]:
            assert w == pytest.approx(expect, abs=1e-9), (w, expect)
        assert r0["wire"][FREEZE] > expect                          # the freeze step gathers m once (fp32)


def _refusals(rank, world):
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    msgs = []
    for stage, kw in ((3, {}), (1, {"grad_clip": 1.0}), (1, {"precision": "bf16"})):
        try:
            _zero(stage, g, **kw)
            msgs.append(None)
        except ValueError as e:
            msgs.append(str(e))
    return msgs


def test_limits_are_refused_with_the_reason():
    msgs = run_ranks(_refusals, 2)[0]
    assert "zero.stage=3" in msgs[0] and "use zero.stage" in msgs[0]
    assert "train.grad_clip" in msgs[1]
    assert "precision=fp32" in msgs[2]
