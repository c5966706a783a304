"""Activation checkpointing: every policy reproduces the run without it (fp32, to 1e-6, dropout 0
and 0.1) alone and over dp2 ZeRO-3, tp2 + sequence parallel, pp2 1F1B (2×2×2 and the other
schedules under ``slow``); the saved-activation bytes per block equal the theory of
:mod:`parallel.activation.memory` exactly; full recompute adds one forward of each block in FLOPs."""
import copy

import pytest
import torch
import torch.nn.functional as F
from engine_cases import config, layout, train
from harness import run_ranks

from examples.gpt import GPT
from parallel.activation import SavedActivations, apply_activation_checkpointing, gpt_layer_bytes
from parallel.activation.memory import korthikanti_layer_bytes
from parallel.config import ConfigError, load_config

POLICIES = ("full", "every", "selective", "offload")


def _step(model, x):
    loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_every_policy_gives_the_same_loss_and_gradients(dropout):
    torch.manual_seed(0)
    base, x = GPT(n_layer=3, dropout=dropout), torch.randint(0, 64, (2, 16))
    torch.manual_seed(1)
    want_loss, want_grad = _step(copy.deepcopy(base), x)
    for policy in POLICIES:
        m = copy.deepcopy(base)
        ac = apply_activation_checkpointing([m], policy, every=2)
        torch.manual_seed(1)                          # dropout draws from here, in forward and recompute
        loss, grad = _step(m, x)
        assert abs(loss - want_loss) <= 1e-6 and (grad - want_grad).abs().max().item() <= 1e-6, policy
        recomputed = {"full": [1, 1, 1], "every": [1, 1], "selective": [1, 1, 1], "offload": [0, 0, 0]}[policy]
        assert [r.recomputes for r in ac.records] == recomputed, policy
        assert [k for k, _ in m.state_dict().items()] == list(base.state_dict()), "names must not change"


def test_saved_activation_bytes_equal_the_theory():
    """Per block and rank, fp32: none 16·sbh·4 + (4 + a)·sb·4 (Korthikanti's 34·sbh·(e/2) less the two
    dropout masks, flash attention instead of the a·s² scores), full sbh·4, selective 11·sbh·4 + a·sb·4,
    offload: the none figure in CPU memory and nothing on the device."""
    b, s, h, a = 2, 16, 32, 4
    torch.manual_seed(0)
    base, x = GPT(n_layer=3, n_head=a, n_embd=h, seq_len=s), torch.randint(0, 64, (b, s))
    got = {}
    for policy in ("none",) + POLICIES:
        m = copy.deepcopy(base)
        ac = apply_activation_checkpointing([m], policy, every=2)
        with SavedActivations(m, ac) as t:
            _step(m, x)
        got[policy] = (t.block_bytes(), t.block_bytes("cpu"), t.other["device"])
    none, full, sel = (gpt_layer_bytes(p, b, s, h, a) for p in ("none", "full", "selective"))
    assert none == 16 * s * b * h * 4 + (4 + a) * s * b * 4 == 66560
    assert none - (4 + a) * s * b * 4 == korthikanti_layer_bytes(b, s, h, 0, elem=4) * 32 / 34
    assert got["none"][0] == {0: none, 1: none, 2: none} and got["none"][1] == {0: 0, 1: 0, 2: 0}
    assert got["full"][0] == {0: full, 1: full, 2: full} and full == s * b * h * 4
    assert got["every"][0] == {0: full, 1: none, 2: full}
    assert got["selective"][0] == {0: sel, 1: sel, 2: sel} and full < sel < none
    assert got["offload"][0] == {0: 0, 1: 0, 2: 0} and got["offload"][1] == {0: none, 1: none, 2: none}
    assert len({v[2] for v in got.values()}) == 1     # embeddings, final norm and head: untouched


def test_full_recompute_adds_one_forward_of_each_block():
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    base, x = GPT(n_layer=2), torch.randint(0, 64, (2, 16))
    flops = {}
    for policy in ("none", "full", "selective"):
        m = copy.deepcopy(base)
        apply_activation_checkpointing([m], policy)
        with FlopCounterMode(display=False) as fc:
            _step(m, x)
        flops[policy] = fc.get_total_flops()
    blk = copy.deepcopy(base.blocks[0])
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        blk(torch.randn(2, 16, 32))
    assert flops["full"] - flops["none"] == 2 * fc.get_total_flops()       # the recompute runs whole blocks
    assert flops["selective"] == flops["none"]        # matmuls and attention come from the cache


