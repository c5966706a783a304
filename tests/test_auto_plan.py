"""Plans derived from the module graph (parallel/tensor_parallel/auto_plan.py) for models that publish none.

Models, tiny, fp32, no dropout: transformers' OPTForCausalLM (q/k/v in the attention, fc1/fc2 directly in the
block), FalconForCausalLM with new_decoder_architecture (fused qkv grouped per kv head) and the multi_query
default (one kv head: the fused qkv cannot be split), GPTNeoXForCausalLM (fused qkv interleaved per head;
it publishes a plan, so its derived plan is asked for directly), and a GPT written in the nanoGPT style
(fused c_attn split by ``self.n_embd``, heads from ``self.n_head``, C from ``x.size()``). Falcon also runs
with its FalconLinear swapped for nn.Linear (same values), so its fused-qkv layouts are exercised while
the conversion refuses Linear subclasses with their own forward.

Each is trained 3 AdamW steps at tp = 2 and tp = 4 with the derived plan against the same loop on one
process: |loss_tp − loss_1| ≤ 1e-5 · |loss_1| at every step. The chosen plans are asserted layer by layer;
candidates the simulation rejects are named in the plan's notes.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from harness import run_ranks

B, S, H, V, L = 2, 16, 32, 64, 2


# --- a GPT in the nanoGPT style --------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        Bx, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(Bx, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(Bx, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd), CausalSelfAttention(n_embd, n_head)
        self.ln_2, self.mlp = nn.LayerNorm(n_embd), MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab_size=V, block_size=S, n_layer=L, n_head=4, n_embd=H):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)]), ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


# --- transformers models --------------------------------------------------------------------------------

def _opt():
    from transformers import OPTConfig, OPTForCausalLM
    return OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=H, ffn_dim=64, num_hidden_layers=L, num_attention_heads=4,
                                    max_position_embeddings=64, word_embed_proj_dim=H, dropout=0.0,
                                    attention_dropout=0.0, pad_token_id=1))


def _falcon(new_arch, plain=False):
    from transformers import FalconConfig, FalconForCausalLM
    kw = dict(new_decoder_architecture=True, num_attention_heads=8, num_kv_heads=4) if new_arch else {}
    model = FalconForCausalLM(FalconConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, ffn_hidden_size=64,
                                           hidden_dropout=0.0, attention_dropout=0.0, **({"num_attention_heads": 4}
                                                                                          | kw)))
    if plain:                          # FalconLinear computes x @ Wᵀ + b: the same as nn.Linear
        for mod in list(model.modules()):
            for n, c in list(mod.named_children()):
                if type(c).__name__ == "FalconLinear":
                    new = nn.Linear(c.in_features, c.out_features, c.bias is not None)
                    new.weight, new.bias = c.weight, c.bias
                    setattr(mod, n, new)
    return model


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=L,
                                            num_attention_heads=4, max_position_embeddings=64, hidden_dropout=0.0,
                                            attention_dropout=0.0))


def _gemma(three=False):
    """Gemma's embedding multiplies by √hidden in its own forward (semantics.py keeps it over the vocab split)."""
    import transformers as tf
    kw = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**kw)) if three else tf.GemmaForCausalLM(tf.GemmaConfig(**kw))


SCALED = {"gemma": _gemma, "gemma3": lambda: _gemma(True)}          # asked for their derived plans directly
BUILD = {"opt": _opt, "falcon_new": lambda: _falcon(True, True), "falcon_mq": lambda: _falcon(False, True),
         "falcon": lambda: _falcon(True), "neox": _neox, "nanogpt": NanoGPT}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out


def _train(rank, world, kinds, steps=3):
    """Per kind: the derived plan, its notes and [(loss at tp, loss on one process)] per step."""
    from parallel.mesh import Mesh
    from parallel.tensor_parallel import vocab_parallel_cross_entropy
    from parallel.tensor_parallel.auto_plan import derive_plan
    from parallel.tensor_parallel.plan import apply_tensor_parallel
    m = Mesh(tp=world)
    g = m.group("tp")
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, V, (B, S + 1), generator=gen)] * steps        # one batch: the loss must fall
    out = {}
    for kind in kinds:
        torch.manual_seed(0)
        build = {**BUILD, **SCALED}[kind]
        ref = build()
        torch.manual_seed(0)
        model = build()
        ap = derive_plan(model, world, apply_tensor_parallel)
        apply_tensor_parallel(model, m, ap.plan)
        opts = [torch.optim.AdamW(mod.parameters(), lr=1e-2) for mod in (ref, model)]
        losses = []
        for batch in data:
            x, y = batch[:, :-1], batch[:, 1:]
            pair = []
            for mod, opt, lossf in ((model, opts[1], lambda o, y=y: vocab_parallel_cross_entropy(o, y, g)),
                                    (ref, opts[0], lambda o, y=y: F.cross_entropy(o.reshape(-1, V), y.reshape(-1)))):
                opt.zero_grad()
                loss = lossf(_logits(mod(x)))
                loss.backward()
                opt.step()
                pair.append(loss.item())
            losses.append(pair)
        if kind == "neox":                 # the region layout (markers in the plan): sequence parallel, one step
            torch.manual_seed(0)
            sp = BUILD[kind]()
            assert ap.plan["gpt_neox.layers.0"] == "seq_scatter_input"
            apply_tensor_parallel(sp, m, ap.plan, sequence_parallel=True)
            x, y = data[0][:, :-1], data[0][:, 1:]
            losses.append([vocab_parallel_cross_entropy(_logits(sp(x)), y, g).item(), losses[0][1]])
        out[kind] = (ap.plan, ap.notes, losses)
    return out


