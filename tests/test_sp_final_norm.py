"""Sequence parallel (arXiv 2205.05198, region layout) on transformers models whose final norm holds no parameters.

OLMo's ``OlmoLayerNorm`` is ``F.layer_norm`` with no weight; NanoChat's ``NanoChatRMSNorm`` has none either, and
NanoChat calls its one ``self.norm`` twice: on the embeddings before the blocks and after them. The region's exit
used to be looked for only among norms holding parameters, so both were refused ("enters the region but never
leaves it"). The exit is now the last block's output: a parameter-free norm acts per token, so it gives the same
numbers on the whole sequence (a gather on the norm's own output would also fire on NanoChat's first call, where
the sequence is whole, and double it). Checked against one process at the zoo's tolerance (1e-5 relative, 3 AdamW
steps, fp32) alone, with full recompute, on a tp2 × pp2 mesh and on dp2 ZeRO-3 × tp2 with full recompute.

Two checks the new exit needed: a marker on a block must not hide the block's own mixers from the unsplit check,
and split layers outside the region (HRM-Text's H_module, run after the L_module's region has been left) are
refused — their f̄ would all-gather a sequence that is already whole.
"""
import pytest
import torch
import torch.nn as nn
import zoo
from harness import run_ranks
from reference import assert_close_curve, reference_losses

from parallel.tensor_parallel.plan import _checked_plan
from parallel.tensor_parallel.styles import resolve_plan


def _markers(plan):
    return {k: v for k, v in plan.items() if v.startswith("seq_")}


@pytest.mark.parametrize("arch,split", [("olmo", 7), ("nanochat", 6)])   # q k v o + gate up down / fc1 fc2
def test_weightless_final_norm_exits_at_last_block(arch, split):
    torch.manual_seed(0)
    model = zoo.build(arch)
    assert not any(True for _ in model.model.norm.parameters())
    last = len(model.model.layers) - 1
    assert _markers(resolve_plan(model)) == {"model.layers.0": "seq_scatter_input",
                                             f"model.layers.{last}": "seq_gather_output"}
    matches = _checked_plan(model, "auto", 2, True)[0]          # no refusal (main: "never leaves it")
    assert sum(s in ("colwise", "rowwise") for _, s, _ in matches) == split * (last + 1)


def test_builtin_norm_without_affine_exits_at_last_block():
    """``nn.LayerNorm(elementwise_affine=False)`` registers ``weight`` / ``bias`` as None: it holds no parameter, so
    the exit is the last block's, as for OLMo's own norm (the review found it taken for a parametrised norm)."""
    torch.manual_seed(0)
    model = zoo.build("llama")
    model.model.norm = nn.LayerNorm(64, elementwise_affine=False)
    last = len(model.model.layers) - 1
    assert _markers(resolve_plan(model)) == {"model.layers.0": "seq_scatter_input",
                                             f"model.layers.{last}": "seq_gather_output"}
    _checked_plan(model, "auto", 2, True)


def test_parametrised_final_norm_keeps_its_marker():
    torch.manual_seed(0)
    assert _markers(resolve_plan(zoo.build("llama"))) == {"model.layers.0": "seq_scatter_input",
                                                          "model.norm": "seq_gather_output"}


def test_exit_marker_on_a_block_does_not_hide_its_mixers():
    """A plan whose exit marker sits on the last block (as the automatic one for a weight-less final norm):
    an unsplit module in that block would still run on the sequence shard, and is named (main: the marker
    counted as covering the whole block, and the plan was accepted)."""
    torch.manual_seed(0)
    model = zoo.build("llama")
    model.model.layers[-1].mixer = nn.Linear(64, 64)
    plan = {k: v for k, v in resolve_plan(model).items() if k != "model.norm"}
    plan[f"model.layers.{len(model.model.layers) - 1}"] = "seq_gather_output"
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mixer \(Linear\) would run on the rank's sequence "
                                         r"shard alone"):
        _checked_plan(model, plan, 2, True)


def test_split_layers_outside_the_region_refused():
    torch.manual_seed(0)
    model = zoo.build("hrm_text")
    assert _markers(resolve_plan(model))["model.L_module.layers.1"] == "seq_gather_output"
    with pytest.raises(ValueError, match=r"model\.H_module\.layers\.0\.mlp\.down_proj.* split outside the region "
                                         r"\(model\.L_module\.layers\.\*"):
        _checked_plan(model, "auto", 2, True)
    _checked_plan(zoo.build("hrm_text"), "auto", 2, False)      # tp without sp: unaffected


def _losses(rank, world, arch, pp, dp, policy):
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = zoo.config(arch, world, dp=dp, tp=2, pp=pp, zero=3 if dp > 1 else 1, sp=True)
    cfg.activation_checkpointing.policy = policy
    out = run(cfg, Mesh(pp=pp, dp=dp, tp=2), print_fn=lambda *a, **k: None)
    out["engine"].close()
    return out["losses"]


@pytest.mark.parametrize("arch,pp,dp,policy", [
    ("nanochat", 1, 1, "none"),
    pytest.param("olmo", 1, 1, "none", marks=pytest.mark.slow),
    pytest.param("nanochat", 1, 1, "full", marks=pytest.mark.slow),
    pytest.param("olmo", 2, 1, "none", marks=pytest.mark.slow),
    pytest.param("nanochat", 1, 2, "full", marks=pytest.mark.slow),     # dp2 ZeRO-3 × tp2 sp, full recompute
])
def test_tp2_sp_equals_one_process(arch, pp, dp, policy):
    torch.manual_seed(0)
    want = reference_losses(zoo.config(arch))
    got = run_ranks(_losses, 2 * pp * dp, arch, pp, dp, policy, timeout=300)[-1]
    assert_close_curve(got, want, zoo.RTOL, f"{arch} dp{dp} tp2 sp pp{pp} recompute {policy}")