def test_config_checks_and_errors():
    c = config("gpt", ["activation_checkpointing.policy=every", "activation_checkpointing.every=2"], 1)
    assert (c.activation_checkpointing.policy, c.activation_checkpointing.every) == ("every", 2)
    for over, msg in ((["activation_checkpointing.policy=some"], "is not one of"),
                      (["activation_checkpointing.every=2"], "only applies to policy=every"),
                      (["activation_checkpointing.policy=full", "activation_checkpointing.save_ops=[mm]"],
                       "only applies to policy=selective")):
        with pytest.raises(ConfigError, match=msg):
            config("gpt", over, 2 if "parallel.pp=2" in over else 1)
    with pytest.raises(ValueError, match="not aten operators"):
        apply_activation_checkpointing([GPT()], "selective", save_ops=["no_such_op"])
    with pytest.raises(ValueError, match="repeated blocks"):
        apply_activation_checkpointing([torch.nn.Linear(2, 2)], "full")


# --- over ranks -------------------------------------------------------------------------------------

def _parity(rank, world, lay, policies, dropout, steps=2):
    """Train the layout without checkpointing, then with each policy: max |Δloss| and |Δparameter|."""
    over = lay + [f"train.steps={steps}", f"model.kwargs.dropout={dropout}"]
    want, eng = train(rank, world, "gpt", over)
    ref = eng.full_state_dict()
    out = {}
    for policy in policies:
        extra = ["activation_checkpointing.every=2"] if policy == "every" else []
        got, eng = train(rank, world, "gpt", over + [f"activation_checkpointing.policy={policy}"] + extra)
        sd = eng.full_state_dict()
        dp = max((sd[k] - v).abs().max().item() for k, v in ref.items()) if sd is not None else 0.0
        n = sum(r.recomputes for r in eng.activation.records)
        out[policy] = (max(abs(a - b) for a, b in zip(got, want)), dp, n)
    return out


def _check(results, policies):
    for res in results:
        for p in policies:
            dl, dp, n = res[p]
            assert dl <= 1e-6 and dp <= 1e-6, (p, dl, dp)
    assert any(res[p][2] > 0 for res in results for p in policies if p != "offload")


@pytest.mark.parametrize("name,lay,world,policies", [
    ("dp2_zero3", layout(2, 1, 1, 3), 2, ("full",)),
    ("dp2_zero3_merged", layout(2, 1, 1, 3, zero__units="block", zero__unit_mb=64), 2, ("full",)),   # zero.unit_mb
    ("tp2_sp", layout(1, 2, 1, 0, parallel__sequence_parallel="true"), 2, ("selective", "offload")),
    ("pp2_1f1b", layout(1, 1, 2, 0), 2, ("full", "every")),
])
def test_policies_reproduce_the_run_without_checkpointing(name, lay, world, policies):
    _check(run_ranks(_parity, world, lay, policies, 0.1), policies)


SLOW_LAYOUTS = [("dp2_zero3", layout(2, 1, 1, 3), 2), ("dp2_zero3_block", layout(2, 1, 1, 3, zero__units="block"), 2),
                ("tp2_sp", layout(1, 2, 1, 0, parallel__sequence_parallel="true"), 2),
                ("pp2_1f1b", layout(1, 1, 2, 0), 2), ("pp2_zero_bubble", layout(1, 1, 2, 0, parallel__pp_schedule=
                                                                                  "zero_bubble"), 2),
                ("2x2x2", layout(2, 2, 2, 1, parallel__sequence_parallel="true"), 8)]


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("name,lay,world", SLOW_LAYOUTS)
def test_policy_matrix(name, lay, world, dropout):
    _check(run_ranks(_parity, world, lay, POLICIES, dropout, timeout=900), POLICIES)


def _gathers(rank, world, units, policy):
    _, eng = train(rank, world, "gpt", layout(2, 1, 1, 3, zero__units=units) +
                   ["train.steps=1", f"activation_checkpointing.policy={policy}"])
    z3 = eng.zero.stage3
    return z3.gathers, sum(u.padded * 4 for u in z3.units)


def test_zero3_recompute_gathers_no_unit_again():
    """A checkpoint's recompute runs inside backward: the units it gathers stay gathered for the backward that
    follows (parallel/zero/stage3.py), so full recompute adds no all-gather, units=block or units=module. Before,
    units=module gathered each block's 5 units whose backward had not begun once more: 5 per block (4) and
    micro-batch (2) = 40 more calls per step than without recompute."""
    got = {(u, p): run_ranks(_gathers, 2, u, p)[0][0] for u in ("block", "module") for p in ("none", "full")}
    assert got[("block", "full")] == got[("block", "none")] == 18, got
    assert got[("module", "full")] == got[("module", "none")] == 108, got


