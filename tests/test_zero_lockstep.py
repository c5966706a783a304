"""ZeRO-3's first forward in lockstep (parallel/zero/lockstep.py), at dp2 on gloo ranks.

* A ModuleList of experts of which the two ranks call different ones in the very first forward (before any
  region exists): the gathers would pair different units (a hang or mixed parameters). The lockstep check finds
  it, the experts' parent becomes a region, the forward runs again from the same RNG state and buffers: losses
  and weights = one process (dropout before the layer checks the RNG restore).
* The model's own forward calls a different module on each rank: there is no parent to gather as one, so every
  rank raises the same error at the same point (no rank waits on the other).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_ranks

V, H, E, STEPS = 16, 8, 4, 3


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
        return out


class Net(nn.Module):
    def __init__(self, per_rank_head=False):
        super().__init__()
        self.wte = nn.Embedding(V, H)
        self.moe = Experts()
        self.heads = nn.ModuleList(nn.Linear(H, V) for _ in range(2 if per_rank_head else 1))
        self.per_rank_head = per_rank_head

    def forward(self, ids, rank=0):
        h = F.dropout(self.wte(ids), 0.1, self.training)    # drawn before the restart: the RNG is restored
        h = h + self.moe(h, ids)
        return self.heads[rank if self.per_rank_head else 0](h)


def _batches():
    # rank 0's half uses ids ≡ 0, 1 (mod 4) in step 0, rank 1's ids ≡ 2, 3: different experts from the first forward
    return [torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7]]), torch.tensor([[1, 5, 9, 2], [3, 7, 3, 7]]),
            torch.tensor([[0, 4, 8, 12], [1, 2, 5, 6]])]


def _reference():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for t, ids in enumerate(_batches()):
        opt.zero_grad()
        outs = []
        for r in range(2):                                     # each sample's dropout seeded as on its rank
            torch.manual_seed(100 * t + r)
            outs.append(model(ids[r:r + 1]))
        loss = sum(F.cross_entropy(o[0], (ids[r] + 1) % V) for r, o in enumerate(outs)) / 2
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _zero3(rank, world, per_rank_head=False):
    from parallel.config import ZeroConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    group = Mesh(dp=world).group("dp")
    torch.manual_seed(0)
    model = Net(per_rank_head)
    zero = ZeroOptimizer(model, lambda ps: torch.optim.AdamW(ps, lr=1e-2), group, ZeroConfig(stage=3))
    losses = []
    for t, ids in enumerate(_batches()):
        torch.manual_seed(100 * t + rank)
        zero.zero_grad()
        zero.prepare_step(1)
        try:
            loss = F.cross_entropy(model(ids[rank:rank + 1], rank)[0], (ids[rank] + 1) % V)
        except RuntimeError as e:
            return "raised", str(e)
        (loss * zero.loss_scale).backward()
        zero.step()
        losses.append(loss.item())
    with zero.stage3.gathered():
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, weights, sorted(zero.stage3.regions), zero.stage3.restarts


def test_first_forward_divergence_becomes_a_region_and_stays_exact():
    want, want_w = _reference()
    res = run_ranks(_zero3, 2, timeout=120)
    got = [(res[0][0][t] + res[1][0][t]) / 2 for t in range(STEPS)]
    for t in range(STEPS):
        assert abs(got[t] - want[t]) <= 1e-5 * abs(want[t]), (t, got, want)
    for n, w in want_w.items():
        torch.testing.assert_close(res[0][1][n], w, rtol=1e-5, atol=1e-6, msg=n)
    assert res[0][2:] == res[1][2:] == (["moe"], 1)          # found by the lockstep check, one restart


def test_divergence_in_the_models_own_forward_raises_on_every_rank():
    res = run_ranks(_zero3, 2, True, timeout=120)
    for kind, msg in res:
        assert kind == "raised", res
        assert "dp ranks called different modules" in msg and "zero.units: block, or zero.stage" in msg, msg
