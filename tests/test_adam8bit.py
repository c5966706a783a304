"""8-bit Adam moments (parallel/optim/adam8bit.py; arXiv 2110.02861): the dynamic maps, the block-wise
quantizer (idempotent on its own output, so checkpoints holding fp32 moments resume exactly), the
moments' bytes per rank ÷ 3.94 under ZeRO 0–3 at dp=2 (asserted from model_state_bytes, exact
formula), checkpoint round trips (partitioned 8-bit, full fp32) bit-exact, and on the char LM (seed 0)
the loss within 1% of fp32 moments (slow)."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_ranks

from parallel.optim.adam8bit import Adam8bit, dequantize, dynamic_map, quantize


def test_maps_and_quantizer():
    s, u = dynamic_map(True), dynamic_map(False)
    assert s.numel() == u.numel() == 256 and bool((s[1:] > s[:-1]).all()) and bool((u[1:] > u[:-1]).all())
    assert (float(s[0]), float(s[-1]), float(u[0]), float(u[-1])) == pytest.approx((-0.99297, 1.0, 0.0, 1.0), abs=1e-4)
    torch.manual_seed(0)
    x = torch.randn(1000) * torch.logspace(-4, 0, 1000)            # seven decades: the dynamic type's case
    for signed, v in ((True, x), (False, x * x)):
        q, sc = quantize(v, signed)
        assert q.dtype == torch.uint8 and q.numel() == 1000 and sc.numel() == 4     # ⌈1000/256⌉ scales
        d = dequantize(q, sc, signed)
        m = dynamic_map(signed)
        half_gap = float((m[1:] - m[:-1]).max()) / 2                     # nearest code: within half a gap
        err = (torch.nn.functional.pad(d - v, (0, 24)).view(-1, 256).abs() / sc.abs().unsqueeze(1)).max()
        assert float(err) <= half_gap + 1e-6 and half_gap < (0.0036 if not signed else 0.0071)
        top = v.abs() >= 0.1 * sc.abs().repeat_interleave(256)[:1000]   # the top decade of each block
        assert ((d - v).abs()[top] / v.abs()[top]).max() < (0.036 if not signed else 0.071)
        if not signed:
            assert bool((d >= 0).all())
        q2, sc2 = quantize(d, signed)
        assert torch.equal(q2, q) and torch.equal(dequantize(q2, sc2, signed), d)   # idempotent


def test_table_codes_equal_bucketize():
    """quantize's table lookup (adam8bit._codes) = torch.bucketize on every float32 bin, the midpoints and
    their neighbours, and seven decades of random values."""
    from parallel.optim.adam8bit import _MAPS, _MIDS, _codes
    torch.manual_seed(0)
    top = torch.arange(1 << 16, dtype=torch.int64) << 16
    for signed in (True, False):
        m = _MIDS[signed]
        bins = (top | torch.randint(0, 1 << 16, (1 << 16,))).sub_((top >= 1 << 31).long() << 32)
        bins = bins.to(torch.int32).view(torch.float32)
        x = torch.randn(1 << 16) * torch.logspace(-9, 0, 1 << 16)
        edge = torch.cat([m, torch.nextafter(m, m + 1), torch.nextafter(m, m - 1), _MAPS[signed], bins,
                          x / x.abs().max(), torch.tensor([0.0, -0.0, 1e-45, -1e-45])])
        edge = edge[torch.isfinite(edge) & (edge.abs() <= 1) & ((edge >= 0) | signed)]
        assert torch.equal(_codes(edge, signed), torch.bucketize(edge, m).to(torch.uint8))


@pytest.mark.slow
def test_one_process_tracks_adamw():
    torch.manual_seed(0)
    a = nn.Linear(64, 32)
    b = nn.Linear(64, 32)
    b.load_state_dict(a.state_dict())
    w0 = a.weight.detach().clone()
    oa = torch.optim.AdamW(a.parameters(), lr=1e-2)
    ob = Adam8bit(b.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(10):
        x = torch.randn(16, 64)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    diff = (a.weight - b.weight).abs().max().item()
    moved = (a.weight - w0).abs().max().item()
    assert 0 < diff < 0.1 * moved, (diff, moved)      # quantized, so not equal; within 10% of how far AdamW went


def _zero(stage, g, name):
    from parallel.config import ZeroConfig
    from parallel.zero import ZeroOptimizer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16))
    f = {"fp32": lambda ps: torch.optim.AdamW(ps, lr=1e-2), "int8": lambda ps: Adam8bit(ps, lr=1e-2)}[name]
    return model, ZeroOptimizer(model, f, g, ZeroConfig(stage=stage, bucket_mb=0.002))


def _train(model, zero, g, lo, hi):
    out = []
    for t in range(lo, hi):
        gen = torch.Generator().manual_seed(t)
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
        x, y = x[4 * g.rank:4 * g.rank + 4], y[4 * g.rank:4 * g.rank + 4]
        zero.zero_grad()
        zero.prepare_step(1)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        zero.step()
        out.append(loss.item())
    return out


def _copy(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _stage_run(rank, world, stage):
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    res = {}
    for name in ("fp32", "int8"):
        model, zero = _zero(stage, g, name)
        res[name] = _train(model, zero, g, 0, 3)
        res[name + "_bytes"] = zero.model_state_bytes()["optimizer"]
    res["pieces"] = [v.numel() for *_, v in zero._piece_list]
    part, full = _copy(zero.state_dict()), _copy(zero.full_state_dict())
    assert full["state"] and next(iter(full["state"].values()))["exp_avg"].dtype == torch.float32
    res["tail"] = _train(model, zero, g, 3, 6)
    for sd, load in ((part, "load_state_dict"), (full, "load_full_state_dict")):
        m2, z2 = _zero(stage, g, "int8")
        getattr(z2, load)(sd)
        res[load] = _train(m2, z2, g, 3, 6)
    return res


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_dp2_zero_state_bytes_and_resume(stage):
    for r in run_ranks(_stage_run, 2, stage):
        steps = 4 * len(r["pieces"])                                    # one fp32 0-dim step per piece
        moments8 = sum(2 * (n + 4 * -(-n // 256)) for n in r["pieces"])
        assert r["int8_bytes"] == moments8 + steps
        assert r["fp32_bytes"] == sum(8 * n for n in r["pieces"]) + steps
        assert (r["fp32_bytes"] - steps) / moments8 >= 3.9               # ÷ 3.94 (1 byte + a 4-byte scale per 256)
        assert r["int8"] != r["fp32"] and r["int8"][-1] == pytest.approx(r["fp32"][-1], rel=0.05)
        assert r["load_state_dict"] == r["tail"] and r["load_full_state_dict"] == r["tail"]


def _lm(rank, world, name, stage, steps, nvme_path=None):
    """Mean dp loss per step of the char GPT at dp = world, ZeRO ``stage``, Adam with fp32 or int8 moments (with
    ``nvme_path``: the optimizer offloaded to NVMe there — tests/test_offload_int8.py)."""
    from examples.gpt import GPT, char_dataset
    from parallel.config import OffloadConfig, ZeroConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    g = Mesh(dp=world).group("dp")
    data = char_dataset(seq_len=32)
    torch.manual_seed(0)
    model = GPT(vocab_size=96, seq_len=32, n_layer=2, n_head=4, n_embd=32)
    f = {"fp32": lambda ps: torch.optim.Adam(ps, lr=3e-3),
         "int8": lambda ps: Adam8bit(ps, lr=3e-3, decoupled=False)}[name]
    off = OffloadConfig(optimizer="nvme", nvme_path=nvme_path, buffer_mb=0.25) if nvme_path else OffloadConfig()
    zero = ZeroOptimizer(model, f, g, ZeroConfig(stage=stage, bucket_mb=1.0, offload=off))
    per, G, losses = 16 // world, 16, []
    for t in range(steps):
        idx = range(t * G + rank * per, t * G + (rank + 1) * per)
        x = torch.stack([data[i][0] for i in idx])
        y = torch.stack([data[i][1] for i in idx])
        zero.zero_grad()
        zero.prepare_step(1)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        zero.step()
        t_loss = torch.tensor([loss.item()])
        torch.distributed.all_reduce(t_loss)
        losses.append(t_loss.item() / world)
    zero.close()
    return losses


@pytest.mark.slow
def test_char_lm_loss_within_1pct_of_fp32_moments():
    steps = 100
    a = run_ranks(_lm, 2, "fp32", 2, steps)[0]
    q = run_ranks(_lm, 2, "int8", 2, steps)[0]
    ma, mq = sum(a[-5:]) / 5, sum(q[-5:]) / 5
    print(f"\n8-bit moments, char GPT dp=2 ZeRO-2 seed 0: loss (mean of steps {steps - 4}-{steps}) fp32 {ma:.4f}, "
          f"int8 {mq:.4f} ({(mq - ma) / ma:+.2%}); first {a[0]:.4f}")
    assert abs(mq - ma) <= 0.01 * ma and ma < 0.8 * a[0]


def test_config_key_and_refusals():
    from parallel.config import ConfigError, load_config
    from parallel.optim.factory import optimizer_factory
    base = {"model": {"factory": "examples.gpt:build", "kwargs": {"vocab_size": 64, "seq_len": 16, "n_layer": 2,
                                                                  "n_head": 4, "n_embd": 32}},
            "data": {"factory": "examples.gpt:random_tokens", "kwargs": {"n": 64, "seq_len": 16, "vocab_size": 64},
                     "global_batch_size": 8, "micro_batch_size": 2}, "optimizer": {"name": "adamw", "lr": 0.003}}
    f = optimizer_factory(load_config(data=base, overrides=["optimizer.state_dtype=int8"]).validate(1).optimizer)
    assert f.cls is Adam8bit and f.kwargs == {"lr": 0.003, "decoupled": True, "weight_decay": 0.01}   # AdamW's
    g = optimizer_factory(load_config(data=base, overrides=["optimizer.state_dtype=int8", "optimizer.name=adam"])
                          .validate(1).optimizer)
    assert g.kwargs == {"lr": 0.003, "decoupled": False}
    for over, msg in ((["optimizer.state_dtype=int4"], "must be fp32 or int8"),
                      (["optimizer.state_dtype=int8", "optimizer.name=lamb"], "applies to adam/adamw")):
        with pytest.raises(ConfigError, match=msg):
            load_config(data=base, overrides=over).validate(1)
