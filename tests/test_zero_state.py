"""ZeRO state: full / partitioned state dicts and resharding across stages, deferred (meta) initialisation
= the seeded build, stage 3 materialising a meta model shard by shard (helpers: tests/test_zero.py)."""
import pytest
import torch
from harness import run_ranks
from test_zero import (
    CLIP,
    LLAMA,
    OPTS,
    RTOL,
    assert_curve,
    make_model,
    mean_over_ranks,
    reference_losses,
    reference_run,
    train,
    zero_run,
)

from parallel.config import ZeroConfig


def _full_state(rank, world):
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    g = Mesh(dp=world).group("dp")
    _, _, zero, model = zero_run(g, "gpt", "adamw", 4, 8, stage=2, m=2, clip=CLIP)
    full = zero.full_state_dict()
    part = zero.state_dict()
    # partitioned round trip into a differently seeded replica of the same layout
    other = make_model("gpt", seed=1)
    z2 = ZeroOptimizer(other, OPTS["adamw"], g, ZeroConfig(stage=2, bucket_mb=0.05), grad_clip=CLIP)
    z2.load_state_dict(part)
    cont = train(z2, other, g, 8, 3, m=2, start=4)[0]
    bad = ZeroOptimizer(make_model("gpt"), OPTS["adamw"], g, ZeroConfig(stage=1, bucket_mb=0.05))
    try:
        bad.load_state_dict(part)
        err = None
    except ValueError as e:
        err = str(e)
    if rank != 0:
        return None, cont, err
    _, ref_model, ref_opt = reference_run("gpt", "adamw", 4, 8, CLIP)
    ref = {"params": {n: p.detach() for n, p in ref_model.named_parameters()},
           "state": {n: ref_opt.state[p] for n, p in ref_model.named_parameters()}}
    return (full, ref), cont, err


def _resume(rank, world, full, stage):
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    g = Mesh(dp=world).group("dp")
    model = make_model("gpt", seed=7)                 # wrong weights on purpose: the load must fix them
    zero = ZeroOptimizer(model, OPTS["adamw"], g, ZeroConfig(stage=stage, bucket_mb=0.05), grad_clip=CLIP)
    zero.load_full_state_dict(full)
    return train(zero, model, g, 8, 3, m=1, start=4)[0]


def test_state_dicts_full_partitioned_and_resharded():
    res = run_ranks(_full_state, 2)
    (full, ref), _, err = res[0]
    ref_losses = reference_run("gpt", "adamw", 7, 8, CLIP)[0]
    assert "full_state_dict()" in err and "stage=2" in err
    assert set(full["params"]) == set(ref["params"]) - {"lm_head.weight"}      # tied: once, first name
    # Tolerances: the attention's k-bias has an exactly-zero gradient in exact arithmetic; its
    # rounding noise (~1e-10) is normalised by Adam into steps of up to lr, so params get atol 5e-5.
    for name, p in full["params"].items():
        assert torch.allclose(p, ref["params"][name], rtol=1e-4, atol=5e-5), name
        st, rst = full["state"][name], ref["state"][name]
        assert float(st["step"]) == float(rst["step"]) == 4.0
        assert torch.allclose(st["exp_avg"], rst["exp_avg"], rtol=1e-3, atol=1e-7), name
        assert torch.allclose(st["exp_avg_sq"], rst["exp_avg_sq"], rtol=1e-3, atol=1e-10), name
    assert full["param_groups"][0]["lr"] == 1e-2 and full["steps"] == 4
    assert_curve(mean_over_ranks(res, key=1), ref_losses[4:], RTOL, "partitioned round trip")
    for world, stage in [(4, 3), (4, 1), (2, 0)]:        # stage 2 dp=2 -> other stages and dp sizes
        got = mean_over_ranks([[x] for x in run_ranks(_resume, world, full, stage)])
        assert_curve(got, ref_losses[4:], RTOL, f"resumed at stage {stage} dp={world}")


# --- meta-device init ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_deferred_init_reproduces_seeded_build(kind):
    from parallel.zero import deferred_init
    full = make_model(kind)
    after_full = torch.rand(4)
    torch.manual_seed(0)
    if kind == "gpt":
        from examples.gpt import GPT
        meta, rec = deferred_init(GPT, vocab_size=64, seq_len=16, n_layer=2, n_head=4, n_embd=32)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        meta, rec = deferred_init(LlamaForCausalLM, LlamaConfig(**LLAMA))
    assert torch.equal(torch.rand(4), after_full)            # the generator moved exactly as in a full build
    assert all(p.is_meta for p in meta.parameters())
    for (n, p), (_, q) in zip(full.named_parameters(), meta.named_parameters()):
        assert torch.equal(rec.materialize(q), p.detach()), n
    for (n, b), (_, q) in zip(full.named_buffers(), meta.named_buffers()):
        assert torch.equal(rec.materialize(q), b), n


def _stage3_meta(rank, world):
    from examples.gpt import GPT
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer, deferred_init
    g = Mesh(dp=world).group("dp")
    ref_losses = reference_losses("gpt", "adamw", 3, 8) if rank == 0 else None
    full = {n: p.detach().clone() for n, p in make_model("gpt").named_parameters()}
    torch.manual_seed(0)
    model, rec = deferred_init(GPT, vocab_size=64, seq_len=16, n_layer=2, n_head=4, n_embd=32)
    zero = ZeroOptimizer(model, OPTS["adamw"], g, ZeroConfig(stage=3, bucket_mb=0.05), init=rec)
    held = zero.model_state_bytes()["params"]
    with zero.gathered():
        same = all(torch.equal(p, full[n]) for n, p in model.named_parameters())
    losses = train(zero, model, g, 8, 3)[0]
    return ref_losses, losses, same, held, zero.num_params


def test_stage3_materialises_meta_model_shard_by_shard():
    res = run_ranks(_stage3_meta, 2)
    assert_curve(mean_over_ranks(res, key=1), res[0][0], RTOL, "stage 3 from meta")
    for _, _, same, held, psi in res:
        assert same
        assert held == pytest.approx(4 * psi / 2, rel=0.02)     # only this rank's fp32 shard is held


# --- errors and single-process use (a size-1 group needs no process group) ---------------------------
