"""ZeRO-3, a ModuleList of experts that every rank calls in full in the first forward and partly later
(parallel/zero/fanout.py): the experts' parent must be a region from the second forward on, or a rank that
leaves an expert out pairs other all-gathers than its peer (a hang, or experts of equal size silently mixed).
A block stack (a chain: each block's input is the previous block's output) must not become a region. dp2,
3 AdamW steps: losses and weights equal to one process to 1e-5."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_ranks

V, H, E, STEPS = 16, 8, 4, 3
# step 0: both ranks' rows hold ids of every residue mod 4 (every expert called on every rank);
# step 1: rank 1 has no id ≡ 3; step 2: rank 0 has no id ≡ 0 and rank 1 none ≡ 1
BATCHES = [[[0, 1, 2, 3, 4, 5], [7, 6, 5, 4, 0, 1]],
           [[3, 2, 1, 0, 7, 6], [1, 2, 5, 6, 9, 10]],
           [[1, 2, 3, 5, 6, 7], [0, 2, 3, 4, 6, 7]]]


class Experts(nn.Module):
    """Expert e serves the tokens whose id ≡ e (mod E); only experts with tokens are called."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(H, H) for _ in range(E))

    def forward(self, h, ids):
        out = torch.zeros_like(h)
        for e in torch.unique(ids % E).tolist():
            sel = ids % E == e
            out[sel] = self.experts[e](h[sel])
        return h + out


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H, H)
        self.moe = Experts()

    def forward(self, h, ids):
        return self.moe(torch.tanh(self.lin(h)), ids)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(V, H)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(H, V)

    def forward(self, ids):
        h = self.wte(ids)
        for b in self.blocks:
            h = b(h * 0.9, ids)                 # an op between the blocks: still a chain
        return self.head(h)


def _loss(model, ids):
    return F.cross_entropy(model(ids).flatten(0, 1), ((ids + 1) % V).flatten())


def _reference():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for rows in BATCHES:
        opt.zero_grad()
        loss = _loss(model, torch.tensor(rows))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _zero3(rank, world):
    from parallel.config import ZeroConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    torch.manual_seed(0)
    model = Net()
    zero = ZeroOptimizer(model, lambda ps: torch.optim.AdamW(ps, lr=1e-2), Mesh(dp=world).group("dp"),
                         ZeroConfig(stage=3))
    losses = []
    for rows in BATCHES:
        zero.zero_grad()
        zero.prepare_step(1)
        loss = _loss(model, torch.tensor(rows[rank:rank + 1]))
        (loss * zero.loss_scale).backward()
        zero.step()
        losses.append(loss.item())
    with zero.stage3.gathered():
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, weights, dict(zero.stage3.regions)


def test_experts_all_called_first_then_partly_are_a_region():
    want, ref = _reference()
    res = run_ranks(_zero3, 2, timeout=120)
    got = [(a + b) / 2 for a, b in zip(res[0][0], res[1][0])]
    for t in range(STEPS):
        assert abs(got[t] - want[t]) <= 1e-5 * abs(want[t]), (t, got, want)
    for n, w in ref.items():
        torch.testing.assert_close(res[0][1][n], w, rtol=1e-5, atol=1e-6, msg=n)
    regions = res[0][2]
    assert sorted(regions) == ["blocks.0.moe", "blocks.1.moe"], regions     # the chained stack is none
    assert "not as a chain" in regions["blocks.0.moe"], regions
