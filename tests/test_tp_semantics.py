"""Tensor-parallel conversion keeps each module's semantics or refuses at plan time (issue 16, item 1).

Against the same model on one process (fp32, gloo CPU ranks, tp = 2, a few SGD steps): losses within 1e-5
relative and every parameter (this rank's shard of it) within 1e-5 of the largest weight (SGD: the update is
linear in the gradient; AdamW's m/√v would magnify rounding in near-zero gradients up to lr), for
- subclasses with their own forward: Gemma / Gemma3's scaled word embedding (√h) under ``tp_plan: auto``,
  with and without sequence parallel (whose RMSNorm, a module with its own forward, is kept);
- ties: GPT-2 / Llama with tied embeddings and a plan naming only one of the two tied modules (the other is
  converted to match and the weight stays one Parameter);
- width attributes: a nanoGPT-style attention splitting by ``self.n_embd`` (divided), or by an attribute
  the module declares in ``tp_attrs``.
Refusals (a fake group of the size, no ranks): the plan names the module, the attribute or line, and why.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_ranks

B, S, H, V = 2, 8, 32, 64


def _fake(size=2):
    from parallel.comm import Group
    return Group(None, "tp", tuple(range(size)), 0)


# --- models ---------------------------------------------------------------------------------------

def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=S, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                      attn_implementation="sdpa"))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=S,
                                        tie_word_embeddings=True, attn_implementation="sdpa"))


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM
    return GemmaForCausalLM(GemmaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2, max_position_embeddings=S,
                                        attn_implementation="sdpa"))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
                                              bos_token_id=1, eos_token_id=2, max_position_embeddings=S,
                                              sliding_window=4, attn_implementation="sdpa"))


class _Attn(nn.Module):
    """nanoGPT's CausalSelfAttention, as written there: the head size comes from the input's width C."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class _AttnByAttrs(_Attn):
    """The same, with every width read from the module's attributes (per rank once divided)."""

    def forward(self, x):
        B, T, _ = x.size()
        x = x.reshape(-1, x.size(-1)).view(B, T, -1)     # the input's width before the split (whole): fine
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.n_embd // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, self.n_embd))


class _AttnByWidth(_Attn):
    """Splits by an attribute whose name says nothing (``width``): refused unless the module says it."""

    def __init__(self, n_embd, n_head):
        super().__init__(n_embd, n_head)
        self.width = n_embd

    def forward(self, x):
        B, T, _ = x.size()
        q, k, v = (t.view(B, T, -1, 8).transpose(1, 2) for t in self.c_attn(x).split(self.width, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class _Block(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(H), attn(H, 4), nn.LayerNorm(H)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(H, 4 * H), "c_proj": nn.Linear(4 * H, H)})

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class _NanoGPT(nn.Module):
    def __init__(self, attn=_AttnByAttrs, tp_attrs=None):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, H), nn.Embedding(S, H)
        self.h = nn.ModuleList(_Block(attn) for _ in range(2))
        self.ln_f, self.lm_head = nn.LayerNorm(H), nn.Linear(H, V, bias=False)
        for b in self.h:
            b.attn.tp_attrs = tp_attrs

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for b in self.h:
            x = b(x)
        return self.lm_head(self.ln_f(x))


NANO_PLAN = {"h.*.attn.c_attn": "colwise_qkv", "h.*.attn.c_proj": "rowwise", "h.*.mlp.c_fc": "colwise",
             "h.*.mlp.c_proj": "rowwise"}
BUILD = {"gpt2": _gpt2, "llama": _llama, "gemma": _gemma, "gemma3": _gemma3, "nano": _NanoGPT,
         "nano_width": lambda: _NanoGPT(_AttnByWidth, {"width": "divide"})}


# --- tp = 2 against one process --------------------------------------------------------------------

