"""Checkpoints of expert-parallel runs (parallel/checkpoint/ with parallel/moe/): a run saved at one ep (and
ZeRO stage) and resumed at another continues the one-process MoE curve to 1e-5 (losses and gradient
norms, so Adam's moments and the expert placement are both checked); the saved expert tensors are the
logical [E, …] stacks, and what a resume loads is exactly what was saved (consolidated state dicts equal).
"""
import os

import pytest
from harness import run_ranks
from moe_cases import MOE, build, dataset, hf_config, moe_config, reference_moe

RTOL = 1e-5


def _chain(rank, world, root, legs, hf=None, ref_steps=0, hf_tp=1):
    """Each leg (dp, ep, ZeRO stage, steps[, tp]) resumes from the newest checkpoint under ``root`` (the first
    from scratch when there is none), trains, and saves. Returns per leg: losses, gradient norms and (rank 0)
    the consolidated state dicts just after the load and just before the save; with ``ref_steps``, also
    (rank 0; a rank runs one thread) the one-process reference (losses, norms) over that many steps."""
    from parallel.checkpoint import latest, step_dir
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    out = []
    for dp, ep, stage, n, *tp in legs:
        tp = tp[0] if tp else 1
        cfg = hf_config(hf, dp=dp, ep=ep, stage=stage, world=world, tp=tp) if hf else \
            moe_config(dp=dp, ep=ep, stage=stage, world=world, tp=tp)
        if hf and hf_tp > 1:
            cfg.loss = "cross_entropy"          # every leg as the tp reference (vocab-split logits: no aux term)
        eng = parallelize(build(cfg), cfg)
        start, loaded = latest(root), None
        if start:
            eng.load(start)
            loaded = eng.full_state_dict()
        data = dataset(cfg)
        losses, norms = [], []
        for t in range(eng.step_count, eng.step_count + n):
            losses.append(eng.train_step(rank_batch(data, t, cfg.data.global_batch_size, dp, eng.mesh.coord["dp"])))
            norms.append(eng.last_result.grad_norm)
        saved = eng.full_state_dict()
        path = eng.save(step_dir(root, eng.step_count))
        out.append(dict(losses=losses, norms=norms, loaded=loaded, saved=saved, path=path))
        eng.close()
    if ref_steps and rank == 0:
        out.append(reference_moe(hf_config(hf, steps=ref_steps, tp=hf_tp) if hf else moe_config(steps=ref_steps)))
    return out


def _check(results):
    """``results``: the per-leg lists of rank 0 of each run_ranks call, in order, the first ending with the
    reference (losses, norms)."""
    import torch

    from parallel.checkpoint import read_meta
    want = results[0][-1]
    legs = [leg for part in results for leg in part if isinstance(leg, dict)]
    losses = [x for leg in legs for x in leg["losses"]]
    norms = [x for leg in legs for x in leg["norms"]]
    ref_losses, ref_norms = want
    assert len(losses) == len(ref_losses)
    for what, got, ref in (("loss", losses, ref_losses), ("grad norm", norms, ref_norms)):
        assert all(abs(g - w) <= RTOL * abs(w) for g, w in zip(got, ref)), (what, got, ref)
    for prev, leg in zip(legs, legs[1:]):               # the resume loads exactly what was saved
        assert leg["loaded"].keys() == prev["saved"].keys()
        for k, v in prev["saved"].items():
            assert torch.equal(leg["loaded"][k], v), k
    return read_meta(legs[0]["path"])


def test_ep_checkpoint_reshards_ep2_ep1_ep2_with_optimizer_state(tmp_path):
    """dp2: ep2 ZeRO-1 → ep1 ZeRO-2 → ep2 ZeRO-3 (one step each) = one process over 3 steps."""
    legs = [(2, 2, 1, 1), (2, 1, 2, 1), (2, 2, 3, 1)]
    res = run_ranks(_chain, 2, str(tmp_path / "ck"), legs, None, 3)
    meta = _check([res[0]])
    E, h, f = MOE["num_experts"], MOE["n_embd"], 4 * MOE["n_embd"]
    assert meta["layout"]["ep"] == 2 and meta["shapes"]["model/blocks.0.mlp.experts.w1"] == [E, h, f]
    assert meta["shapes"]["optim/blocks.1.mlp.experts.b2/exp_avg_sq"] == [E, h]
    sd = res[0][0]["saved"]
    model = build(moe_config())
    model.load_state_dict(sd, strict=True)             # the consolidated model is the unmodified one
    assert sd["blocks.0.mlp.experts.w1"].shape == (E, h, f)


