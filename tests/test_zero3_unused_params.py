"""ZeRO-3 with a unit whose module holds a parameter that never gets a gradient (XLNet's attention holds
``r_s_bias`` and ``seg_embed``, used only with segment ids): the unit's "all gradients arrived" count carried
over into the next micro-batch's backward and freed the unit halfway through it (the zoo's xlnet dp2 ZeRO-3:
``The size of tensor a (0) must match …``). Two micro-batches per step at dp2 = one process."""
import torch
import torch.nn as nn
from harness import run_ranks
from zero3_cases import assert_matches

V, H, STEPS, M = 16, 8, 3, 2


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Parameter(torch.randn(H, H) * 0.3)
        self.o = nn.Parameter(torch.randn(H, H) * 0.3)
        self.seg = nn.Parameter(torch.randn(H))             # never used: never gets a gradient

    def forward(self, h):
        return h + torch.tanh(h @ self.q) @ self.o


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(V, H)
        self.blocks = nn.ModuleList(Attn() for _ in range(2))
        self.head = nn.Linear(H, V)

    def forward(self, ids):
        h = self.wte(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def test_a_parameter_without_gradient_does_not_free_its_unit_mid_backward():
    assert_matches(Net, V, STEPS, M, run_ranks, weights=False)
