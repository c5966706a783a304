"""ZeRO with offload on gloo CPU ranks: the offloaded runs reproduce the non-offloaded loss curves,
every step moves exactly the bytes the configuration implies, a full disk rolls a step back on every
rank, bad configurations fail before any state is written, and checkpoints see the offloaded state.

Byte counts per step and rank (fp32, Adam; n_b = owned, unpadded elements of bucket b's shard):
  optimizer store   read = written = 12 · Σ_b n_b   (master, exp_avg, exp_avg_sq); Σ over ranks = 12Ψ
                    on NVMe each sub-group of ≤ S = buffer_bytes / 12 elements is rounded up to 4 KiB
  parameter store   read = 2 · Σ_u 4·shard_u (one gather in forward, one in backward per unit)
                    written = Σ_u 4·shard_u (units whose shard holds parameters)
"""
import errno
import os

import pytest
import torch
from harness import run_ranks
from test_zero import CLIP, OPTS, assert_curve, block_type, make_model, mean_over_ranks, reference_losses, train

from parallel.config import ZeroConfig

RTOL = 1e-5
STEPS, G = 20, 8
BUF_MB = 0.01                     # 12 KiB buffers: ~1000-element sub-groups, many per bucket


def _cfg(path, optimizer="none", params="none", **kw):
    from parallel.config import OffloadConfig
    return OffloadConfig(optimizer=optimizer, params=params, nvme_path=path,
                         **{"buffer_count": 4, "buffer_mb": BUF_MB, "prefetch_depth": 1, **kw})


def _zero(group, stage, offload=None, kind="gpt", opt="adamw", clip=CLIP, **kw):
    from parallel.zero import ZeroOptimizer
    model = make_model(kind)
    if stage == 3:
        kw.setdefault("unit_types", (block_type(kind),))
    return ZeroOptimizer(model, OPTS[opt], group, ZeroConfig(stage=stage, bucket_mb=0.05, offload=offload),
                         grad_clip=clip, **kw), model


