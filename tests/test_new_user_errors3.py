"""Defects a third new-user pass met (session 12): each test failed on the code before its fix."""
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import zoo

from parallel.tensor_parallel.plan import apply_tensor_parallel

TP2 = SimpleNamespace(size=2, rank=0)                # the plan is checked before any collective


def _tiny(arch):
    torch.manual_seed(0)
    return zoo.build(arch)


@pytest.mark.parametrize("arch,named", [
    ("falcon_h1", "model.layers.0.mamba (FalconH1Mixer)"),
    ("lfm2", "model.layers.0.self_attn (Lfm2Attention)"),
    ("diffllama", "model.layers.0.self_attn (DiffLlamaAttention)")])
def test_sequence_parallel_refuses_a_published_plan_that_splits_no_block(arch, named):
    """transformers publish plans naming only the embedding for Falcon-H1, LFM2, LFM2.5, DiffLlama, DBRX, Emu3, Ergo,
    GPT-OSS and HunYuan-dense ({"embed_tokens": "embedding_rowwise"}). Under parallel.sequence_parallel=true that
    is the Megatron layout (the vocab embedding reduce-scatters) and the check looked at the region layout only:
    every block's attention, mamba mixer and MLP ran replicated on s/tp tokens. tp2 sp, 3 AdamW steps against
    one process (python -m tests.zoo, layout "tp2 sp", loaded machine): falcon_h1 9.1e-3, lfm2 2.0e-2, lfm3 9.0e-3,
    dbrx 1.6e-2, diffllama 1.6e-2, emu3 9.6e-3, ergo 8.4e-3, gpt_oss 7.0e-3, hunyuan_v1_dense 1.3e-2 relative
    off — silently. Now refused before anything is converted, naming the modules and the fix."""
    model = _tiny(arch)
    with pytest.raises(ValueError, match="sequence parallel: ") as e:
        apply_tensor_parallel(model, TP2, "auto", sequence_parallel=True)
    msg = " ".join(str(e.value).split())
    assert named in msg and "would run on the rank's sequence shard alone" in msg, msg
    assert "set parallel.sequence_parallel=false, or split it in parallel.tp_plan" in msg, msg
    assert not any(type(m).__name__.endswith("ParallelLinear") for m in model.modules())     # nothing converted


class _WithConv(nn.Module):
    """A wrapper holding the block's (split) attention beside a causal depthwise conv over the sequence (a
    short-conv token mixer, as LFM2's or a Mamba mixer's conv1d)."""

    def __init__(self, attn, h):
        super().__init__()
        self.attn, self.conv = attn, nn.Conv1d(h, h, 3, groups=h, padding=2)

    def forward(self, hidden_states, **kw):
        out, w = self.attn(hidden_states, **kw)
        s = hidden_states.shape[1]
        return out + self.conv(hidden_states.transpose(1, 2))[..., :s].transpose(1, 2), w


def test_sequence_parallel_finds_a_token_mixer_nested_beside_a_split_attention():
    """The check looked at a block's direct children only: ``layers.i.self_attn`` held split layers (in
    ``self_attn.attn``), so its sibling ``self_attn.conv`` passed — and ran on s/tp tokens (the all-gather is on the
    module that holds the column layers, ``self_attn.attn``): a silent wrong number. Now the walk goes down to the
    mixer and names it. (In the zoo such nesting — Qwen3-Next's ``mlp.shared_expert_gate`` beside its split
    ``mlp.shared_expert``, routers in ``mlp`` — is refused already for its experts.)"""
    from examples.hf_causal_lm import llama_tiny
    torch.manual_seed(0)
    model = llama_tiny()
    for layer in model.model.layers:
        layer.self_attn = _WithConv(layer.self_attn, model.config.hidden_size)
    plan = {"model.embed_tokens": "vocab", "lm_head": "colwise_vocab", "model.layers.0": "seq_scatter_input",
            "model.norm": "seq_gather_output", "model.layers.*.self_attn.attn.q_proj": "colwise",
            "model.layers.*.self_attn.attn.k_proj": "colwise", "model.layers.*.self_attn.attn.v_proj": "colwise",
            "model.layers.*.self_attn.attn.o_proj": "rowwise", "model.layers.*.mlp.gate_proj": "colwise",
            "model.layers.*.mlp.up_proj": "colwise", "model.layers.*.mlp.down_proj": "rowwise"}
    apply_tensor_parallel(model, SimpleNamespace(size=1, rank=0), plan, sequence_parallel=True)   # tp 1: checked
    with pytest.raises(ValueError, match=r"sequence parallel: model.layers.0.self_attn.conv \(Conv1d\), "
                                         r"model.layers.1.self_attn.conv \(Conv1d\), .* \(and 1 more\) would run on "
                                         r"the rank's sequence shard alone"):
        apply_tensor_parallel(model, TP2, plan, sequence_parallel=True)