def _steps(rank, world, kind, plan, sp, steps=3):
    """Losses of ``steps`` SGD steps (one process, tp) and the largest weight difference after them."""
    from examples.gpt import random_tokens
    from parallel.mesh import Mesh
    from parallel.parameters import param_info
    from parallel.tensor_parallel import shard_tensor, vocab_parallel_cross_entropy
    from parallel.tensor_parallel.plan import apply_tensor_parallel
    mesh = Mesh(tp=world)
    g = mesh.group("tp")
    torch.manual_seed(0)
    ref = BUILD[kind]()
    torch.manual_seed(0)
    model = BUILD[kind]()
    conv = apply_tensor_parallel(model, mesh, plan, sequence_parallel=sp)
    data = random_tokens(2 * B, S, V, seed=3)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model)]
    losses = []
    for t in range(steps):
        x, y = (torch.stack(v) for v in zip(*(data[t % 2 * B + i] for i in range(B))))
        pair = []
        for m, opt, split in ((ref, opts[0], False), (model, opts[1], conv.vocab_parallel_output)):
            out = m(x)
            logits = out.logits if hasattr(out, "logits") else out
            loss = vocab_parallel_cross_entropy(logits, y, g) if split else F.cross_entropy(logits.reshape(-1, V),
                                                                                              y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            pair.append(loss.item())
        losses.append(pair)
    refp, err, scale = dict(ref.named_parameters()), 0.0, 0.0
    assert set(refp) == {n for n, _ in model.named_parameters()}, "the parameters differ (a tie undone?)"
    for name, p in model.named_parameters():
        info = param_info(p)
        want = shard_tensor(refp[name].detach(), info.tp_dim, world, rank, info.sections) if info.tp_split \
            else refp[name].detach()
        err, scale = max(err, (p.detach() - want).abs().max().item()), max(scale, want.abs().max().item())
    if kind.startswith("nano"):                       # per-rank attributes of the attention
        return losses, err / scale, None, {a: getattr(model.h[1].attn, a, None) for a in
                                                     ("n_head", "n_embd", "width")}
    emb, head = model.get_input_embeddings(), model.lm_head
    return losses, err / scale, emb.weight is head.weight, [c.__name__ for c in type(emb).__mro__]


def _check(results, tol=1e-5):
    for losses, werr, _, _ in results:
        assert werr <= tol, f"weights differ by {werr:.3g} of the largest"
        for t, (want, got) in enumerate(losses):
            assert abs(got - want) <= tol * abs(want), (t, got, want)
        assert losses[2][0] < losses[0][0]               # it learns (steps 0 and 2 see the same batch)


@pytest.mark.parametrize("kind", ["gemma", "gemma3"])
def test_scaled_embedding_subclass_keeps_its_scale(kind):
    """Gemma's embedding multiplies by √h in its own forward; tp_plan auto used to drop it (loss off by 2e-2)."""
    for sp in (False, True):
        res = run_ranks(_steps, 2, kind, "auto", sp)
        _check(res)
        mro = res[0][3]                                  # super().forward in the subclass is the parallel op
        assert mro[0] == mro[1] and mro[0].endswith("ScaledWordEmbedding") and mro[2:4] == ["VocabParallelEmbedding",
                                                                                         "Embedding"]
        assert res[0][2]                                 # tied lm_head: still one Parameter


@pytest.mark.parametrize("kind,plan", [("gpt2", {"lm_head": "colwise_vocab"}),
                                       ("llama", {"lm_head": "colwise_vocab"}),
                                       ("llama", {"model.embed_tokens": "vocab"})])
def test_tied_weights_stay_one_parameter(kind, plan):
    """A plan naming one of two tied modules: the other gets the matching style (embedding → vocab,
    head → colwise_gather), so training moves one shard, as one process moves one tensor (it drifted 3e-2)."""
    res = run_ranks(_steps, 2, kind, plan, False)
    _check(res)
    assert all(r[2] for r in res)


@pytest.mark.parametrize("kind", ["nano", "nano_width"])
def test_width_attributes_divided(kind):
    """nanoGPT-style attention splitting its fused qkv by self.n_embd (a known width: divided) or by an
    attribute it declares per rank in ``tp_attrs``."""
    res = run_ranks(_steps, 2, kind, NANO_PLAN, False)
    _check(res)
    assert res[0][3] == {"nano": {"n_head": 2, "n_embd": 16, "width": None},
                         "nano_width": {"n_head": 4, "n_embd": 32, "width": 16}}[kind]   # forward reads only width


# --- refusals at plan time (nothing changed) ---------------------------------------------------------------

def _refused(model, plan, *patterns, tp=2):
    from parallel.tensor_parallel.plan import apply_tensor_parallel
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError) as e:
        apply_tensor_parallel(model, _fake(tp), plan)
    for p in patterns:
        assert p in str(e.value), str(e.value)
    assert [(n, type(m)) for n, m in model.named_modules()] == before