def _split(plan, *names):
    return all(any(k.endswith(n) for k in plan) for n in names)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])       # tp4: the slow suite (budget)
def test_derived_plans_match_one_process(world):
    for res in run_ranks(_train, world, list(BUILD)):
        for kind, (plan, _, losses) in res.items():
            for t, (got, want) in enumerate(losses):
                assert abs(got - want) <= 1e-5 * abs(want), (kind, world, t, got, want, plan)
            assert losses[2][1] < losses[0][1] - 0.1, (kind, losses)               # it learns
        plan, notes = {k: v[0] for k, v in res.items()}, {k: v[1] for k, v in res.items()}
        assert plan["opt"] == {**{f"model.decoder.layers.*.self_attn.{p}_proj": "colwise" for p in "qkv"},
                               "model.decoder.layers.*.self_attn.out_proj": "rowwise",
                               "model.decoder.layers.*.fc1": "colwise", "model.decoder.layers.*.fc2": "rowwise",
                               "model.decoder.embed_tokens": "vocab", "lm_head": "colwise_vocab"}
        assert any("sequence parallel not available: a pair sits directly in the block" in n for n in notes["opt"])
        assert len(res["neox"][2]) == 4                           # GPT-NeoX also ran with sequence parallel
        for kind, blocks in (("neox", "gpt_neox.layers.*"), ("falcon_new", "transformer.h.*")):
            attn, mlp = ("attention", "mlp") if kind == "neox" else ("self_attention", "mlp")
            assert plan[kind][f"{blocks}.{attn}.query_key_value"] == "colwise"        # per head / per kv group
            assert plan[kind][f"{blocks}.{attn}.dense"] == "rowwise"
            assert _split(plan[kind], "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
        # multi-query: one kv head cannot be split; the attention stays replicated with the reason, the MLP is split
        assert not any("query_key_value" in k for k in plan["falcon_mq"]) and _split(plan["falcon_mq"], "dense_4h_to_h")
        assert any("left replicated: transformer.h.*.self_attention" in n and "num_kv_heads = 1" in n
                   for n in notes["falcon_mq"]), notes["falcon_mq"]
        # the real Falcon (FalconLinear: a forward that rewrites nn.Linear's math, converted as plain) splits fully
        assert plan["falcon"]["lm_head"] == "colwise_vocab" and not notes["falcon"], notes["falcon"]
        assert plan["falcon"]["transformer.h.*.self_attention.query_key_value"] == "colwise"
        assert _split(plan["falcon"], "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
        # nanoGPT style: the MLP is split; the attention (widths from self.n_embd and x.size()) only if exact
        assert plan["nanogpt"]["transformer.h.*.mlp.c_fc"] == "colwise"
        assert plan["nanogpt"]["transformer.wte"] == "vocab" and plan["nanogpt"]["lm_head"] == "colwise_vocab"
        assert "transformer.h.*.attn.c_attn" in plan["nanogpt"] or any(
            "transformer.h.*.attn" in n for n in notes["nanogpt"]), notes["nanogpt"]


@pytest.mark.slow
@pytest.mark.parametrize("kinds", [["gemma3"], ["gemma"]])
def test_scaled_embeddings_are_split_by_the_vocabulary(kinds):
    """Gemma / Gemma3: the derived plan splits the scaled embedding (and the tied head) by the vocabulary and
    keeps its √hidden scale, and gives Gemma3's per-head q/k norms (which see only a rank's heads) a gradient
    all-reduce: tp2 = one process to 1e-5 (without the all-reduce the losses drift 4e-6, 1.4e-5, 3.5e-5 at
    steps 1–4, lr 1e-2)."""
    for kind, (plan, notes, losses) in run_ranks(_train, 2, kinds)[0].items():
        assert plan["model.embed_tokens"] == "vocab" and plan["lm_head"] == "colwise_vocab", (kind, plan, notes)
        if kind == "gemma3":
            assert plan["model.layers.*.self_attn.q_norm"] == "replicated_grad_allreduce", plan
            assert plan["model.layers.*.self_attn.k_norm"] == "replicated_grad_allreduce", plan
        assert type(dict(_gemma(kind == "gemma3").named_modules())["model.embed_tokens"]).forward is not \
            nn.Embedding.forward
        for t, (got, want) in enumerate(losses):
            assert abs(got - want) <= 1e-5 * abs(want), (kind, t, got, want)


# --- single process --------------------------------------------------------------------------------------

def _block_inputs(model):
    from parallel.tensor_parallel.auto_plan import _find_body, _input_embedding, _trace
    name, body = _find_body(model)
    return body[0], _trace(model, name, body, _input_embedding(model))["block"]


def test_simulation_rejects_a_wrong_layout():
    """The verifier can fail: GPT-NeoX's fused qkv is laid out [heads, 3, hd]; splitting it as [q | k | v]
    sections (colwise_qkv) is accepted by the conversion but gives different numbers, which the simulation of
    the block at tp = 2 reports; the contiguous (per head) split matches."""
    from parallel.tensor_parallel.auto_plan_check import _simulate
    from parallel.tensor_parallel.plan import apply_tensor_parallel
    torch.manual_seed(0)
    block, inputs = _block_inputs(_neox())
    plan = {"attention.query_key_value": "colwise", "attention.dense": "rowwise"}
    assert _simulate(block, inputs, plan, 2, apply_tensor_parallel) is None
    why = _simulate(block, inputs, {**plan, "attention.query_key_value": "colwise_qkv"}, 2, apply_tensor_parallel)
    assert why and "output differs from the unsplit block by" in why, why
    why = _simulate(block, inputs, {"attention.query_key_value": "colwise"}, 2, apply_tensor_parallel)
    assert why is not None                                  # a column layer without its row layer


def test_auto_resolution_prints_an_editable_plan(capsys):
    """plan="auto" on a model without a published plan derives one, prints it as YAML for parallel.tp_plan,
    and the printed plan, loaded back, converts the model the same way; published plans keep priority."""
    from test_tp_plans import _fake_group

    from parallel.tensor_parallel.auto_plan import _VERIFIED, derive_plan, plan_for
    from parallel.tensor_parallel.plan import apply_tensor_parallel, resolve_plan
    _VERIFIED.clear()
    torch.manual_seed(0)
    opt = _opt()
    apply_tensor_parallel(opt, _fake_group(2), "auto")
    printed = capsys.readouterr().err
    assert "# tensor-parallel plan derived from the module graph for tp = 2" in printed
    loaded = yaml.safe_load(printed)["parallel"]["tp_plan"]
    assert loaded["model.decoder.layers.*.fc1"] == "colwise" and loaded["lm_head"] == "colwise_vocab"
    assert opt.model.decoder.layers[1].self_attn.q_proj.weight.shape == (H // 2, H)
    assert opt.model.decoder.layers[0].self_attn.num_heads == 2
    # the meta-device layout probe gets the verified plan of the same structure, not a guess
    with torch.device("meta"):
        meta = _opt()
    assert plan_for(meta, 2, apply_tensor_parallel) == loaded
    guess = derive_plan(meta, 2, apply_tensor_parallel)               # without the cache: the structural guess
    assert not guess.verified and guess.plan == loaded and "not verified" in guess.describe(2)
    with torch.device("meta"):
        meta_gpt = NanoGPT()             # no forward: the output layer is not found, so its tied embedding stays
    guess = derive_plan(meta_gpt, 2, apply_tensor_parallel).plan
    assert "transformer.wte" not in guess and guess["transformer.h.*.mlp.c_fc"] == "colwise"
    assert resolve_plan(_neox(), "auto", lambda m: {})["gpt_neox.layers.*.attention.query_key_value"] == "colwise"
    with pytest.raises(ValueError, match="sequence parallel with the tensor-parallel plan derived for OPTForCausalLM: "
                                         "a pair sits directly in the block"):
        apply_tensor_parallel(_opt(), _fake_group(2), "auto", sequence_parallel=True)
    with pytest.raises(ValueError, match="has no tensor-parallel plan .*no nn.ModuleList of same-class blocks"):
        apply_tensor_parallel(nn.Sequential(nn.Linear(2, 2)), _fake_group(2), "auto")


def test_dry_run_shows_the_derived_plan():
    from launch.dry_run import describe
    from parallel.config import load_config
    cfg = load_config(data={"model": {"factory": "test_auto_plan:NanoGPT", "kwargs": {}},
                            "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": 4,
                                     "micro_batch_size": 2, "kwargs": {"n": 8, "seq_len": S, "vocab_size": V}},
                            "loss": "cross_entropy", "parallel": {"tp": 2}}).validate(2)
    out = describe(cfg)
    assert "# tensor-parallel plan derived from the module graph for tp = 2" in out
    text = out[out.index("# tensor-parallel plan derived"):]
    plan = yaml.safe_load(text.split("\n\n")[0])["parallel"]["tp_plan"]
    assert plan["transformer.h.*.mlp.c_proj"] == "rowwise" and plan["transformer.wte"] == "vocab"