def test_context_parallel_refuses_bloom_at_setup_naming_alibi():
    """Bloom at parallel.cp=2 was refused only when the first train_step ended — after a whole forward and backward
    — because its attention (ALiBi biases added to q·kᵀ by baddbmm in its own code) never reaches the cp attention.
    Now a one-forward probe at setup refuses it (ContextParallel.prepare, from the engine's __init__), naming ALiBi;
    a model whose attention is routed (llama) still prepares."""
    from parallel.context_parallel import ContextParallel
    with pytest.raises(ValueError, match=r"parallel.cp=2: BloomForCausalLM's forward made no call to the cp "
                                         r"attention: .*ALiBi.*; set parallel.cp=1 for this model"):
        ContextParallel(TP2).prepare(_tiny("bloom"))
    ContextParallel(TP2).prepare(_tiny("llama"))


def test_sequence_parallel_gathers_an_input_given_three_times():
    """CTRL's attention takes the normed hidden states three times, as v, k and q (``attn(normed, normed,
    normed)``); under sequence parallel the island's all-gather replaced only the first, so tp2 sp ended in
    "The size of tensor a (2) must match the size of tensor b (4)". Now the same tensor gets the same gathered
    one, and CTRL at tp2 sp trains as one process."""
    torch.manual_seed(0)
    want = zoo.reference("ctrl")
    status, detail = zoo.check("ctrl", "tp2 sp", want, timeout=300)
    assert status == "exact", detail


def test_dry_run_shows_the_plan_the_ranks_will_refuse(capsys):
    """`python -m launch --config configs/hf_causal_lm.yaml model.kwargs.model_type=falcon_h1
    parallel.sequence_parallel=true --dry-run` printed the published plan as if it would run (so did tp=3 for the
    llama config, whose 2 kv heads cannot split 3 ways): the ranks then stopped at setup, after the launch. The
    dry run now checks the plan as each rank will and prints the refusal under it."""
    from launch.__main__ import main
    base = ["--config", "configs/hf_causal_lm.yaml", "--dry-run", "parallel.pp=1"]
    assert main(base + ["model.kwargs.model_type=falcon_h1", "parallel.sequence_parallel=true"]) == 0
    out = capsys.readouterr().out
    assert "# REFUSED: the ranks will stop at setup with: tensor-parallel plan cannot be applied to " \
           "FalconH1ForCausalLM with tp = 2:" in out, out[-2000:]
    assert "model.layers.0.mamba (FalconH1Mixer)" in out
    assert main(base + ["parallel.tp=3"]) == 0
    out = capsys.readouterr().out
    assert "# REFUSED: the ranks will stop at setup with: tensor-parallel plan cannot be applied to " \
           "LlamaForCausalLM with tp = 3:" in out and "cannot be split over tp = 3" in out, out[-2000:]
    assert main(base) == 0
    assert "REFUSED" not in capsys.readouterr().out                     # the config as shipped: no refusal


def test_hf_example_names_a_misspelt_model_type_and_a_missing_pretrained_directory():
    """`python examples/hf_causal_lm.py --model-type lama` failed on every rank with transformers' "Unrecognized
    model identifier: lama. Should contain one of gpt-sw3, afmoe, aimv2, …" (~400 names, no suggestion);
    `--pretrained /no/such/dir` with "Repo id must be in the form 'repo_name' or 'namespace/repo_name'" (the path
    taken for a Hub id). Both now name the cause and the fix."""
    from examples.hf_causal_lm import build
    with pytest.raises(ValueError, match=r"model.kwargs.model_type='lama' is no transformers model type; did you "
                                         r"mean 'llama'"):
        build("lama", vocab_size=64)
    with pytest.raises(ValueError, match=r"model.kwargs.pretrained='/no/such/dir': no such directory; give a local "
                                         r"model directory"):
        build(pretrained="/no/such/dir")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