def _expected_io(zero, buf_mb):
    """The byte counts the configuration implies, computed from the partition, not from the store."""
    from parallel.offload.aio import align_up
    sub = align_up(int(buf_mb * 2 ** 20)) // 12
    owned = [max(0, min(b.hi, b.numel) - b.lo) for b in zero._all]
    disk = sum(align_up(12 * min(sub, n - s)) for n in owned for s in range(0, n, sub))
    units = [b for b in zero._all if b.shard_param is not None]
    return {"opt": 12 * sum(owned), "opt_disk": disk, "subgroups": sum(-(-n // sub) for n in owned),
            "param_read": 2 * sum(4 * u.shard for u in units),
            # units kept gathered from forward to backward (zero.keep_after_forward) are read once a step
            # from the second step on (the first traces which those are)
            "kept_read": sum(4 * u.shard for u in zero.stage3.kept_units()) if zero.stage3 else 0,
            "param_write": sum(4 * u.shard for u, n in zip(zero._all, owned) if u.shard_param is not None and n)}


def _io_run(group, stage, offload, steps):
    """Train ``steps`` steps; per step, the optimizer and parameter stores' counter deltas."""
    zero, model = _zero(group, stage, offload)
    per_step, losses = [], []
    for t in range(steps):
        before = zero.offload_stats()
        losses += train(zero, model, group, G, 1, start=t)[0]
        after = zero.offload_stats()
        counters = ("bytes_read", "bytes_written", "disk_bytes_read", "disk_bytes_written", "reads", "writes")
        per_step.append({k: {c: after[k]["stats"][c] - before[k]["stats"][c] for c in counters}
                         for k in after})
    out = dict(losses=losses, io=per_step, want=_expected_io(zero, BUF_MB), psi=zero.num_params,
               mem=zero.model_state_bytes(), kernel=zero.offload_stats()["optimizer"]["kernel"])
    zero.close()
    return out


CASES = [(2, "cpu", "none"), (2, "nvme", "none"), (3, "nvme", "nvme")]


def _exact(rank, world, path):
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    ref = reference_losses("gpt", "adamw", STEPS, G, CLIP) if rank == 0 else None
    plain = {}
    for stage in (2, 3):
        zero, model = _zero(g, stage)
        plain[stage] = (train(zero, model, g, G, STEPS)[0], zero.model_state_bytes())
    runs = {c: _io_run(g, c[0], _cfg(path, c[1], c[2]), STEPS) for c in CASES}
    return ref, plain, runs


def test_offloaded_runs_reproduce_curves_and_move_the_implied_bytes(tmp_path):
    res = run_ranks(_exact, 2, str(tmp_path))
    ref = res[0][0]
    for stage, opt, par in CASES:
        what = f"stage {stage} optimizer={opt} params={par}"
        plain = mean_over_ranks([r[1][stage] for r in res])
        got = mean_over_ranks([r[2][(stage, opt, par)] for r in res], key="losses")
        assert_curve(got, plain, RTOL, f"{what} vs the same stage without offload")
        assert_curve(got, ref, RTOL, f"{what} vs one process")
        total_opt = 0
        for r in res:
            run = r[2][(stage, opt, par)]
            want, mem = run["want"], run["mem"]
            total_opt += want["opt"]
            for t, io in enumerate(run["io"]):
                o = io["optimizer"]
                assert o["bytes_read"] == o["bytes_written"] == want["opt"], (what, t, o, want)
                assert o["reads"] == o["writes"] == want["subgroups"], (what, t, o)
                if opt == "nvme":
                    assert o["disk_bytes_read"] == o["disk_bytes_written"] == want["opt_disk"], (what, t, o)
                if par != "none":
                    p = io["params"]
                    assert p["bytes_read"] == want["param_read"] - (want["kept_read"] if t else 0), (what, t, p, want)
                    assert p["bytes_written"] == want["param_write"], (what, t, p, want)
            # nothing of the optimizer state is held in memory; stage-3 params neither when offloaded
            assert mem["master"] <= 64 * 8 and mem["optimizer"] == 0, (what, mem)
            if par != "none":
                assert mem["params"] <= 64 * 8, (what, mem)
        assert total_opt == 12 * res[0][2][(stage, opt, par)]["psi"]     # the ranks' partitions tile Ψ
    for r in res:                   # stage 3 without offload holds them: 8 bytes/element + a 4-byte step per piece
        extra = r[1][3][1]["optimizer"] - 8 * r[2][(3, "nvme", "nvme")]["want"]["opt"] // 12
        assert 0 < extra <= 4 * 64 and extra % 4 == 0, extra


# --- without clipping the offloaded update overlaps backward: the same numbers -------------------------

def _overlap(rank, world, path):
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    out = {}
    for stage, opt, par in ((2, "cpu", "none"), (3, "nvme", "nvme")):
        plain, model = _zero(g, stage, clip=None)
        want = train(plain, model, g, G, 8)[0]
        zero, model = _zero(g, stage, _cfg(path, opt, par), clip=None)
        got = train(zero, model, g, G, 8)[0]
        last = zero.offload_stats()["optimizer"]["last_step"]
        out[stage] = (want, got, last["early_buckets"], sum(1 for b in zero._all if not b.deferred))
        zero.close()
    return out


def test_update_overlaps_backward_without_clipping(tmp_path):
    res = run_ranks(_overlap, 2, str(tmp_path))
    for stage in (2, 3):
        want = mean_over_ranks([r[stage] for r in res], key=0)
        got = mean_over_ranks([r[stage] for r in res], key=1)
        assert_curve(got, want, RTOL, f"stage {stage} overlapped offload vs no offload")
        for r in res:                                 # every bucket was updated during backward
            assert r[stage][2] == r[stage][3] > 0, (stage, r[stage][2:])


# --- a disk that fills mid-step: rolled back on every rank, then training goes on exactly -------------

class _FullDisk:
    """os.pwrite that raises ENOSPC while armed."""

    def __init__(self):
        self.armed = False

    def __call__(self, fd, buf, offset):
        if self.armed:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, buf, offset)


def _full_disk(rank, world, path, stage, params, clip=CLIP):
    from parallel.mesh import Mesh
    from parallel.offload import StoreFullError
    g = Mesh(dp=world).group("dp")
    ref = reference_losses("gpt", "adamw", 6, G, clip) if rank == 0 else None
    zero, model = _zero(g, stage, _cfg(path, "nvme", params), clip=clip)
    losses = train(zero, model, g, G, 3)[0]
    full = _FullDisk()
    store = (zero._par_off if params == "nvme" else zero._opt_off).store
    store._io.pwrite = full
    with zero.gathered():
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_before = zero.full_state_dict()
    full.armed = rank == 1                                  # only rank 1's disk is full
    err = None
    try:
        train(zero, model, g, G, 1, start=3)
    except StoreFullError as e:
        err = str(e)
    full.armed = False
    with zero.gathered():
        same = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    state_after = zero.full_state_dict()
    same_state = all(torch.equal(state_after["params"][n], v) for n, v in state_before["params"].items()) and \
        all(torch.equal(state_after["state"][n][k], v[k]) for n, v in state_before["state"].items()
            for k in ("exp_avg", "exp_avg_sq")) and state_after["steps"] == state_before["steps"]
    losses += train(zero, model, g, G, 3, start=3)[0]       # the same batch again, and on
    zero.close()
    return ref, losses, err, same, same_state


@pytest.mark.parametrize("stage,params,clip", [(2, "none", CLIP), (3, "nvme", CLIP), (3, "cpu", CLIP),
                                               (3, "nvme", None)])
def test_full_disk_mid_step_rolls_back_on_every_rank(tmp_path, stage, params, clip):
    """clip=None: the update overlaps backward, so the disk fills inside backward; the same rollback."""
    res = run_ranks(_full_disk, 2, str(tmp_path), stage, params, clip)
    for _, _, err, same, same_state in res:
        assert err is not None and "rolled back on every dp rank" in err and "nvme_path" in err, err
        assert same and same_state
    assert "No space left" in res[1][2] and "another dp rank" in res[0][2]
    assert_curve(mean_over_ranks(res, key=1), res[0][0], RTOL, f"stage {stage} after a rolled-back step")


def test_store_transactions_are_all_or_nothing(tmp_path):
    from parallel.offload import NvmeStore, StoreError, StoreFullError
    full = _FullDisk()
    s = NvmeStore(str(tmp_path), buffer_count=4, buffer_bytes=16 << 10, chunk_bytes=8 << 10, pwrite=full)
    old = {k: torch.full((1000,), float(i)) for i, k in enumerate("abc")}
    for k, v in old.items():
        s.put(k, v)
    s.flush()
    s.begin()
    s.put("a", old["a"] + 10)
    s.put("b", old["b"] + 10)
    with pytest.raises(StoreError, match="readable after commit"):
        s.get("a")                                         # not resident, not committed: refused
    s.prepare()
    s.abort()
    assert all(torch.equal(s.get(k, out=torch.empty(1000)), v) for k, v in old.items())
    s.begin()
    s.put("a", old["a"] + 20)
    full.armed = True                                      # the next write hits a full disk
    s.put("b", old["b"] + 20)
    with pytest.raises(StoreFullError, match="transaction failed"):
        s.prepare()
    s.abort()                                              # "a" landed but is rolled back with "b"
    full.armed = False
    assert all(torch.equal(s.get(k, out=torch.empty(1000)), v) for k, v in old.items())
    s.begin()
    s.put("a", old["a"] + 30)
    s.put("c", old["c"] + 30)
    s.commit()
    assert torch.equal(s.get("a"), old["a"] + 30) and torch.equal(s.get("c"), old["c"] + 30)
    assert s.stats["buffers_in_use"] == 2
    s.close()


# --- configuration errors, before any state is written ------------------------------------------------

def _solo():
    from parallel.comm import Group
    return Group(None, "dp", (0,), 0)


def test_bad_offload_configs_fail_before_training(tmp_path, monkeypatch):
    from parallel.offload import StoreConfigError, aio
    g, p = _solo(), str(tmp_path)
    with pytest.raises(StoreConfigError, match="nvme_path is not set"):
        _zero(g, 2, _cfg(None, "nvme"))
    with pytest.raises(StoreConfigError, match="does not exist.*mkdir -p"):
        _zero(g, 2, _cfg(str(tmp_path / "missing"), "nvme"))
    with pytest.raises(StoreConfigError, match="optimizer is SGD.*optimizer.name=adamw"):
        _zero(g, 2, _cfg(p, "cpu"), opt="sgd")
    with pytest.raises(StoreConfigError, match="params=cpu needs zero.stage=3"):
        _zero(g, 2, _cfg(p, "cpu", "cpu"))
    with pytest.raises(StoreConfigError, match="params=nvme needs zero.offload.optimizer=nvme"):
        _zero(g, 3, _cfg(p, "cpu", "nvme"))
    with pytest.raises(StoreConfigError, match="prefetch_depth=4 needs buffer_count >= 5"):
        _zero(g, 2, _cfg(p, "cpu", prefetch_depth=4))
    with pytest.raises(StoreConfigError, match="zero.offload.optimizer='disk'"):
        _zero(g, 2, _cfg(p, "disk"))
    from parallel.zero import ZeroOptimizer
    with pytest.raises(StoreConfigError, match=r"Adam options \['amsgrad'\]"):
        ZeroOptimizer(make_model("gpt"), lambda ps: torch.optim.AdamW(ps, amsgrad=True), g,
                      ZeroConfig(stage=2, offload=_cfg(p, "cpu")))
    real = aio.shutil.disk_usage
    monkeypatch.setattr(aio.shutil, "disk_usage", lambda path: real(path)._replace(free=100_000))
    with pytest.raises(StoreConfigError, match=r"free but the store needs"):
        _zero(g, 2, _cfg(p, "nvme"))                       # too little disk: refused up front
    monkeypatch.undo()
    assert not [f for f in os.listdir(p) if f.endswith(".bin")]      # nothing left behind
    zero, _ = _zero(g, 2, _cfg(p, "cpu"))
    with pytest.raises(RuntimeError, match="materialized"):
        _ = zero._pieces                                    # checkpoint code must materialise first
    with zero.materialized():
        assert len(zero._pieces) == len(zero.optimizer.param_groups[0]["params"])


# --- checkpoints of offloaded state; stage 3 built on the meta device ---------------------------------

def _state(rank, world, path):
    from examples.gpt import GPT, Block
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer, deferred_init
    from parallel.zero.param_offload import ParamOffload
    g = Mesh(dp=world).group("dp")
    ref = reference_losses("gpt", "adamw", 7, G, CLIP) if rank == 0 else None
    plain, pm = _zero(g, 2)
    train(plain, pm, g, G, 4)
    want = plain.full_state_dict()
    zero, model = _zero(g, 2, _cfg(path, "nvme"))
    train(zero, model, g, G, 4)
    full, part = zero.full_state_dict(), zero.state_dict()
    # a partitioned round trip into a differently seeded offloaded replica, then on for 3 steps
    z2, m2 = _zero(g, 2, _cfg(path, "cpu"))
    z2.load_state_dict(part)
    cont = train(z2, m2, g, G, 3, start=4)[0]
    # stage 3 from a meta-built model, straight into the stores: one unit's shard in memory at a time
    alive = []
    add = ParamOffload.add

    def spy(self, u):
        alive.append(sum(b.shard_param.untyped_storage().nbytes() > 64 for b in self.keys if b.shard_param is not None))
        return add(self, u)
    ParamOffload.add = spy
    try:
        torch.manual_seed(0)
        meta, rec = deferred_init(GPT, vocab_size=64, seq_len=16, n_layer=2, n_head=4, n_embd=32)
        z3 = ZeroOptimizer(meta, OPTS["adamw"], g,
                           ZeroConfig(stage=3, bucket_mb=0.05, offload=_cfg(path, "nvme", "nvme")),
                           grad_clip=CLIP, init=rec, unit_types=(Block,))
    finally:
        ParamOffload.add = add
    z3.load_full_state_dict(full)
    cont3 = train(z3, meta, g, G, 3, start=4)[0]
    for z in (zero, z2, z3):
        z.close()
    return ref, want, full, cont, cont3, alive


def test_checkpoints_of_offloaded_state_and_meta_init(tmp_path):
    res = run_ranks(_state, 2, str(tmp_path))
    ref, want, full = res[0][0], res[0][1], res[0][2]
    # test_zero's tolerances: the CPU kernel is chosen by speed and torch's fused AdamW can differ from
    # the single-tensor one in a parameter's last bit; the attention k-bias has an exactly-zero gradient,
    # whose rounding noise Adam normalises into steps of up to lr (so params get atol 5e-5).
    for name, p in want["params"].items():
        assert torch.allclose(full["params"][name], p, rtol=1e-4, atol=5e-5), name
        for k, atol in (("exp_avg", 1e-7), ("exp_avg_sq", 1e-10)):
            assert torch.allclose(full["state"][name][k], want["state"][name][k], rtol=1e-3, atol=atol), (name, k)
        assert float(full["state"][name]["step"]) == 4.0
    assert full["steps"] == 4
    assert_curve(mean_over_ranks(res, key=3), ref[4:], RTOL, "partitioned round trip, offloaded")
    assert_curve(mean_over_ranks(res, key=4), ref[4:], RTOL, "full state into stage 3 built on meta, offloaded")
    for r in res:
        assert r[5] and max(r[5]) <= 1, r[5]          # each unit written and dropped before the next is built


# --- through the engine config -------------------------------------------------------------------------

def _engine(rank, world, path):
    from engine_cases import train as engine_train
    off = ["zero.offload.optimizer=nvme", "zero.offload.params=nvme", f"zero.offload.nvme_path={path}",
           "zero.offload.buffer_mb=0.05", "train.steps=6"]
    a = engine_train(rank, world, "gpt", ["parallel.dp=2", "zero.stage=3", "train.steps=6"])[0]
    losses, engine = engine_train(rank, world, "gpt", ["parallel.dp=2", "zero.stage=3"] + off)
    stats = engine.zero.offload_stats()
    engine.zero.close()
    return a, losses, stats["optimizer"]["medium"], stats["params"]["stats"]["reads"]


def test_engine_passes_zero_offload_config(tmp_path):
    res = run_ranks(_engine, 2, str(tmp_path))
    for plain, off, medium, reads in res:
        assert_curve(off, plain, RTOL, "engine zero-3 with optimizer+params on nvme")
        assert medium == "nvme" and reads > 0
