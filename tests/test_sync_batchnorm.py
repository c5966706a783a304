"""parallel.sync_batchnorm: BatchNorm statistics over the dp group, exact against one process.

The model is examples/cnn.py (5 BatchNorm2d layers of C = 8 channels) trained from configs/cnn_dp2.yaml.
With one micro-batch per dp rank, sync on reproduces tests/reference.py (one process, the global
batch in one forward): losses, final weights and running statistics to 1e-5. Sync off differs (the
option matters) and warns. Bytes: each BatchNorm layer adds, per forward, 3 all-reduces on the dp
axis — [Σx, n] (C + 1 floats), [Σ(x−μ)²] (C), [Σdy, Σdy·x̂] (2C) — so a rank holding layers of C_l
channels sends exactly Σ_l 2(N−1)/N · 4 · (4C_l + 1) bytes more per forward than with sync off
(ring model, fp32; N = dp). With m > 1 micro-batches the statistics are per micro-batch over the dp
group: the run equals one process accumulating gradients over m micro-batches of dp × micro_batch_size
samples (the engine warns that this is not the global batch).
"""
import os
import warnings

import pytest
import torch
from harness import run_ranks
from reference import assert_close_curve, reference_losses
from torch.utils.data import default_collate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNN_YAML = os.path.join(ROOT, "configs", "cnn_dp2.yaml")
STEPS = 8


def _cfg(overrides, world=None):
    from parallel.config import load_config
    cfg = load_config(CNN_YAML, overrides=[f"train.steps={STEPS}", "train.metrics_file=null"] + list(overrides))
    return cfg.validate(world) if world else cfg


def _run(cfg, mesh):
    """Build, parallelize and train ``cfg`` as launch.train.run does; per-step extra dp traffic counted."""
    from launch.train import build_dataset, build_model, load_batch
    from parallel.comm import CommStats
    from parallel.data_parallel.sync_batchnorm import SyncBatchNormMixin
    from parallel.engine import parallelize
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = parallelize(build_model(cfg), cfg, mesh)
    ds = build_dataset(cfg)
    losses, traffic = [], []
    for t in range(cfg.train.steps):
        before = mesh.stats.snapshot()
        losses.append(engine.train_step(load_batch(ds, t, cfg, mesh.size("dp"), mesh.local_rank("dp"))))
        d = CommStats.diff(mesh.stats.snapshot(), before).get("dp", {})
        traffic.append((sum(c["calls"] for c in d.values()), sum(c["wire_bytes"] for c in d.values())))
    channels = [m.num_features for st in engine.stages for m in st.modules() if isinstance(m, SyncBatchNormMixin)]
    sd = engine.full_state_dict()     # parameters and (tests/test_checkpoint_buffers.py) trained buffers; the
    buffers = {n: b.detach().clone() for st in engine.stages for n, b in st.named_buffers()}   # live ones here
    return {"losses": losses, "traffic": traffic, "sd": sd, "buffers": buffers, "channels": channels,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)]}


def _on_off(rank, world, overrides):
    """The same layout with sync_batchnorm on, then off."""
    from parallel.mesh import Mesh
    out = []
    for on in ("true", "false"):
        cfg = _cfg(list(overrides) + [f"parallel.sync_batchnorm={on}"], world)
        p = cfg.parallel
        out.append(_run(cfg, Mesh(pp=p.pp, dp=p.dp, tp=p.tp)))
    return out


def _bn_bytes(channels, N, m):
    """Theory: per step, per rank, the extra dp wire bytes of the synchronised statistics."""
    return m * sum(2 * (N - 1) / N * 4 * (4 * C + 1) for C in channels)


def _assert_state_close(got, want, what):
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))}"
    for k, w in want.items():
        g = got[k].to(w.dtype).reshape(w.shape)
        if k.endswith("num_batches_tracked"):
            assert int(g) == int(w), f"{what}: {k} = {int(g)}, one process {int(w)}"
        else:
            err = (g.double() - w.double()).abs().max().item()
            assert err <= 1e-5 * max(1.0, w.abs().max().item()), f"{what}: {k} differs by {err:.3g}"


