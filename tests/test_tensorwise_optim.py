"""LAMB and Muon (non-elementwise optimizers) under ZeRO 0–3 and tp equal one process.

LAMB (arXiv 1904.00962) needs ‖w‖, ‖u‖ per whole tensor; Muon (torch.optim.Muon) the whole matrix.
Single-process checks tie our classes to the textbook LAMB and to torch's Muon + AdamW; the
multi-rank checks tie every layout to one process (fp32 losses: LAMB 1e-6, Muon 1e-5) and assert
the bytes the protocol adds (:mod:`parallel.optim.tensorwise`, :mod:`parallel.zero.partition`).
"""
import pytest
import torch
from engine_cases import config, layout, train
from harness import run_ranks
from reference import assert_close_curve, reference_losses
from test_zero import global_batch, loss_of, make_model
from test_zero import train as zero_train

from parallel.config import ZeroConfig
from parallel.config.deepspeed_defaults import clip_default
from parallel.optim.lamb import Lamb
from parallel.optim.muon import MuonAdamW

OPTS = {"lamb": lambda ps: Lamb(ps, lr=2e-2, weight_decay=0.01),
        "muon": lambda ps: MuonAdamW(ps, lr=2e-2, adamw_lr=3e-3)}
TOL = {"lamb": 1e-6, "muon": 1e-5}
G, STEPS = 8, 4


def textbook_lamb(params, steps_grads, lr=2e-2, b1=0.9, b2=0.999, eps=1e-8, wd=0.01, lo=0.01, hi=10.0):
    """Algorithm 2 of arXiv 1904.00962 on whole tensors, written out independently."""
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(steps_grads, 1):
        for i, (p, g) in enumerate(zip(params, grads)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps) + wd * p
            wn, un = p.norm().item(), u.norm().item()
            r = min(max(wn / un, lo), hi) if wn > 0 and un > 0 else 1.0
            p.sub_(lr * r * u)


def test_lamb_is_the_textbook_update():
    torch.manual_seed(0)
    ps = [torch.randn(5, 3), torch.randn(7), torch.zeros(4)]
    grads = [[torch.randn_like(p) for p in ps] for _ in range(3)]
    mine = [p.clone().requires_grad_() for p in ps]
    opt = OPTS["lamb"](mine)
    for gs in grads:
        for p, g in zip(mine, gs):
            p.grad = g.clone()
        opt.step()
    textbook_lamb(ps, grads)
    for a, b in zip(mine, ps):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-7)


def torch_muon_run(steps):
    """The reference: torch.optim.Muon on the 2-D parameters, torch.optim.AdamW on the rest."""
    model = make_model("gpt")
    ps = list(model.parameters())
    mats, rest = [p for p in ps if p.ndim == 2], [p for p in ps if p.ndim != 2]
    opts = [torch.optim.Muon(mats, lr=2e-2), torch.optim.AdamW(rest, lr=3e-3)]
    return _loop(model, opts, steps)


def _loop(model, opts, steps):
    losses = []
    for t in range(steps):
        x, y = global_batch(t, G)
        for o in opts:
            o.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    return losses


def one_process(opt, steps):
    model = make_model("gpt")
    return _loop(model, [OPTS[opt](list(model.parameters()))], steps)


def test_muon_equals_torch_muon_plus_adamw_on_one_process():
    assert one_process("muon", STEPS) == pytest.approx(torch_muon_run(STEPS), rel=1e-6)


