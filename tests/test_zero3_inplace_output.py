"""ZeRO-3 when the caller modifies a layer's output in place (RoCBert's embeddings:
``e = self.map_inputs_layer(x); e += token_type_embeddings``): the Linear's output on a 3-D input is a view,
an in-place op on it drops the gradient hook stage 3 had put on it, and the Linear's backward ran on its freed
parameters (the zoo's roc_bert dp2 ZeRO-3: ``The size of tensor a (0) must match …``; parallel/zero/view_hooks.py).
dp2, two micro-batches per step, 3 AdamW steps: losses and weights equal to one process."""
import torch
import torch.nn as nn
from harness import run_ranks
from zero3_cases import assert_matches

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


def test_in_place_on_a_layer_output_view_keeps_its_backward_gather():
    assert_matches(Net, V, STEPS, M, run_ranks)