def _state(results):
    """Rank 0's consolidated parameters with every rank's live buffers (dp replicas must agree)."""
    sd = dict(results[0]["sd"])
    bufs = {}
    for r in results:
        for k, v in r["buffers"].items():
            assert k not in bufs or torch.equal(bufs[k], v), f"{k}: dp replicas hold different running statistics"
            bufs[k] = v
    sd.update(bufs)
    return sd


def _check_exact_and_counted(res, N, m, want_losses, want_sd, what):
    on0, off0 = res[0]
    assert_close_curve(on0["losses"], want_losses, 1e-5, f"{what} sync on")
    _assert_state_close(_state([r[0] for r in res]), want_sd, f"{what} sync on")
    # off: per-rank statistics, different numbers (the option matters), and rank 0 says so
    worst = max(abs(a - b) / abs(b) for a, b in zip(off0["losses"], want_losses, strict=True))
    assert worst > 1e-4, f"{what}: sync off matches one process ({worst:.2e}): the test cannot tell the option apart"
    assert any("set parallel.sync_batchnorm: true" in w for w in off0["warnings"]), off0["warnings"]
    assert not any("sync_batchnorm" in w for w in on0["warnings"]), on0["warnings"]
    for rank, (on, off) in enumerate(res):
        assert on["losses"] == on0["losses"]
        assert on["channels"] and off["channels"] == []
        for t, ((c1, b1), (c0, b0)) in enumerate(zip(on["traffic"], off["traffic"], strict=True)):
            assert c1 - c0 == 3 * m * len(on["channels"]), f"rank {rank} step {t}: {c1 - c0} extra dp calls"
            assert b1 - b0 == pytest.approx(_bn_bytes(on["channels"], N, m), rel=1e-12), f"rank {rank} step {t}"


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_dp2_sync_batchnorm_exact(stage):
    res = run_ranks(_on_off, 2, [f"zero.stage={stage}"])
    want_losses, model = reference_losses(_cfg([]), return_model=True)
    _check_exact_and_counted(res, 2, 1, want_losses, model.state_dict(), f"dp2 zero-{stage}")
    assert res[0][0]["channels"] == [8] * 5              # every BatchNorm2d converted, 660 bytes per step
    assert _bn_bytes([8] * 5, 2, 1) == 660


def test_dp2_pp2_sync_batchnorm_exact():
    """The Sequential CNN splits between its children (stem + 2 blocks | 2 blocks + head): each pp rank
    synchronises its own stage's BatchNorm layers over its dp group."""
    res = run_ranks(_on_off, 4, ["parallel.pp=2", "zero.stage=1"], timeout=300)
    want_losses, model = reference_losses(_cfg([]), return_model=True)
    _check_exact_and_counted(res, 2, 1, want_losses, model.state_dict(), "dp2 x pp2 zero-1")
    assert sorted(len(r[0]["channels"]) for r in res) == [2, 2, 3, 3]


def _accumulating_reference(cfg):
    """One process, m micro-batches per step; micro-batch j = every dp rank's j-th micro-batch."""
    from parallel.config import import_object
    from parallel.data import global_indices
    from parallel.loss import resolve_loss
    from parallel.optim.factory import optimizer_factory
    torch.manual_seed(cfg.train.seed)
    model = import_object(cfg.model.factory, "model.factory")(**cfg.model.kwargs)
    data = import_object(cfg.data.factory, "data.factory")(**cfg.data.kwargs)
    opt = optimizer_factory(cfg.optimizer)(list(model.parameters()))
    loss_fn, N, mb, m = resolve_loss(cfg.loss), cfg.parallel.dp, cfg.data.micro_batch_size, cfg.micro_batches
    per, losses = cfg.data.global_batch_size // N, []
    for t in range(cfg.train.steps):
        idx = global_indices(t, cfg.data.global_batch_size, len(data), cfg.train.seed, cfg.data.shuffle)
        opt.zero_grad()
        total = 0.0
        for j in range(m):
            x, y = default_collate([data[i] for r in range(N) for i in idx[r * per + j * mb:r * per + (j + 1) * mb]])
            loss = loss_fn(model(x), y)
            (loss / m).backward()
            total += loss.item() / m
        opt.step()
        losses.append(total)
    return losses, model


