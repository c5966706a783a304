"""Per-head parameters of a head-split attention (parallel/tensor_parallel/head_params.py).

An attention in Doge's form: a per-head coefficient ``A`` (n heads) and a ``dt_proj`` whose n outputs are one
mask logit per head, under the plan transformers publishes for Doge (q/k/v colwise, dt_proj and o_proj
rowwise). Split as published, each rank's 2 local heads met all 4 coefficients and logits (the zoo's doge tp2:
a shape error at step 0). Now ``A`` and dt_proj's output are split with the heads when the block check agrees
(exact against one process), and refused, naming the parameter, when the forward mixes heads (softmax over A).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_ranks

from parallel.tensor_parallel.plan import _checked_plan, apply_tensor_parallel

V, H, NH, HD, T = 32, 32, 4, 8, 8
PLAN = {"layers.*.attn.q_proj": "colwise", "layers.*.attn.k_proj": "colwise", "layers.*.attn.v_proj": "colwise",
        "layers.*.attn.dt_proj": "rowwise", "layers.*.attn.o_proj": "rowwise"}


class Attn(nn.Module):
    def __init__(self, mix: bool):
        super().__init__()
        self.head_dim, self.mix = HD, mix
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(H, NH * HD) for _ in range(3))
        self.A = nn.Parameter(torch.linspace(0.5, 1.5, NH))        # per head, as Doge's dynamic-mask A
        self.dt_proj = nn.Linear(NH * HD, NH)                       # one mask logit per head
        self.o_proj = nn.Linear(NH * HD, H)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = (p(x).view(B, S, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        dt = self.dt_proj(v.transpose(1, 2).reshape(B, S, -1))     # [B, S, heads]
        a = self.A.softmax(0) * NH if self.mix else self.A         # mix: every coefficient depends on all heads
        bias = (a * F.softplus(dt)).transpose(1, 2)[:, :, None, :]
        causal = torch.full((S, S), float("-inf")).triu(1)
        att = (q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + bias + causal).softmax(-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    def __init__(self, mix):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(H), Attn(mix)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class Model(nn.Module):
    def __init__(self, mix=False):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.layers = nn.ModuleList(Block(mix) for _ in range(2))
        self.head = nn.Linear(H, V)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.layers:
            x = b(x)
        return self.head(x)


def _model(mix=False):
    torch.manual_seed(0)
    return Model(mix)


def test_per_head_parameter_split_with_the_heads_when_exact():
    matches = _checked_plan(_model(), dict(PLAN), 2, False)[0]
    assert [(n, s) for n, s, _ in matches if s == "per_head_params"] == \
        [("layers.0.attn", "per_head_params"), ("layers.1.attn", "per_head_params")]


def test_layout_probe_copies_reuse_the_verdict():
    """The checkpoint layout probes convert a meta copy and a float64 copy holding element indices (no numerical
    check is possible on either): they reuse the verdict on the real model's structure."""
    from parallel.checkpoint.layout import materialize, meta_copy
    model = _model()
    meta = meta_copy(model)
    unseen = _model()
    unseen.structure_tag = 1                          # a structure never checked in this process: refused
    with pytest.raises(ValueError, match="cannot be checked numerically here"):
        _checked_plan(meta_copy(unseen), dict(PLAN), 2, False)
    _checked_plan(model, dict(PLAN), 2, False)
    probe = materialize(meta).to(torch.float64)
    with torch.no_grad():
        for i, p in enumerate(probe.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float64).view(p.shape) + 1e6 * i)
    for copy in (meta, probe):
        assert sum(s == "per_head_params" for _, s, _ in _checked_plan(copy, dict(PLAN), 2, False)[0]) == 2


def test_per_head_parameter_mixing_heads_is_refused():
    with pytest.raises(ValueError, match=r"a replicated per-head parameter in a head-split attention: "
                                         r"layers\.0\.attn\.A, shape \(4,\) \(dim 0 = 4 heads\).*differs from the "
                                         r"unsplit block.*fix: leave layers\.0\.attn's layers out of the plan"):
        _checked_plan(_model(mix=True), dict(PLAN), 2, False)


def test_explicit_per_head_style_refused_where_heads_do_not_divide():
    plan = {**PLAN, "layers.*.attn": "per_head_params"}
    with pytest.raises(ValueError, match=r"per_head_params.*layers\.0\.attn\.A has 4 heads, not divisible by tp = 8"):
        _checked_plan(_model(), plan, 8, False)


def test_per_head_values_of_a_child_module_are_refused():
    model = _model()
    for b in model.layers:
        b.attn.gate = nn.Linear(H, NH)            # per-head gates from a replicated input: not split by the plan
    with pytest.raises(ValueError, match=r"per-head parameter in a head-split attention: layers\.0\.attn\.A.*"
                                         r"layers\.0\.attn\.gate\.weight \(shape \(4, 32\)\) is held by a child"):
        _checked_plan(model, dict(PLAN), 2, False)


def _train(rank, world):
    """3 AdamW steps; the losses and rank 0's A after them (its shard at tp > 1)."""
    from parallel.mesh import Mesh
    model = _model()
    if world > 1:
        apply_tensor_parallel(model, Mesh(tp=world), dict(PLAN))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        ids = torch.randint(0, V, (2, T + 1), generator=g)
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.layers[0].attn.A.detach().clone()


def test_doge_form_attention_tp2_equals_one_process():
    want, a_full = _train(0, 1)
    (got0, a0), (got1, a1) = run_ranks(_train, 2, timeout=120)
    for got in (got0, got1):
        assert max(abs(x - y) / abs(y) for x, y in zip(got, want)) <= 1e-5, (got, want)
    torch.testing.assert_close(torch.cat([a0, a1]), a_full, rtol=1e-5, atol=1e-6)
    assert a0.shape == (NH // 2,)