def test_deepspeed_activation_checkpointing_maps_to_a_policy():
    from parallel.config.deepspeed import map_deepspeed
    ds = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2}
    for block, policy, printed in (({"partition_activations": True}, "full", "not honoured"),
                                   ({"cpu_checkpointing": True}, "offload", "nothing recomputed"),
                                   ({"number_checkpoints": 2, "contiguous_memory_optimization": True}, "full",
                                    "ignored: activation_checkpointing.number_checkpoints")):
        tree, lines = map_deepspeed({**ds, "activation_checkpointing": block})
        assert tree["activation_checkpointing"] == {"policy": policy}, (block, tree)
        assert any(printed in ln for ln in lines), lines
        assert load_config(data=tree).activation_checkpointing.policy == policy
    with pytest.raises(ConfigError, match="activation_checkpointing.partition: unknown key"):
        map_deepspeed({**ds, "activation_checkpointing": {"partition": True}})


def _ds_run(rank, world, path, block):
    """Rank body: train one step of dp2 from a DeepSpeed JSON holding ``block`` (the launcher's load_config
    path); returns (policy, recomputes per block, tensors the offload hooks packed, losses, report lines)."""
    import json

    from engine_cases import GPT as GPT_CFG

    from launch.train import run
    from parallel.data import rank_batch
    from parallel.mesh import Mesh
    if rank == 0:
        with open(path, "w") as f:
            json.dump({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "activation_checkpointing": block},
                      f)
    torch.distributed.barrier()
    base = {"model": GPT_CFG, "data": {"factory": "examples.gpt:random_tokens",
                                       "kwargs": {"n": 64, "seq_len": 16, "vocab_size": 64}},
            "optimizer": {"name": "adamw", "lr": 0.003}, "parallel": {"dp": 2}}
    report: list = []
    cfg = load_config(data=base, overrides=["train.steps=1"], deepspeed=path, report=report).validate(world)
    packed = [0]
    out = run(cfg, Mesh(dp=2), print_fn=lambda *a, **k: None)
    eng = out["engine"]
    eng.activation.pack_listeners.append(lambda rec, t: packed.__setitem__(0, packed[0] + 1))
    eng.train_step(rank_batch(out["dataset"], 1, 8, 2, rank))          # step 2, with the packing counted
    return (cfg.activation_checkpointing.policy, [r.recomputes for r in eng.activation.records], packed[0],
            out["losses"], report)


def test_deepspeed_activation_checkpointing_block_acts(tmp_path):
    """A DeepSpeed JSON's activation_checkpointing block, through load_config(deepspeed=...) and the engine:
    a block → full (each block recomputed once per micro-batch: 2 per step here, 2 steps), cpu_checkpointing →
    offload (saved tensors packed to CPU, nothing recomputed); the mapping is printed."""
    full = run_ranks(_ds_run, 2, str(tmp_path / "full.json"), {"number_checkpoints": 4})
    off = run_ranks(_ds_run, 2, str(tmp_path / "cpu.json"), {"cpu_checkpointing": True})
    for res in full:
        policy, recomputes, packed, _, report = res
        assert policy == "full" and recomputes == [4, 4, 4, 4] and packed == 0, res
        assert any("ignored: activation_checkpointing.number_checkpoints" in ln for ln in report), report
    for res in off:
        policy, recomputes, packed, _, report = res
        assert policy == "offload" and recomputes == [0, 0, 0, 0] and packed > 0, res
    assert full[0][3] == pytest.approx(off[0][3], abs=1e-6)          # the same step-1 loss either way


def _tp_bytes(rank, world, sp, policies):
    """Saved bytes per block on each tp rank for one micro-batch through the engine's own loop."""
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    b, s = 2, 16
    out = {}
    for policy in policies:
        cfg = config("gpt", layout(1, 2, 1, 0, parallel__sequence_parallel=str(sp).lower()) +
                     [f"activation_checkpointing.policy={policy}"], world)
        torch.manual_seed(0)
        eng = parallelize(GPT(**cfg.model.kwargs), cfg, Mesh(tp=2))
        x = torch.randint(0, 64, (b, s), generator=torch.Generator().manual_seed(1))
        eng.zero_grad(1)
        with SavedActivations(eng.stages, eng.activation) as t:
            loss = eng.loss(eng(x), x)
        eng.backward(loss)
        out[policy] = t.block_bytes()
    return out


