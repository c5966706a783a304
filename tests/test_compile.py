"""compile.*: torch.compile per repeated block (parallel/compile.py, parallel/config/compile_keys.py).

The default suite uses backend aot_eager (AOTAutograd's forward/backward graphs run by eager kernels:
what compilation does to the semantics, without code generation); one inductor run is marked slow."""
import copy

import pytest
import torch
from harness import run_ranks

KW = dict(n_embd=32, n_layer=3, n_head=4, vocab_size=64, seq_len=16)
STEPS = 4


def _cfg(world, stage, compile_, precision="fp32", ac="none"):
    from parallel.config import load_config
    return load_config(data={
        "model": {"factory": "examples.gpt:build", "kwargs": KW},
        "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": 8, "micro_batch_size": 2,
                 "kwargs": {"n": 8, "seq_len": KW["seq_len"], "vocab_size": KW["vocab_size"]}},
        "parallel": {"dp": world}, "zero": stage if isinstance(stage, dict) else {"stage": stage},
        "precision": precision,
        "optimizer": {"name": "adamw", "lr": 1e-2}, "compile": compile_,
        "activation_checkpointing": {"policy": ac}}).validate(world)


def _train(rank, world, stage, compile_, precision="fp32", ac="none"):
    """Losses, full parameters after STEPS steps, and Dynamo's counts after the first and the last step."""
    from examples.gpt import GPT
    from parallel.compile import dynamo_counts, is_compiled
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    torch._dynamo.reset()                         # the pool's processes are reused: a clean cache; counts
    base = dynamo_counts()                        # are process-wide (reset keeps them): taken relative to here
    cfg = _cfg(world, stage, compile_, precision, ac)
    torch.manual_seed(0)
    eng = parallelize(GPT(**KW), cfg, Mesh(dp=world))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, KW["vocab_size"], (8, KW["seq_len"] + 1), generator=g)
    per = 8 // world
    mine = x[rank * per:(rank + 1) * per]                 # this dp rank's share of the global batch
    losses, counts = [], []
    for _ in range(STEPS):
        losses.append(eng.train_step((mine[:, :-1], mine[:, 1:])))
        counts.append({k: v - base[k] for k, v in dynamo_counts().items()})
    blocks = [is_compiled(b) for b in eng.module.blocks]
    if eng.activation is not None:                        # recomputes per block (activation checkpointing)
        blocks.append([r.recomputes for r in eng.activation.records])
    full = eng.full_state_dict()                          # collective: every rank calls it, rank 0 gets it
    params = {k: v.detach().float().clone() for k, v in full.items()} if full is not None else None
    return losses, params, (counts[0], counts[-1]), blocks


def _same(a, b, tol, ptol=None):
    (la, pa, _, _), (lb, pb, _, _) = a, b
    assert max(abs(x - y) for x, y in zip(la, lb)) <= tol, (la, lb)
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) <= (ptol or tol)


AOT = {"enabled": True, "backend": "aot_eager"}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_compiled_blocks_dp2_equal_one_process_compiled_and_eager_with_one_graph(stage):
    dp2 = run_ranks(_train, 2, stage, AOT)
    dp2_eager = run_ranks(_train, 2, stage, {"enabled": False})[0]
    one = run_ranks(_train, 1, 0, AOT)[0]
    eager = run_ranks(_train, 1, 0, {"enabled": False})[0]
    for r in dp2:
        assert r[3][:KW["n_layer"]] == [True] * KW["n_layer"]     # every block's forward goes through torch.compile
        first, last = r[2]
        assert first == {"frames": 1, "graphs": 1, "graph_breaks": 0}   # one graph serves all 3 blocks
        assert last == first                                   # no recompile, no graph break over the steps
    assert eager[3][:KW["n_layer"]] == [False] * KW["n_layer"] and eager[2][1]["frames"] == 0
    assert dp2[0][1] is not None and dp2[0][0][-1] < dp2[0][0][0] - 0.1        # it trains
    _same(dp2[0], dp2_eager, 1e-6)                             # compiled = eager in the same layout (aot_eager
    _same(one, eager, 1e-6)                                    # runs the same kernels)
    _same(dp2[0], one, 2e-6, 1e-4)                             # the layout: the dp reduction order differs, which
    #                                                            AdamW's g/√v amplifies where gradients are ~0