def test_tp_experts_checkpoint_resumes_at_ep2_tp1(tmp_path):
    """Experts split over tp: dp1 tp2 ZeRO-1 (2 steps) → dp2 ep2 tp1 ZeRO-2 (1 step) = one process over 3 steps;
    the saved expert tensors are the whole [E, h, f] stacks."""
    res = run_ranks(_chain, 2, str(tmp_path / "ck"), [(1, 1, 1, 2, 2), (2, 2, 2, 1, 1)], None, 3)
    meta = _check([res[0]])
    E, h, f = MOE["num_experts"], MOE["n_embd"], 4 * MOE["n_embd"]
    assert meta["layout"]["tp"] == 2 and meta["shapes"]["model/blocks.0.mlp.experts.w2"] == [E, f, h]


@pytest.mark.slow
def test_ep2_tp2_checkpoint_resumes_at_ep1_tp1_and_back(tmp_path):
    """dp2 ep2 tp2 ZeRO-2 → dp4 ep1 tp1 ZeRO-1 → dp2 ep2 tp2 ZeRO-3 (world 4) = one process over 6 steps."""
    legs = [(2, 2, 2, 2, 2), (4, 1, 1, 2, 1), (2, 2, 3, 2, 2)]
    _check([run_ranks(_chain, 4, str(tmp_path / "ck"), legs, None, 6)[0]])


@pytest.mark.slow
def test_hf_mixtral_ep2_tp2_checkpoint_resumes_at_tp1(tmp_path):
    """Mixtral with its fused experts split over ep and tp: dp2 ep2 tp2 ZeRO-1 → dp4 ep1 tp1 ZeRO-2."""
    pytest.importorskip("transformers")
    legs = [(2, 2, 1, 2, 2), (4, 1, 2, 1, 1)]
    _check([run_ranks(_chain, 4, str(tmp_path / "ck"), legs, "mixtral", 3, 2)[0]])


@pytest.mark.slow
def test_ep_checkpoint_reshards_ep2_ep1_ep4_and_over_edp(tmp_path):
    """dp2 ep2 ZeRO-2 → dp4 ep1 ZeRO-1 → dp4 ep4 ZeRO-3 → dp4 ep2 ZeRO-2 (expert state partitioned over
    edp = 2) → dp2 ep1 ZeRO-0 = one process over 9 steps (dp2 × 2 micro-batches and dp4 × 1 cut the global
    batch into the same four chunks, so one reference serves every leg)."""
    root = str(tmp_path / "ck")
    a = run_ranks(_chain, 2, root, [(2, 2, 2, 2)], None, 9)[0]
    b = run_ranks(_chain, 4, root, [(4, 1, 1, 2), (4, 4, 3, 2), (4, 2, 2, 2)])[0]
    c = run_ranks(_chain, 2, root, [(2, 1, 0, 1)])[0]
    _check([a, b, c])


@pytest.mark.slow
def test_hf_mixtral_ep2_checkpoint_resumes_at_ep1_and_consolidates(tmp_path):
    """Mixtral (transformers, unmodified) at ep2 ZeRO-2 → ep1 ZeRO-0 = one process; the ep2 checkpoint
    consolidates into a save_pretrained folder whose weights are the consolidated state dict."""
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM

    from launch.consolidate import main
    root = str(tmp_path / "ck")
    res = run_ranks(_chain, 2, root, [(2, 2, 2, 2), (2, 1, 0, 1)], "mixtral", 3)[0]
    _check([res])
    out = str(tmp_path / "hf")
    assert main([res[0]["path"], out]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    for k, v in res[0]["saved"].items():
        assert torch.equal(sd[k], v), k
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 4
    assert os.path.isfile(os.path.join(out, "config.json"))