def test_width_refusals_name_the_attribute_or_line():
    _refused(_NanoGPT(_Attn), NANO_PLAN, "h.0.attn: _Attn.forward uses the width of its input with tensors "
             "computed from layers split across tp ranks, which are 1/tp as wide per rank (`B, T, C = x.size()`, "
             "line ", ": `k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)`)")
    _refused(_NanoGPT(_AttnByWidth), NANO_PLAN, "h.0.attn.width = 32 equals a width or head count split across tp "
             "ranks and _AttnByWidth.forward reads it", "set _AttnByWidth.tp_attrs = {'width': 'divide' or 'keep'}")
    _refused(_NanoGPT(_AttnByAttrs), NANO_PLAN, "h.0.attn.n_head = 4 (a per-rank count) is not divisible by tp = 8",
             tp=8)


def test_tie_refusals_name_both_modules():
    _refused(_llama(), {"lm_head": "rowwise"}, "lm_head.weight (rowwise) is tied to model.embed_tokens.weight "
             "(Embedding, not in the plan), which cannot be split the same way (dim 1)", "untie the weights")
    _refused(_gpt2(), {"lm_head": "rowwise", "transformer.wte": "vocab"},
             "are one tied Parameter split two different ways")


class _Scaled(nn.Embedding):
    def forward(self, ids):
        """Gemma's pattern."""
        scale = self.embedding_dim ** 0.5
        return super().forward(ids) * torch.tensor(scale).to(self.weight.dtype)


class _Act(nn.Linear):
    def __init__(self, *a):
        super().__init__(*a)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(super().forward(x))


class _Learned(nn.Linear):
    def __init__(self, *a):
        super().__init__(*a)
        self.alpha = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return super().forward(x) * self.alpha


class _OwnLookup(nn.Embedding):
    def forward(self, ids):
        return F.embedding(ids, self.weight) * 2


class _Reimplemented(nn.Linear):
    """transformers' FalconLinear: nn.Linear's function, written out."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class _Sub(nn.Module):
    def __init__(self, emb=_Scaled, lin=_Act):
        super().__init__()
        self.embed, self.proj = emb(16, 8), lin(8, 16)
        self.alias = self.proj                           # the same module under a second name

    def forward(self, ids):
        return self.proj(self.embed(ids))


def test_subclass_forward_checked_and_kept():
    from parallel.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
    from parallel.tensor_parallel.plan import apply_tensor_parallel
    _refused(_Sub(), {"embed": "vocab", "proj": "colwise_gather"}, "proj: _Act replaces nn.Linear's forward and its "
             "extra computation cannot run exactly over a tensor-parallel layer: it calls self.act")
    _refused(_Sub(lin=_Learned), {"proj": "colwise"}, "self.alpha (learnable) acts on an output split across tp ranks")
    _refused(_Sub(_OwnLookup), {"embed": "vocab"}, "exactly one super().forward(...) call")
    model = _Sub(lin=_Learned)
    apply_tensor_parallel(model, _fake(2), {"embed": "vocab", "proj": "colwise_gather"})
    assert isinstance(model.embed, _Scaled) and isinstance(model.embed, VocabParallelEmbedding)
    assert model.embed.weight.shape == (8, 8) and model.proj.weight.shape == (8, 8)
    assert isinstance(model.proj, _Learned) and isinstance(model.proj, ColumnParallelLinear)
    assert model.alias is model.proj and model.proj.alpha.shape == ()
    model = _Sub(lin=_Reimplemented)                     # the base's function: the plain parallel layer is exact
    apply_tensor_parallel(model, _fake(2), {"proj": "colwise"})
    assert type(model.proj) is ColumnParallelLinear and model.alias is model.proj