def test_compiled_bf16_zero1_equals_eager():
    comp = run_ranks(_train, 2, 1, AOT, "bf16")
    eager = run_ranks(_train, 2, 1, {"enabled": False}, "bf16")
    assert comp[0][2][1] == {"frames": 1, "graphs": 1, "graph_breaks": 0}
    _same(comp[0], eager[0], 1e-6)


@pytest.mark.parametrize("ac", ["full", "offload"])
def test_compiled_blocks_under_activation_checkpointing_equal_eager(ac):
    comp = run_ranks(_train, 2, 1, AOT, "fp32", ac)
    eager = run_ranks(_train, 2, 1, {"enabled": False}, "fp32", ac)
    assert comp[0][2][1] == {"frames": 1, "graphs": 1, "graph_breaks": 0}
    steps_x_micro = STEPS * 2                               # 2 micro-batches per rank and step
    assert comp[0][3][-1] == eager[0][3][-1] == [steps_x_micro if ac == "full" else 0] * KW["n_layer"]
    _same(comp[0], eager[0], 1e-6)


def _train_pp(rank, world, sched, compile_):
    from examples.gpt import GPT
    from parallel.compile import dynamo_counts
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    torch._dynamo.reset()
    kw = {**KW, "n_layer": 4}
    vs = 2 if sched == "interleaved" else 1
    cfg = load_config(data={"model": {"factory": "examples.gpt:build", "kwargs": kw}, "compile": compile_,
                            "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": 4,
                                     "micro_batch_size": 1},
                            "parallel": {"pp": world, "pp_schedule": sched, "pp_virtual_stages": vs},
                            "optimizer": {"name": "adamw", "lr": 1e-2}}).validate(world)
    torch.manual_seed(0)
    eng = parallelize(GPT(**kw), cfg, Mesh(pp=world))
    x = torch.randint(0, KW["vocab_size"], (4, KW["seq_len"] + 1), generator=torch.Generator().manual_seed(1))
    base = dynamo_counts()
    losses = [eng.train_step((x[:, :-1], x[:, 1:])) for _ in range(3)]
    counts = {k: v - base[k] for k, v in dynamo_counts().items()}
    full = eng.full_state_dict()
    return losses, {k: v.detach().float().clone() for k, v in full.items()} if full is not None else None, \
        (counts, counts), [eng.compiled is not None and len(eng.compiled.blocks)]


@pytest.mark.parametrize("sched", ["1f1b", "zero_bubble", "interleaved"])
def test_compiled_blocks_in_pipeline_stages_equal_one_process_eager(sched):
    pp2 = run_ranks(_train_pp, 2, sched, AOT)
    pp2_eager = run_ranks(_train_pp, 2, sched, {"enabled": False})[0]
    one = run_ranks(_train_pp, 1, "1f1b", {"enabled": False})[0]
    for r in pp2:
        assert r[3] == [2] and r[2][0] == {"frames": 1, "graphs": 1, "graph_breaks": 0}   # 2 of the 4 blocks each
    _same(pp2[0], pp2_eager, 1e-6)                  # compiled = eager in the same layout
    _same(pp2[0], one, 1e-6, 1e-4)                  # the layout: the tied embedding's gradient sums in another order


def test_compiled_blocks_with_optimizer_offload_equal_eager():
    zero = {"stage": 2, "offload": {"optimizer": "cpu"}}
    comp = run_ranks(_train, 2, zero, AOT)
    eager = run_ranks(_train, 2, zero, {"enabled": False})
    assert comp[0][2][1] == {"frames": 1, "graphs": 1, "graph_breaks": 0}
    _same(comp[0], eager[0], 1e-6)


