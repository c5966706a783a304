"""ZeRO stages 0–3 on gloo CPU ranks: exactness against one process, the memory and wire-byte
formulas of DESIGN.md, the global grad-norm rules, partitioned/full state dicts, meta-device init.

Every multi-rank body builds its single-process reference on rank 0 from the same seed. fp32
losses must match to RTOL = 1e-4 relative (measured: ~2e-7).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_ranks

from parallel.config import ZeroConfig
from parallel.parameters import param_info

RTOL = 1e-4
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
OPTS = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9)}
CLIP = 0.5          # the grad norm of these runs is 0.3–1.5: clipping is active on most steps


# --- shared helpers (also imported by test_precision / test_data_parallel) ------------------------

def make_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind in ("gpt", "gpt_untied"):
        from examples.gpt import GPT
        return GPT(vocab_size=64, seq_len=16, n_layer=2, n_head=4, n_embd=32, tie=kind == "gpt")
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**LLAMA))


def loss_of(model, x, y):
    out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(out.float().flatten(0, 1), y.flatten())


def global_batch(t: int, G: int, steps: int = 40):
    from examples.gpt import random_tokens
    data = random_tokens(n=steps * G, seq_len=16)
    xs, ys = zip(*[data[i] for i in range(t * G, (t + 1) * G)])
    return torch.stack(xs), torch.stack(ys)


_REF_CACHE: dict = {}


def reference_losses(kind, opt, steps, G, clip=None):
    """reference_run's losses, cached per rank process (the pool outlives tests)."""
    key = (kind, opt, steps, G, clip)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = reference_run(kind, opt, steps, G, clip)[0]
    return _REF_CACHE[key]


def reference_run(kind, opt, steps, G, clip=None, model=None):
    """The plain PyTorch loop: whole global batch in one forward, mean loss, torch optimizer (on ``model``, or
    ``make_model(kind)``)."""
    model = make_model(kind) if model is None else model
    o = OPTS[opt](list(model.parameters()))
    losses = []
    for t in range(steps):
        x, y = global_batch(t, G)
        o.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        o.step()
        losses.append(loss.item())
    return losses, model, o


def train(zero, model, group, G, steps, m=1, start=0):
    """This dp rank's share of each global batch in m micro-batches; returns (local losses, norms)."""
    N, r = group.size, group.rank
    per = G // N
    mb = per // m
    losses, norms = [], []
    for t in range(start, start + steps):
        x, y = global_batch(t, G)
        x, y = x[r * per:(r + 1) * per], y[r * per:(r + 1) * per]
        zero.zero_grad()
        zero.prepare_step(m)
        tot = 0.0
        for j in range(m):
            loss = loss_of(model, x[j * mb:(j + 1) * mb], y[j * mb:(j + 1) * mb]) / m
            (loss * zero.loss_scale).backward()
            tot += loss.item()
        norms.append(zero.step().grad_norm)
        losses.append(tot)
    return losses, norms


def block_type(kind):
    """The transformer block class: stage 3 units per block (as FSDP wraps them), not per Linear."""
    if kind.startswith("gpt"):
        from examples.gpt import Block
        return Block
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    return LlamaDecoderLayer


def zero_run(group, kind, opt, steps, G, stage, m=1, clip=None, precision="fp32", bucket_mb=0.05,
             units="leaf", prefetch=True, keep=2, **kw):
    from parallel.zero import ZeroOptimizer
    model = make_model(kind)
    if units == "block":
        kw["unit_types"] = (block_type(kind),)
    zero = ZeroOptimizer(model, OPTS[opt], group, ZeroConfig(stage=stage, bucket_mb=bucket_mb, prefetch=prefetch,
                                                          keep_after_forward=keep),
                         precision=precision, grad_clip=clip, **kw)
    losses, norms = train(zero, model, group, G, steps, m)
    return losses, norms, zero, model


def mean_over_ranks(results, key=0):
    """Average each rank's local mean losses: equal shares, so this is the global-batch mean."""
    curves = [r[key] for r in results]
    return [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]