@pytest.mark.parametrize("sp", [False, True])
def test_saved_bytes_per_tp_rank_equal_the_theory(sp):
    """tp = 2 splits q, k, v, the attention output, fc and GELU outputs (and the log-sum-exp by heads);
    sequence parallelism splits the norms' inputs/outputs and the block input too."""
    got = run_ranks(_tp_bytes, 2, sp, ("none", "full", "selective"))
    for res in got:
        for policy, per_block in res.items():
            want = gpt_layer_bytes(policy, 2, 16, 32, 4, tp=2, sp=sp)
            assert per_block == {i: want for i in range(4)}, (sp, policy, per_block, want)


def test_planner_activation_estimate_per_policy():
    """The planner's per-block activation bytes are the counted theory (gpt_layer_bytes) for every policy, tp and
    sequence parallelism; its activations are the blocks' plus the head (offload on CUDA: the head only); the
    dry run names the policy. (Against measured peaks: tests/test_memory_estimate.py.)"""
    from launch.dry_run import describe
    from parallel.planning.peak import block_bytes, head_bytes
    from parallel.planning.planner import Layout, ModelSpec, TrainSpec, predict
    spec, lay = ModelSpec(n_layer=4, hidden=32, heads=4, vocab=64, seq=16), Layout(1, 1, 1, 0, 1)
    for p in ("none", "full", "selective"):
        for t, sp in ((1, False), (2, False), (2, True)):
            assert block_bytes(spec, p, 2, t, sp) == gpt_layer_bytes(p, 2, 16, 32, 4, tp=t, sp=sp), (p, t, sp)
    act = {p: predict(spec, lay, TrainSpec(8, activation=p, every=2)).memory[0]["activations"]
           for p in ("none",) + POLICIES}
    assert act["none"] == 4 * gpt_layer_bytes("none", 8, 16, 32, 4) + head_bytes(spec, 8)
    assert act["offload"] == head_bytes(spec, 8)
    assert act["full"] < act["every"] < act["none"] and act["selective"] < act["none"]
    # at 2 sequences this dp = 1 layout's gradients (no bucket: they exist from the backward on, 213,760 B) outweigh
    # the kept activations, so every recompute policy peaks at block 0's recompute: one whole block, 3/4 of them
    small = {p: predict(spec, lay, TrainSpec(2, activation=p, every=2)).memory[0] for p in POLICIES}
    for p in ("full", "every", "selective"):
        assert small[p]["activations"] == gpt_layer_bytes("none", 2, 16, 32, 4), (p, small[p])
    text = describe(config("gpt", ["activation_checkpointing.policy=selective"], 1))
    assert "activation checkpointing: selective" in text


def test_batchnorm_running_statistics_move_once_under_recompute():
    """The recompute runs each BatchNorm's forward again; its running statistics are restored after,
    so they equal one forward's update (and dropout, if any, replays)."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8),
                                                                  torch.nn.Dropout(0.2)) for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = torch.tanh(b(x))
            return x

    torch.manual_seed(0)
    base, x = Net(), torch.randn(16, 8)
    runs = {}
    for policy in ("none", "full", "selective"):
        m = copy.deepcopy(base)
        apply_activation_checkpointing([m], policy)
        torch.manual_seed(3)
        m(x).square().sum().backward()
        runs[policy] = (torch.cat([b[1].running_mean for b in m.blocks] + [b[1].running_var for b in m.blocks]),
                        torch.cat([p.grad.flatten() for p in m.parameters()]),
                        [int(b[1].num_batches_tracked) for b in m.blocks])
    for policy in ("full", "selective"):
        assert torch.equal(runs[policy][0], runs["none"][0]) and runs[policy][2] == [1, 1, 1], policy
        assert (runs[policy][1] - runs["none"][1]).abs().max().item() <= 1e-6, policy


def test_unmodified_hf_llama_under_every_policy():
    """transformers' Llama (decoder layers called with hidden_states, masks and rotary tables as
    kwargs): same loss and gradients; full keeps each layer's input only (s·b·h·4 bytes)."""
    pytest.importorskip("transformers")
    from examples.hf_causal_lm import llama_tiny
    torch.manual_seed(0)
    base, x = llama_tiny(), torch.randint(0, 64, (2, 16))

    def step(m):
        logits = m(x).logits
        F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    want = step(copy.deepcopy(base))
    h = base.config.hidden_size
    for policy in ("full", "selective", "offload"):
        m = copy.deepcopy(base)
        ac = apply_activation_checkpointing([m], policy)
        with SavedActivations(m, ac) as t:
            got = step(m)
        assert (got - want).abs().max().item() <= 1e-6, policy
        if policy == "full":
            assert set(t.block_bytes().values()) == {2 * 16 * h * 4}