def _zero_dp(rank, world, runs):
    from parallel.comm import CommStats
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    g = Mesh(dp=world).group("dp")
    out = []
    for opt, stage in runs:
        model = make_model("gpt")
        zero = ZeroOptimizer(model, OPTS[opt], g, ZeroConfig(stage=stage, bucket_mb=0.02))
        losses, _ = zero_train(zero, model, g, G, STEPS - 1)
        # one more step, its traffic split: backward vs optimizer step
        x, y = global_batch(STEPS - 1, G)
        per = G // world
        zero.zero_grad()
        zero.prepare_step(1)
        loss = loss_of(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        loss.backward()
        zero.finish_grad_sync()
        before = g.stats.snapshot()
        zero.step()
        step = CommStats.diff(g.stats.snapshot(), before).get("dp", {})
        losses.append(loss.item())
        mats = [b.padded for b in zero._all if any(len(s) == 2 for s in b.shapes)]
        P = sum(len(b.params) for b in zero._all)
        padded = sum(b.padded for b in zero._all)
        out.append((losses, step, mats, P, padded))
    return out


@pytest.mark.parametrize("runs", [
    [("lamb", 2), ("muon", 0), ("muon", 3)],
    pytest.param([(opt, s) for opt in ("lamb", "muon") for s in (0, 1, 2, 3)], marks=pytest.mark.slow, id="all")],
    ids=["lamb2-muon03", "all"])
def test_dp2_zero_stages_equal_one_process(runs):
    """LAMB: every stage equals one process to 1e-6 over 4 steps. Muon: every stage equals one process
    running torch.optim.Muon + AdamW to 1e-5 over 3 steps, and stages 1–3 equal stage 0 bit for bit
    over 4. torch's Newton–Schulz runs in bf16, so the last-bit difference between a whole-batch
    gradient and dp's sum of two halves flips bf16 roundings and grows chaotically (measured 6e-8,
    7e-7, 5e-6, 2e-5 over steps 1–4; the same with one process summing two half-batch backwards)."""
    res = run_ranks(_zero_dp, 2, runs)
    N = 2
    curves = {}
    for i, (opt, stage) in enumerate(runs):
        got = curves[opt, stage] = [sum(r[i][0][t] for r in res) / N for t in range(STEPS)]
        if opt == "muon":
            assert_close_curve(got[:3], torch_muon_run(3), TOL[opt], f"muon zero-{stage} dp=2 vs torch Muon")
            assert got == curves["muon", 0], stage       # the gather / re-shard changes no bit
        else:
            assert_close_curve(got, one_process(opt, STEPS), TOL[opt], f"{opt} zero-{stage} dp=2")
        step, mats, P, padded = res[0][i][1:]
        ag = step.get("all_gather", {}).get("wire_bytes", 0.0)
        ar = step.get("all_reduce", {}).get("payload_bytes", 0)
        gather_params = (N - 1) / N * 4 * padded if stage in (1, 2) else 0.0   # the write-back all-gather
        if stage == 0:
            assert ag == 0 and ar == 0, (opt, step)   # stage 0 owns whole tensors: nothing to ask for
            continue
        if opt == "lamb":    # ‖w‖², ‖u‖² per parameter: one float64 all-reduce, 16·P bytes, + the grad norm's 32
            assert ar == 16 * P + 32 and ag == pytest.approx(gather_params), (stage, step)
        else:                # the buckets holding matrices are all-gathered once (fp32)
            assert ar == 32 and ag == pytest.approx(gather_params + (N - 1) / N * 4 * sum(mats)), (stage, step)


def _engine_losses(rank, world, model, overrides):
    losses, engine = train(rank, world, model, overrides)
    return losses, engine.mesh.stats.snapshot()


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["lamb", "muon"])
def test_tp2_equals_one_process(opt):
    over = [f"optimizer.name={opt}", "optimizer.lr=0.02", f"train.steps={STEPS}"]
    res = run_ranks(_engine_losses, 2, "gpt", layout(1, 2, 1, 0) + over)
    want = reference_losses(config("gpt", over))
    assert_close_curve(res[0][0], want, TOL[opt], f"{opt} tp=2")
    assert "tp" in res[0][1]


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["lamb", "muon"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_dp2_tp2_zero_equals_one_process(opt, stage):
    over = [f"optimizer.name={opt}", "optimizer.lr=0.02", f"train.steps={STEPS}"]
    res = run_ranks(_engine_losses, 4, "gpt", layout(2, 2, 1, stage) + over)
    want = reference_losses(config("gpt", over))
    assert_close_curve(res[0][0], want, TOL[opt], f"{opt} dp2 tp2 zero-{stage}")


def test_config_and_deepspeed_lamb_mapping():
    from test_deepspeed_config import BASE

    from parallel.config import ConfigError, load_config
    from parallel.config.deepspeed import map_deepspeed, merge_tree
    from parallel.optim.factory import optimizer_factory
    ds = {"optimizer": {"type": "Lamb", "params": {"lr": 0.01, "weight_decay": 0.1, "max_coeff": 10.0}}}
    ov, report = map_deepspeed(ds, BASE, 2)
    cfg = load_config(data=merge_tree(BASE, ov)).validate(2)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("lamb", 0.01, 0.1)
    assert any("optimizer.name" in line and "lamb" in line for line in report)
    f = optimizer_factory(cfg.optimizer)
    assert f.cls is Lamb and f.kwargs == {"lr": 0.01, "weight_decay": 0.1}
    with pytest.raises(ConfigError, match="max_coeff"):
        map_deepspeed({"optimizer": {"type": "Lamb", "params": {"max_coeff": 5.0}}}, BASE, 2)
    m = optimizer_factory(load_config(data=merge_tree(BASE, {"optimizer": {
        "name": "muon", "lr": 0.02, "momentum": 0.9, "eps": 1e-7, "adamw_lr": 1e-3}})).validate(2).optimizer)
    assert m.cls is MuonAdamW and m.kwargs == {"lr": 0.02, "momentum": 0.9, "adamw_eps": 1e-7, "adamw_lr": 1e-3}
    ov, lines = map_deepspeed({"optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3, "freeze_step": 400,
                                                                             "cuda_aware": False}}}, BASE, 2)
    if clip_default()[0]:        # DeepSpeed's default clipping cannot apply to 1-bit Adam: said, not silently dropped
        assert "train" not in ov and any("NOT applied" in x for x in lines), lines
    o = load_config(data=merge_tree(BASE, ov)).validate(2).optimizer
    assert (o.name, o.lr, o.freeze_step) == ("onebit_adam", 1e-3, 400)
    with pytest.raises(ConfigError, match="zero.stage=3"):
        load_config(data=merge_tree(BASE, {**ov, "zero": {"stage": 3}})).validate(2)
    with pytest.raises(ConfigError, match="needs precision=fp32"):
        load_config(data=merge_tree(BASE, {**ov, "zero": {"stage": 1}, "precision": "bf16"})).validate(2)
    load_config(data=merge_tree(BASE, {**ov, "zero": {"stage": 2}})).validate(2)      # ZeRO-1/2: parallel/zero/onebit
    with pytest.raises(ConfigError, match="adamw_lr"):
        load_config(data=merge_tree(BASE, {"optimizer": {"name": "lamb", "adamw_lr": 1e-3}})).validate(2)