def _micro(rank, world):
    from parallel.mesh import Mesh
    return _run(_cfg(["data.micro_batch_size=4", "zero.stage=1"], world), Mesh(dp=world))


def test_micro_batches_sync_per_micro_batch_and_warn():
    """m = 2: statistics over dp × 4 samples per forward — one process accumulating over 2 micro-batches
    of 8, not one process with the global 16 — and rank 0 warns so."""
    res = run_ranks(_micro, 2)
    cfg = _cfg(["data.micro_batch_size=4"])
    want_losses, model = _accumulating_reference(cfg)
    assert_close_curve(res[0]["losses"], want_losses, 1e-5, "dp2 m=2 sync")
    state = _state(res)
    _assert_state_close(state, model.state_dict(), "dp2 m=2 sync")
    assert int(state["1.bn.num_batches_tracked"]) == 2 * STEPS            # m updates per step
    global_batch = reference_losses(cfg)
    assert max(abs(a - b) / abs(b) for a, b in zip(res[0]["losses"], global_batch, strict=True)) > 1e-4
    assert any("2 micro-batches per dp rank" in w and "data.micro_batch_size=8" in w for w in res[0]["warnings"])
    assert res[1]["warnings"] == []                                         # rank 0 only


# --- single process: the conversion itself ----------------------------------------------------------
def _group(size=1):
    from parallel.comm import Group
    return Group(None, "dp", tuple(range(size)), 0)


def test_convert_in_place_keeps_tensors_and_matches_torch_on_one_rank():
    from examples.cnn import build
    from parallel.data_parallel.sync_batchnorm import SyncBatchNormMixin, convert_sync_batchnorm
    torch.manual_seed(0)
    ref, model = build(), build()
    model.load_state_dict(ref.state_dict())
    bn = model[1].bn
    before = {k: v for k, v in bn.state_dict(keep_vars=True).items()}
    assert convert_sync_batchnorm(model, _group()) == ["0.bn", "1.bn", "2.bn", "3.bn", "4.bn"]
    assert type(bn).__name__ == "SyncBatchNorm2d" and isinstance(bn, (SyncBatchNormMixin, torch.nn.BatchNorm2d))
    assert all(v is before[k] for k, v in bn.state_dict(keep_vars=True).items())   # same Parameters, buffers
    x = torch.randn(6, 3, 8, 8)
    assert torch.equal(model(x), ref(x))                 # one rank: torch's own BatchNorm, bit for bit
    assert torch.equal(model[1].bn.running_var, ref[1].bn.running_var)
    with pytest.raises(ValueError, match="expected .*4D input"):
        bn(torch.randn(2, 8))


def test_convert_refuses_what_it_cannot_keep():
    from parallel.data_parallel.sync_batchnorm import convert_sync_batchnorm

    class ScaledBN(torch.nn.BatchNorm1d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match=r"0 is a ScaledBN with its own forward.*sync_batchnorm: false"):
        convert_sync_batchnorm(torch.nn.Sequential(ScaledBN(4)), _group())
    with pytest.raises(TypeError, match=r"mesh.group\('dp'\)"):
        convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(4)), "dp")


def test_config_key_is_a_bool():
    from parallel.config import ConfigError
    assert _cfg([]).parallel.sync_batchnorm is True and _cfg(["parallel.sync_batchnorm=false"]).parallel.dp == 2
    cfg = _cfg([])
    cfg.parallel.sync_batchnorm = "yes"
    with pytest.raises(ConfigError, match="parallel.sync_batchnorm='yes' must be true or false"):
        cfg.validate(2)