def assert_curve(got, want, rtol, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= rtol * abs(w), f"{what}: step {i}: loss {g!r} vs reference {w!r} (rtol {rtol})"


# --- exactness --------------------------------------------------------------------------------------

# (optimizer, micro-batches per rank, clip, stage-3 units)
CONFIGS = [("adamw", 1, None, "leaf"), ("adamw", 2, CLIP, "block"), ("sgd", 1, None, "block"),
           ("sgd", 2, CLIP, "leaf")]


def _exact(rank, world, kind, stage_cfgs, steps, G):
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    out = []
    for stage, opt, m, clip, units in stage_cfgs:
        ref = reference_losses(kind, opt, steps, G, clip) if rank == 0 else None
        losses, norms, zero, _ = zero_run(g, kind, opt, steps, G, stage, m, clip, units=units)
        out.append((ref, losses, norms, dict(zero.reducer.launches), len(zero.buckets), zero.reducer.max_waiting))
    return out


def _check_exact(res, cfgs, what):
    for i, (stage, opt, m, clip, units) in enumerate(cfgs):
        ref = res[0][i][0]
        got = mean_over_ranks([r[i] for r in res], key=1)
        assert_curve(got, ref, RTOL, f"{what} stage {stage} {opt} m={m} clip={clip} units={units}")
        if clip:                                 # the clipping branch really ran
            assert sum(n > clip for n in res[0][i][2]) >= 3
        for r in res:                            # every rank agrees on the global grad norm
            assert r[i][2] == pytest.approx(res[0][i][2], rel=1e-6)
            # every bucket went out from a hook, none waited behind another (launch order = completion order)
            assert r[i][3] == {"hooks": r[i][4], "finish": 0} and r[i][5] == 0, (stage, opt, units, r[i][3:])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_exact_gpt_dp2(stage):
    cfgs = [(stage, *c) for c in CONFIGS]
    _check_exact(run_ranks(_exact, 2, "gpt", cfgs, 20, 8), cfgs, "gpt dp=2")


def test_exact_gpt_dp4():
    cfgs = [(s, "adamw", 2, CLIP, "block" if s == 3 else "leaf") for s in range(4)]
    _check_exact(run_ranks(_exact, 4, "gpt", cfgs, 20, 16), cfgs, "gpt dp=4")


def test_exact_llama_dp2():
    cfgs = [(s, "adamw", 2, CLIP, "leaf") for s in range(4)] + [(2, "sgd", 1, None, "leaf"),
                                                                (3, "sgd", 2, CLIP, "block")]
    _check_exact(run_ranks(_exact, 2, "llama", cfgs, 20, 8), cfgs, "llama dp=2")


def _overlap(rank, world, stage):
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    ref = reference_losses("gpt", "adamw", 20, 8, CLIP) if rank == 0 else None
    losses, _, zero, _ = zero_run(g, "gpt", "adamw", 20, 8, stage, 2, CLIP, overlap_param_gather=True)
    in_flight = len(zero._pending)                    # the last step's gathers were left running
    zero.wait_param_gather()
    return ref, losses, in_flight, len(zero.buckets)


@pytest.mark.parametrize("stage", [1, 2])
def test_overlapped_param_gather_is_exact(stage):
    res = run_ranks(_overlap, 2, stage)
    assert_curve(mean_over_ranks(res, key=1), res[0][0], RTOL, f"overlap_param_gather stage {stage}")
    assert all(r[2] == r[3] for r in res)


def _deferred(rank, world, stage):
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    g = Mesh(dp=world).group("dp")
    ref = reference_losses("gpt", "adamw", 5, 8, CLIP) if rank == 0 else None
    model = make_model("gpt")
    param_info(model.wte.weight).defer_reduce = True  # the tied embedding, as the pipeline marks it
    zero = ZeroOptimizer(model, OPTS["adamw"], g, ZeroConfig(stage=stage, bucket_mb=0.05), grad_clip=CLIP)
    zero.zero_grad()
    x, y = global_batch(0, 8)
    loss_of(model, x[rank * 4:rank * 4 + 4], y[rank * 4:rank * 4 + 4]).backward()
    held = float(model.wte.weight.grad.double().sum())   # the local gradient: not reduced from hooks
    before_finish = dict(zero.reducer.launches)
    zero.step()
    losses = train(zero, model, g, 8, 4, start=1)[0]
    return ref, losses, held, before_finish, dict(zero.reducer.launches), len(zero.buckets)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deferred_params_reduced_in_finish(stage):
    res = run_ranks(_deferred, 2, stage)
    ref = res[0][0]
    got = mean_over_ranks(res, key=1)
    assert_curve(got, ref[1:], RTOL, f"deferred stage {stage}")
    assert res[0][2] != res[1][2]                             # each rank still held its own gradient
    for _, _, _held, before, after, nb in res:
        assert before == {"hooks": nb, "finish": 0}          # every normal bucket from a hook
        assert after == {"hooks": nb, "finish": 1}            # the deferred bucket in finish, once


# --- memory and communication ----------------------------------------------------------------------

def expected_bytes(stage, precision, N):
    """Bytes per parameter per rank: (params, grads, master, optimizer) for Adam."""
    b = 4 if precision == "fp32" else 2
    master = 0 if precision == "fp32" else 4
    return {"params": b if stage < 3 else b / N, "grads": b if stage < 2 else b / N,
            "master": master if stage == 0 else master / N, "optimizer": 8 if stage == 0 else 8 / N}


def design_total(stage, precision, N):
    """DESIGN.md's formulas, written out independently of expected_bytes."""
    if precision == "fp32":
        return [16, 8 + 8 / N, 4 + 12 / N, 16 / N][stage]
    K = 12
    return [(2 + 2 + K), 4 + K / N, 2 + (2 + K) / N, (2 + 2 + K) / N][stage]


def _mem_comm(rank, world, precisions):
    from parallel.mesh import Mesh
    mesh = Mesh(dp=world)
    g = mesh.group("dp")
    out = {}
    for prec in precisions:
        for stage in range(4):
            for prefetch in ([True, False] if stage == 3 else [True]):
                # two warm-up steps: the first traces stage 3's module order and ends by agreeing on the
                # buckets' launch order (a broadcast and an all-reduce of a few bytes)
                # keep=0: DESIGN's 3(N−1)/N·Ψ·b; the kept units' saving is tests/test_zero3_keep.py's
                _, _, zero, model = zero_run(g, "gpt_untied", "adamw", 2, 4 * world, stage, precision=prec,
                                             prefetch=prefetch, keep=0)
                m = 1 if stage == 3 else 2                 # stages 0-2: accumulation adds no traffic
                before = mesh.stats.snapshot()
                train(zero, model, g, 4 * world, 1, m=m, start=2)
                comm = mesh.stats.diff(mesh.stats.snapshot(), before).get("dp", {})
                units = sorted(b.padded * b.flat_param.element_size() for b in zero.buckets)
                out[(prec, stage, prefetch)] = dict(
                    mem=zero.model_state_bytes(), psi=zero.num_params, comm=comm, nb=len(zero.buckets),
                    padded=sum(b.padded for b in zero._all), peak=zero.peak_gathered_bytes, units=units)
    return out


@pytest.mark.parametrize("world,precisions", [(2, ("fp32", "bf16")), (4, ("fp32",))])
def test_memory_and_wire_bytes_match_formulas(world, precisions):
    res = run_ranks(_mem_comm, world, precisions)
    N = world
    for r in res:
        for (prec, stage, prefetch), v in r.items():
            psi, mem, comm = v["psi"], v["mem"], v["comm"]
            what = f"{prec} stage {stage} N={N}"
            for k, per in expected_bytes(stage, prec, N).items():        # memory: each part within 2%
                assert abs(mem[k] - per * psi) <= 0.02 * per * psi, f"{what}: {k} {mem[k]} vs {per}Ψ={per * psi}"
            assert mem["total"] == pytest.approx(design_total(stage, prec, N) * psi, rel=0.02), what
            b = 4 if prec == "fp32" else 2
            factor = 3 if stage == 3 else 2
            wire = sum(c["wire_bytes"] for c in comm.values())
            # Counting: padded flat buffers go on the wire (≤ N-1 elements per bucket), plus one 32-byte
            # norm all-reduce for stages 1-3; both are inside the 1%.
            assert wire == pytest.approx(factor * (N - 1) / N * psi * b, rel=0.01), f"{what}: wire {wire}"
            nb = v["nb"]
            if stage == 0:
                assert comm["all_reduce"]["calls"] == nb and set(comm) == {"all_reduce"}
            elif stage < 3:
                assert comm["reduce_scatter"]["calls"] == nb and comm["all_gather"]["calls"] == nb
                assert comm["reduce_scatter"]["payload_bytes"] == v["padded"] * b
            else:
                assert comm["reduce_scatter"]["calls"] == nb and comm["all_gather"]["calls"] == 2 * nb
            if stage == 3:          # transient gathered params: one module's worth, two with prefetch
                u = v["units"]
                assert u[-1] <= v["peak"] <= (u[-1] + u[-2] if prefetch else u[-1]), (prefetch, v["peak"], u[-3:])
            else:
                assert v["peak"] == 0


# --- global grad norm over dp partitions and norm groups --------------------------------------------

class _Toy(nn.Module):
    def __init__(self, tp_rank):
        super().__init__()
        self.a = nn.Parameter(torch.arange(6.0) + 10 * tp_rank)   # tp shard: distinct per tp rank
        self.b = nn.Parameter(torch.ones(4))                        # replicated over tp
        self.c = nn.Parameter(torch.ones(3))                        # a pp duplicate: not counted
        param_info(self.a).tp_dim = 0
        param_info(self.c).pp_duplicate = True

    def forward(self, xa, xb, xc):
        return (self.a * xa).sum() + (self.b * xb).sum() + (self.c * xc).sum()


def _norm_rule(rank, world, stage, clip):
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    mesh = Mesh(dp=2, tp=2)
    dp, tp = mesh.coord["dp"], mesh.coord["tp"]
    model = _Toy(tp)
    zero = ZeroOptimizer(model, lambda ps: torch.optim.SGD(ps, lr=1.0), mesh.group("dp"),
                         ZeroConfig(stage=stage, bucket_mb=1e-5), grad_clip=clip, norm_groups=[mesh.group("tp")])
    xa = torch.arange(6.0) * (dp + 1) + tp          # grad of a on this rank
    xb = torch.full((4,), 2.0 * (dp + 1))           # same on both tp ranks
    xc = torch.full((3,), 100.0)
    zero.zero_grad()
    model(xa, xb, xc).backward()
    res = zero.step()
    new = zero.full_state_dict()["params"]
    return tp, res.grad_norm, {k: v.tolist() for k, v in new.items()}


@pytest.mark.parametrize("stage,clip", [(0, None), (1, 1.0), (2, None), (3, 1.0)])
def test_grad_norm_over_dp_partitions_and_tp(stage, clip):
    res = run_ranks(_norm_rule, 4, stage, clip)
    ga = {t: (torch.arange(6.0) * 1 + t + torch.arange(6.0) * 2 + t) / 2 for t in (0, 1)}   # dp mean
    gb = torch.full((4,), 3.0)
    want = math.sqrt(sum(float(g.pow(2).sum()) for g in ga.values()) + float(gb.pow(2).sum()))
    coef = min(1.0, clip / (want + 1e-6)) if clip else 1.0
    for tp, norm, new in res:
        assert norm == pytest.approx(want, rel=1e-6)
        a0 = torch.arange(6.0) + 10 * tp
        assert torch.allclose(torch.tensor(new["a"]), a0 - coef * ga[tp], rtol=1e-6)
        assert torch.allclose(torch.tensor(new["c"]), 1 - coef * torch.full((3,), 100.0), rtol=1e-6)


# --- state dicts: partitioned round trip, full (per name) against torch's own state, resharding -----

def _solo_group():
    from parallel.comm import Group
    return Group(None, "dp", (0,), 0)


def test_bad_inputs_raise_clear_errors():
    from examples.gpt import GPT
    from parallel.zero import ZeroOptimizer, deferred_init
    g = _solo_group()
    f = OPTS["adamw"]
    with pytest.raises(ValueError, match="zero.stage=4"):
        ZeroOptimizer(make_model("gpt"), f, g, ZeroConfig(stage=4))
    with pytest.raises(ValueError, match="precision='fp8'"):
        ZeroOptimizer(make_model("gpt"), f, g, precision="fp8")
    with pytest.raises(ValueError, match="bucket_mb"):
        ZeroOptimizer(make_model("gpt"), f, g, ZeroConfig(bucket_mb=0))
    with pytest.raises(ValueError, match="grad_clip"):
        ZeroOptimizer(make_model("gpt"), f, g, grad_clip=-1.0)
    with pytest.raises(TypeError, match="mesh.group"):
        ZeroOptimizer(make_model("gpt"), f, "dp")
    with pytest.raises(ValueError, match="exactly the tensors"):
        ZeroOptimizer(make_model("gpt"), lambda ps: torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1), g)
    meta, _ = deferred_init(GPT, vocab_size=64, seq_len=16, n_layer=1, n_head=4, n_embd=32)
    with pytest.raises(ValueError, match="deferred_init"):
        ZeroOptimizer(meta, f, g, ZeroConfig(stage=3))
    model = make_model("gpt")
    zero = ZeroOptimizer(model, f, g, ZeroConfig(stage=2, bucket_mb=0.05))
    with pytest.raises(ValueError, match="positive int"):
        zero.prepare_step(0)
    x, y = global_batch(0, 4)
    zero.zero_grad()
    loss_of(model, x, y).backward()
    with pytest.raises(RuntimeError, match="prepare_step"):
        loss_of(model, x, y).backward()                 # a second micro-batch nobody announced
    zero.zero_grad()
    loss_of(model, x, y).backward()
    zero.step()
    with pytest.raises(RuntimeError, match="zero_grad"):
        loss_of(model, x, y).backward()                 # next step without zero_grad()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_single_process_is_the_plain_loop(stage):
    ref = reference_run("gpt", "sgd", 4, 4, CLIP)[0]
    got = zero_run(_solo_group(), "gpt", "sgd", 4, 4, stage, m=2, clip=CLIP)[0]
    assert_curve(got, ref, RTOL, f"N=1 stage {stage}")
