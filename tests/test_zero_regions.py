"""ZeRO-3 with modules called a data-dependent number of times (parallel/zero/regions.py).

transformers' DBRX runs its expert GLU module once per expert its tokens were routed to; with per-module
gathers the two dp ranks then ran different module sequences, the rank that departed from its trace stopped
prefetching, and all-gathers of different units were paired (the zoo's dbrx dp2 ZeRO-3 hang). Both MoE forms
here — a DBRX-style loop calling one module per hit expert, and a ModuleList of experts of which only the hit
ones are called — must equal one process to 1e-5 (losses and weights) at dp2 ZeRO-3, with the ranks' routing
actually differing, and the layer found as a region. The ModuleList form also diverges in the very first forward
(the ranks call different experts before any region exists): the lockstep first forward finds it and runs again.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_ranks

V, H, E, FF, S, G, STEPS = 32, 16, 4, 16, 4, 4, 4


class GLU(nn.Module):
    """Holds every expert's weights; called once per hit expert with that expert's slices (DbrxExpertGLU)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E * FF, H) * 0.2)
        self.w2 = nn.Parameter(torch.randn(E * FF, H) * 0.2)

    def forward(self, x, w1, w2):
        return F.silu(x @ w1.T) @ w2


class LoopExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = GLU()

    def forward(self, x, idx):
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():                    # only the hit experts: data-dependent
            tok = torch.where(idx == e)[0]
            w1, w2 = self.mlp.w1.view(E, FF, H)[e], self.mlp.w2.view(E, FF, H)[e]
            out = out.index_add(0, tok, self.mlp(x[tok], w1, w2))
        return out


class ListExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(H, FF), nn.SiLU(), nn.Linear(FF, H)) for _ in range(E))

    def forward(self, x, idx):
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok = torch.where(idx == e)[0]
            out = out.index_add(0, tok, self.experts[e](x[tok]))
        return out


class MoE(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = LoopExperts() if kind == "loop" else ListExperts()
        self.hits = []

    def forward(self, h):
        x = h.reshape(-1, H)
        p = self.router(x).softmax(-1)
        w, idx = p.max(-1)                                      # top-1
        self.hits.append(tuple(torch.unique(idx).tolist()))
        return h + (self.experts(x, idx) * w[:, None]).view_as(h)


class Block(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.norm, self.moe = nn.LayerNorm(H), MoE(kind)

    def forward(self, h):
        return self.moe(self.norm(h))


class Net(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.wte = nn.Embedding(V, H)
        self.blocks = nn.ModuleList(Block(kind) for _ in range(2))
        self.head = nn.Linear(H, V)

    def forward(self, ids):
        h = self.wte(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _batch(t):
    g = torch.Generator().manual_seed(100 + t)
    ids = torch.randint(0, V, (G, S + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _reference(kind):
    torch.manual_seed(0)
    model = Net(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for t in range(STEPS):
        x, y = _batch(t)
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _zero3(rank, world, kind, unit_mb=0.0):
    from parallel.config import ZeroConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    group = Mesh(dp=world).group("dp")
    torch.manual_seed(0)
    model = Net(kind)
    zero = ZeroOptimizer(model, lambda ps: torch.optim.AdamW(ps, lr=1e-2), group, ZeroConfig(stage=3, unit_mb=unit_mb))
    per = G // world
    losses = []
    for t in range(STEPS):
        x, y = _batch(t)
        zero.zero_grad()
        zero.prepare_step(1)
        loss = _loss(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        (loss * zero.loss_scale).backward()
        zero.step()
        losses.append(loss.item())
    with zero.stage3.gathered():
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, weights, dict(zero.stage3.regions), [b.moe.hits for b in model.blocks]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loop", "list"])
def test_zero3_data_dependent_expert_calls(kind):
    want, want_w = _reference(kind)
    res = run_ranks(_zero3, 2, kind, timeout=120)
    got = [sum(r[0][t] for r in res) / len(res) for t in range(STEPS)]
    for t in range(STEPS):
        assert abs(got[t] - want[t]) <= 1e-5 * abs(want[t]), (t, got, want)
    for n, w in want_w.items():
        torch.testing.assert_close(res[0][1][n], w, rtol=1e-5, atol=1e-6, msg=n)
    # the case is exercised: the two ranks' routing hit different experts in some forward
    assert res[0][3] != res[1][3]
    assert sorted(res[0][2]) == ["blocks.0.moe.experts", "blocks.1.moe.experts"], res[0][2]


def _merged(rank, world, kind):
    from parallel.config import ConfigError
    try:
        _zero3(rank, world, kind, 0.004)          # 1048 elements: units merged across the experts' region edges
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_merged_units_in_a_region_are_refused():
    """zero.unit_mb (issue 18) with data-dependent calls: a region holding a merged unit (the ModuleList's small
    experts merge) is refused on every rank, naming the region and the fix."""
    for msg in run_ranks(_merged, 2, "list", timeout=120):
        assert msg and "blocks.0.moe.experts" in msg and "set zero.unit_mb: 0" in msg, msg


def _found(model, *args):
    """The regions CallRecorder finds in one forward of ``model`` (one process, no ranks)."""
    from parallel.zero.regions import CallRecorder
    holders = {m for m in model.modules() if any(p.requires_grad for p in m.parameters())}
    rec = CallRecorder(model, holders.__contains__)
    model(*args)
    rec.remove()
    names = {m: n for n, m in model.named_modules()}
    return {names[m]: why for m, why in rec.regions.items()}


class Dense(nn.Module):
    """A plain block stack: every block called once, in order — no region."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(V, H)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(H, H), nn.ReLU()) for _ in range(3))

    def forward(self, ids):
        h = self.wte(ids)
        for b in self.blocks:
            h = b(h)
        return h


def test_regions_found_for_data_dependent_calls():
    """One process, no ranks: a loop over a module (DBRX) and a partly called ModuleList of experts each make a
    region; a plain block stack makes none."""
    torch.manual_seed(0)
    x = torch.randint(0, V, (2, S))
    found = _found(Net("loop"), x)
    assert sorted(found) == ["blocks.0.moe.experts", "blocks.1.moe.experts"], found
    assert all(w.startswith("calls GLU ") and w.endswith(" times in one forward") for w in found.values()), found
    got = _found(LoopExperts(), torch.randn(4, H), torch.tensor([0, 2, 2, 0]))
    assert got == {"": "calls GLU 2 times in one forward"}
    assert _found(ListExperts(), torch.randn(4, H), torch.tensor([1, 1, 3, 3])) == {
        "": "calls 2 of the 4 modules of .experts"}
    assert _found(Dense(), x) == {}
