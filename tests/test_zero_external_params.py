"""ZeRO-3 with parameters used outside their own module's forward (parallel/zero/touch.py): a Mamba-style
mixer reading its child conv's weight (transformers' Bamba / BailingHybrid: ``self.conv1d.weight.squeeze(1)``)
and a head computed in the root's forward from the embedding's weight (``h @ self.wte.weight.T``).
dp2 ZeRO-3 equals one process to 1e-5 in losses and weights; the uses became needs of the modules whose
code made them."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_ranks

V, H, S, G, STEPS = 32, 16, 8, 4, 3


class Mixer(nn.Module):
    """Reads conv1d's weight and bias in its own forward, never calling conv1d."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.linspace(0.5, 1.5, H))
        self.conv1d = nn.Conv1d(H, H, 3, groups=H, padding=2)
        self.out = nn.Linear(H, H)

    def forward(self, x):
        w = self.conv1d.weight.squeeze(1)
        y = F.conv1d(x.transpose(1, 2), w.unsqueeze(1), self.conv1d.bias, padding=2,
                     groups=self.conv1d.weight.shape[0])[..., :x.shape[1]]
        return x + self.out(y.transpose(1, 2) * self.A)


class TiedByHand(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(V, H)
        self.mixers = nn.ModuleList([Mixer(), Mixer()])
        self.norm = nn.LayerNorm(H)

    def forward(self, ids):
        x = self.wte(ids)
        for m in self.mixers:
            x = m(x)
        return self.norm(x) @ self.wte.weight.T


def _batch(t):
    g = torch.Generator().manual_seed(100 + t)
    ids = torch.randint(0, V, (G, S + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _reference():
    torch.manual_seed(0)
    model = TiedByHand()
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


def _zero3(rank, world):
    from parallel.config import ZeroConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    group = Mesh(dp=world).group("dp")
    torch.manual_seed(0)
    model = TiedByHand()
    zero = ZeroOptimizer(model, lambda ps: torch.optim.AdamW(ps, lr=1e-2), group, ZeroConfig(stage=3))
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
    s3 = zero.stage3
    unit = {id(p): u for u in s3.units for p in u.params}
    adopted = {"mixer": unit[id(model.mixers[0].conv1d.weight)] in s3.needs[model.mixers[0]],
               "root": unit[id(model.wte.weight)] in s3.needs[model]}
    with s3.gathered():
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, weights, adopted


def test_zero3_gathers_parameters_used_outside_their_module():
    want, want_w = _reference()
    res = run_ranks(_zero3, 2)
    got = [sum(r[0][t] for r in res) / len(res) for t in range(STEPS)]
    for t in range(STEPS):
        assert abs(got[t] - want[t]) <= 1e-5 * abs(want[t]), (t, got, want)
    for n, w in want_w.items():
        torch.testing.assert_close(res[0][1][n], w, rtol=1e-5, atol=1e-6, msg=n)
    assert res[0][2] == {"mixer": True, "root": True}
