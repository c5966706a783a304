"""8-bit Adam moments in the offload store (parallel/zero/offload_int8.py; arXiv 2110.02861) on gloo CPU ranks.

ZeRO with Adam8bit and the optimizer offloaded (cpu, nvme) updates bit for bit as ZeRO with Adam8bit in
memory (same blocks: cut at parameter pieces and at multiples of 256); the store keeps per owned element
4 bytes of master + 2 bytes of codes and 8 bytes of scales per 256-element block, so, with n = owned
elements and Σ over ZeRO's pieces (exact, from the partition, not from the store):

    moment bytes per rank      int8 Σ 2(n_p + 4⌈n_p/256⌉)   vs fp32 8n      (÷ 3.94)
    store bytes read = written per step   int8 4n + Σ 2(n_p + 4⌈n_p/256⌉)   vs fp32 12n

Checkpoints (partitioned and full) resume exactly, also from an 8-bit ZeRO run without offload; the loss
on the char LM (seed 0) stays within 1 % of fp32 offloaded moments (slow).
"""
import io

import pytest
import torch
from harness import run_ranks
from test_adam8bit import _lm as char_lm
from test_zero import global_batch, loss_of, make_model

from parallel.config import OffloadConfig, ZeroConfig
from parallel.optim.adam8bit import Adam8bit

BUF_MB = 0.01                     # 12 KiB buffers: ~2000-element 8-bit sub-groups, pieces cut inside
G, STEPS, MORE = 8, 3, 2
OPT = {"int8": lambda ps: Adam8bit(ps, lr=1e-2, weight_decay=0.1),
       "fp32": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)}
CASES = [(1, "cpu", "none"), (3, "nvme", "nvme")]


def _zero(g, stage, opt, path=None, medium="none", params="none"):
    from examples.gpt import Block
    from parallel.zero import ZeroOptimizer
    model = make_model("gpt")
    off = OffloadConfig(optimizer=medium, params=params, nvme_path=path, buffer_count=4, buffer_mb=BUF_MB,
                        prefetch_depth=1)
    kw = {"unit_types": (Block,)} if stage == 3 else {}
    return model, ZeroOptimizer(model, OPT[opt], g, ZeroConfig(stage=stage, bucket_mb=0.05, offload=off), **kw)


def _train(model, zero, g, lo, hi, io_log=None):
    per, out = G // g.size, []
    for t in range(lo, hi):
        x, y = global_batch(t, G)
        x, y = x[g.rank * per:(g.rank + 1) * per], y[g.rank * per:(g.rank + 1) * per]
        before = zero.offload_stats().get("optimizer", {}).get("stats")
        zero.zero_grad()
        zero.prepare_step(1)
        loss = loss_of(model, x, y)
        loss.backward()
        zero.step()
        out.append(loss.item())
        if io_log is not None:
            after = zero.offload_stats()["optimizer"]["stats"]
            io_log.append({k: after[k] - before[k] for k in ("bytes_read", "bytes_written", "disk_bytes_read",
                                                              "disk_bytes_written")})
    return out