@pytest.mark.slow
def test_inductor_blocks_equal_eager():
    """Inductor generates C++ kernels on CPU (minutes on two loaded cores): fused elementwise code rounds
    differently, so the tolerance is the fp32 reassociation one."""
    comp = run_ranks(_train, 1, 0, {"enabled": True, "backend": "inductor"})[0]
    eager = run_ranks(_train, 1, 0, {"enabled": False})[0]
    assert comp[2][1] == {"frames": 1, "graphs": 1, "graph_breaks": 0}
    _same(comp, eager, 1e-4)


def test_compiled_blocks_keep_names_and_a_deepcopy_runs_its_own_weights():
    from examples.gpt import GPT
    from parallel.compile import compile_blocks
    torch.manual_seed(0)
    m = GPT(**KW)
    keys = list(m.state_dict())
    cb = compile_blocks([m], "eager")
    assert list(m.state_dict()) == keys and len(cb.blocks) == KW["n_layer"]       # no _orig_mod. prefix
    c = copy.deepcopy(m)
    assert c.blocks[0].forward.__self__ is c.blocks[0]        # the copy's forward is bound to the copy
    with torch.no_grad():
        for p in c.parameters():
            p.add_(0.1)
        x = torch.randint(0, KW["vocab_size"], (1, KW["seq_len"]))
        assert (c(x) - m(x)).abs().max() > 1e-3
    cb.remove()
    assert "forward" not in m.blocks[0].__dict__


@pytest.mark.parametrize("extra,word", [
    ({"parallel": {"dp": 1, "tp": 2}}, "parallel.tp=2: tensor parallelism"),
    ({"parallel": {"dp": 1, "cp": 2}}, "parallel.cp=2"),
    ({"parallel": {"dp": 2, "ep": 2}}, "parallel.ep=2"),
    ({"parallel": {"dp": 2, "sync_batchnorm": True}}, "parallel.sync_batchnorm=true"),
    ({"zero": {"stage": 3}}, "zero.stage=3"),
    ({"zero": {"stage": 3, "offload": {"params": "cpu"}}}, "zero.stage=3"),
    ({"activation_checkpointing": {"policy": "selective"}}, "activation_checkpointing.policy=selective"),
    ({"pld": {"enabled": True}}, "pld.enabled"),
])
def test_refused_combinations_name_the_key_and_the_fix(extra, word):
    from parallel.config import ConfigError, load_config
    base = {"model": {"factory": "examples.gpt:build"}, "compile": {"enabled": True},
            "data": {"factory": "examples.gpt:random_tokens", "micro_batch_size": 2}}
    cfg = load_config(data={**base, **extra})
    with pytest.raises(ConfigError, match=f"compile.enabled=true with {word}.*Fix: "):
        cfg.validate(cfg.world_size)
    load_config(data={**base, **extra, "compile": {"enabled": False}}).validate(cfg.world_size)


@pytest.mark.parametrize("bad,word", [({"backend": "tvm"}, "compile.backend='tvm'"),
                                      ({"mode": "reduce-overhead"}, "CUDA-graph modes"),
                                      ({"backend": "aot_eager", "mode": "default"}, "inductor's option"),
                                      ({"fullgraph": "yes"}, "compile.fullgraph: expected bool")])
def test_bad_values_are_refused(bad, word):
    from parallel.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=word):
        load_config(data={"model": {"factory": "examples.gpt:build"}, "data": {"factory": "examples.gpt:random_tokens"},
                          "compile": {"enabled": True, **bad}}).validate(1)


def _moe_build(rank, world):
    from examples.moe_gpt import build
    from parallel.config import ConfigError, load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    cfg = load_config(data={"model": {"factory": "examples.moe_gpt:build"}, "compile": AOT,
                            "data": {"factory": "examples.gpt:random_tokens"}}).validate(1)
    try:
        parallelize(build(), cfg, Mesh(dp=1))
    except ConfigError as e:
        return str(e)


def test_moe_layers_are_refused_at_build():
    assert "compile.enabled=true with MoE layers" in run_ranks(_moe_build, 1)[0]
