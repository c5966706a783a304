"""ZeRO-3 when the caller modifies a layer's output in place (RoCBert's embeddings:
``e = self.map_inputs_layer(x); e += token_type_embeddings``): the Linear's output on a 3-D input is a view,
an in-place op on it drops the gradient hook stage 3 had put on it, and the Linear's backward ran on its freed
parameters (the zoo's roc_bert dp2 ZeRO-3: ``The size of tensor a (0) must match …``; parallel/zero/view_hooks.py).
dp2, two micro-batches per step, 3 AdamW steps: losses and weights equal to one process."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_ranks

V, H, STEPS, M = 16, 8, 3, 2


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.word, self.shape = nn.Embedding(V, H), nn.Embedding(V, 4)
        self.map = nn.Linear(H + 4, H)
        self.pos = nn.Embedding(8, H)
        self.norm = nn.LayerNorm(H)

    def forward(self, ids):
        e = torch.cat((self.word(ids), self.shape(ids)), -1)
        e = self.map(e)                                  # a view of addmm's result
        e += self.pos(torch.arange(ids.shape[1]))        # in place on that view
        return self.norm(e)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = Embed()
        self.mid = nn.Linear(H, H)
        self.head = nn.Linear(H, V)

    def forward(self, ids):
        h = self.embed(ids)
        y = self.mid(h)
        y[:, 1:] *= 0.5                                  # in place through a view of the output
        return self.head(torch.tanh(y) + h)


def _batch(t, mb):
    return torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(10 * t + mb))


def _loss(model, x):
    return F.cross_entropy(model(x).flatten(0, 1), ((x + 1) % V).flatten())


def _reference():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = []
    for t in range(STEPS):
        opt.zero_grad()
        total = 0.0
        for mb in range(M):
            loss = _loss(model, _batch(t, mb)) / M
            loss.backward()
            total += loss.item()
        opt.step()
        out.append(total)
    return out, {n: p.detach().clone() for n, p in model.named_parameters()}


def _zero3(rank, world):
    from parallel.config import ZeroConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    torch.manual_seed(0)
    model = Net()
    zero = ZeroOptimizer(model, lambda ps: torch.optim.AdamW(ps, lr=1e-2), Mesh(dp=world).group("dp"),
                         ZeroConfig(stage=3))
    out = []
    for t in range(STEPS):
        zero.zero_grad()
        zero.prepare_step(M)
        total = 0.0
        for mb in range(M):
            x = _batch(t, mb)[2 * rank:2 * rank + 2]
            loss = _loss(model, x) / M
            (loss * zero.loss_scale).backward()
            total += loss.item()
        zero.step()
        out.append(total)
    with zero.stage3.gathered():
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out, weights


def test_in_place_on_a_layer_output_view_keeps_its_backward_gather():
    want, ref = _reference()
    res = run_ranks(_zero3, 2, timeout=120)
    got = [(a + b) / 2 for a, b in zip(res[0][0], res[1][0])]
    for t in range(STEPS):
        assert abs(got[t] - want[t]) <= 1e-5 * abs(want[t]), (t, got, want)
    for n, w in ref.items():
        torch.testing.assert_close(res[0][1][n], w, rtol=1e-5, atol=1e-6, msg=n)