def _copy(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _run(rank, world, path):
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    out = {}
    for stage, medium, params in CASES:
        res = {}
        model, plain = _zero(g, stage, "int8")
        res["plain"] = _train(model, plain, g, 0, STEPS)
        plain_sd = _copy(plain.state_dict())
        res["plain_tail"] = _train(model, plain, g, STEPS, STEPS + MORE)
        with plain.gathered():
            res["plain_params"] = _params(model)
        pieces = [e - a for b in plain._all for _, a, e in b.pieces()]
        res["want_moments"] = sum(2 * (n + 4 * -(-n // 256)) for n in pieces)
        res["n"] = sum(pieces)
        for opt in ("fp32", "int8"):
            model, zero = _zero(g, stage, opt, path, medium, params)
            log = []
            res[opt] = _train(model, zero, g, 0, STEPS, log)
            st = zero.offload_stats()["optimizer"]
            res[opt + "_io"], res[opt + "_bytes"] = log, (st["moment_bytes"], st["state_bytes"])
            res[opt + "_mem"] = zero.model_state_bytes()["optimizer"]
            if opt == "int8":
                part, full = _copy(zero.state_dict()), _copy(zero.full_state_dict())
                assert full["state"] and next(iter(full["state"].values()))["exp_avg"].dtype == torch.float32
                res["tail"] = _train(model, zero, g, STEPS, STEPS + MORE)
                with zero.gathered():
                    res["params"] = _params(model)
            zero.close()
        for sd, load in ((part, "load_state_dict"), (full, "load_full_state_dict"), (plain_sd, "load_state_dict")):
            model, zero = _zero(g, stage, "int8", path, medium, params)
            getattr(zero, load)(sd)
            res.setdefault("resumed", []).append(_train(model, zero, g, STEPS, STEPS + MORE))
            zero.close()
        out[(stage, medium, params)] = res
    return out


def test_int8_offload_equals_int8_zero_quarter_moments_exact_resume(tmp_path):
    for r in run_ranks(_run, 2, str(tmp_path)):
        for case, res in r.items():
            assert res["int8"] == res["plain"] and res["tail"] == res["plain_tail"], case     # bit for bit
            assert all(torch.equal(a, b) for a, b in zip(res["params"], res["plain_params"])), case
            assert res["int8"] != res["fp32"], case                                          # really quantized
            assert all(x == res["tail"] for x in res["resumed"]), (case, res["resumed"], res["tail"])
            n, m8 = res["n"], res["want_moments"]
            assert res["int8_bytes"] == (m8, 4 * n + m8) and res["fp32_bytes"] == (8 * n, 12 * n), case
            assert 8 * n / m8 >= 3.9, (case, 8 * n / m8)                                     # ÷ 3.94
            assert res["int8_mem"] == res["fp32_mem"] == 0, case        # nothing of it in memory
            for io8, io32 in zip(res["int8_io"], res["fp32_io"]):
                assert io8["bytes_read"] == io8["bytes_written"] == 4 * n + m8, (case, io8)
                assert io32["bytes_read"] == io32["bytes_written"] == 12 * n, (case, io32)
                if case[1] == "nvme":            # as issued to the disk: every sub-group rounded up to 4 KiB
                    assert io8["disk_bytes_read"] == io8["disk_bytes_written"] < 0.6 * io32["disk_bytes_read"], io8


@pytest.mark.slow
def test_char_lm_nvme_offload_int8_loss_within_1pct(tmp_path):
    steps = 100
    a = run_ranks(char_lm, 2, "fp32", 2, steps, str(tmp_path))[0]
    q = run_ranks(char_lm, 2, "int8", 2, steps, str(tmp_path))[0]
    ma, mq = sum(a[-5:]) / 5, sum(q[-5:]) / 5
    print(f"\n8-bit offloaded moments (nvme), char GPT dp=2 ZeRO-2 seed 0: loss (mean of steps {steps - 4}-{steps}) "
          f"fp32 {ma:.4f}, int8 {mq:.4f} ({(mq - ma) / ma:+.2%}); first {a[0]:.4f}")
    assert abs(mq - ma) <= 0.01 * ma and ma < 0.8 * a[0]


def _engine(rank, world, path):
    from engine_cases import train as engine_train
    losses, engine = engine_train(rank, world, "gpt", ENGINE + [f"zero.offload.nvme_path={path}"])
    st, mem = engine.zero.offload_stats()["optimizer"], engine.zero.model_state_bytes()
    engine.zero.close()
    return losses, st, mem


ENGINE = ["parallel.dp=2", "zero.stage=2", "train.steps=3", "optimizer.state_dtype=int8", "zero.offload.optimizer=nvme"]


def test_config_key_trains_through_the_engine_and_dry_run_preflight_count_it(tmp_path):
    from engine_cases import config

    from launch.dry_run import _meta_model, _mib, describe, planner_inputs
    from launch.preflight import offload_bytes
    from parallel.planning.planner import predict
    res = run_ranks(_engine, 2, str(tmp_path))
    planned = {}
    for dtype in ("int8", "fp32"):                     # what --dry-run prints (launch/dry_run.py)
        cfg = config("gpt", ENGINE + [f"zero.offload.nvme_path={tmp_path}", f"optimizer.state_dtype={dtype}"], 2)
        planned[dtype] = predict(*planner_inputs(cfg, _meta_model(cfg), "cpu")).memory
        planned[dtype + "_need"] = offload_bytes(cfg)
        text = describe(cfg)                            # the --dry-run text prints each rank's store
        assert all(f"offloaded to nvme {_mib(m['offload'])}" in text for m in planned[dtype].values()), text
    for rank, (losses, st, mem) in enumerate(res):       # (bit-equal to in-memory 8-bit: the test above)
        assert len(losses) == 3 and st["kernel"] == "adam8bit-blockwise", (losses, st["kernel"])
        p8, p32 = planned["int8"][rank], planned["fp32"][rank]
        assert p8["offload"] == st["state_bytes"], (p8, st)                # the planner's store = the measured one
        n = p32["offload"] // 12
        assert p8["offload"] - 4 * n == st["moment_bytes"] and 8 * n / st["moment_bytes"] >= 3.9, (n, st)
        assert p8["optimizer"] == p8["master"] == mem["optimizer"] == 0, (p8, mem)     # none of it on the device
    (psi, need32), (_, need8) = planned["fp32_need"], planned["int8_need"]      # pre-flight's nvme bound
    assert need32 == 24 * psi and need8 == int(2 * (6 + 8 / 256) * psi), (psi, need32, need8)


def _ckpt_run(rank, world, over, ck, resume):
    from engine_cases import train as engine_train
    over = over + ["optimizer.state_dtype=int8", f"train.checkpoint.dir={ck}", "train.checkpoint.every=3",
                   "train.steps=6", f"train.resume={str(resume).lower()}"]
    losses, engine = engine_train(rank, world, "gpt", over)
    if engine.zero._opt_off is not None:
        engine.zero.close()
    return losses, engine.step_count


@pytest.mark.slow
def test_engine_checkpoint_of_int8_offload_resumes_exactly(tmp_path):
    import os
    import shutil
    ck, store = str(tmp_path / "ck"), str(tmp_path / "store")
    os.makedirs(store)
    nvme = ["parallel.dp=2", "zero.stage=2", "zero.offload.optimizer=nvme", f"zero.offload.nvme_path={store}",
            "zero.offload.buffer_mb=0.02"]
    losses, _ = run_ranks(_ckpt_run, 2, nvme, ck, False)[0]
    for over in (nvme, ["parallel.dp=2", "zero.stage=1"], ["parallel.dp=2", "zero.stage=2",
                                                            "zero.offload.optimizer=cpu"]):
        shutil.rmtree(os.path.join(ck, "step_00000006"))          # resume from step 3
        got, step = run_ranks(_ckpt_run, 2, over, ck, True)[0]
        assert step == 6 and got == losses[3:], (over, got, losses)  # bit for bit, into any of them


def _full_disk(rank, world, path):
    from test_offload_zero import _FullDisk

    from parallel.mesh import Mesh
    from parallel.offload import StoreFullError
    g = Mesh(dp=world).group("dp")
    model, zero = _zero(g, 2, "int8", path, "nvme")
    want = _train(model, zero, g, 0, 5)
    zero.close()
    model, zero = _zero(g, 2, "int8", path, "nvme")
    losses = _train(model, zero, g, 0, 2)
    full = _FullDisk()
    zero._opt_off.store._io.pwrite = full
    before = zero.full_state_dict()
    full.armed = rank == 1                                  # only rank 1's disk is full, inside backward
    try:
        _train(model, zero, g, 2, 3)
        err = None
    except StoreFullError as e:
        err = str(e)
    full.armed = False
    after = zero.full_state_dict()
    same = all(torch.equal(after["params"][n], v) for n, v in before["params"].items()) and all(
        torch.equal(after["state"][n][k], v[k]) for n, v in before["state"].items() for k in ("exp_avg", "exp_avg_sq"))
    losses += _train(model, zero, g, 2, 5)
    zero.close()
    return want, losses, err, same


@pytest.mark.slow
def test_full_disk_rolls_back_int8_state_on_every_rank(tmp_path):
    for want, losses, err, same in run_ranks(_full_disk, 2, str(tmp_path)):
        assert err is not None and "rolled back on every dp rank" in err and same, err
        assert losses == want, (losses, want)               # the rolled-back step taken again: bit for bit
