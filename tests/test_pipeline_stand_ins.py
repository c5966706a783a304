"""The pipeline split's stand-ins and its plan-time check, process-free: code that reads a stand-in's
metadata (``self.embed.weight.device``, ``self.head.weight.dtype``: Llama 4, Mamba 2) splits exactly; code
that computes with another stage's values, reads what a stand-in lacks, or reads the input ids after the
blocks is refused when the split is planned, on every pipeline rank, naming the cause."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.loss import cross_entropy
from parallel.pipeline.split import describe_split, split_model
from parallel.pipeline.stand_ins import Described

VOCAB, HIDDEN = 32, 16


class _Net(nn.Module):
    """Embedding, 4 linear blocks, norm, head; ``after`` picks what the code after the blocks does."""

    def __init__(self, after: str = "dtype"):
        super().__init__()
        self.after = after
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh()) for _ in range(4))
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.ids_bias = nn.Embedding(VOCAB, 1)
        self.head.tag = object()                              # not metadata: a stand-in does not carry it

    def forward(self, x):
        h = self.emb(x.to(self.emb.weight.device))           # Llama 4: reads the embedding's device
        for b in self.blocks:
            h = b(h) if self.after != "between" else torch.tanh(b(h))
        h = self.norm(h)
        if self.after == "dtype":                            # Mamba 2: casts to the head's dtype
            return self.head(h.to(self.head.weight.dtype)) * (self.head.out_features / VOCAB)
        if self.after == "tied_values":                      # computes with stage 0's embedding weights
            return self.head(h) + F.linear(h, self.emb.weight).sum(-1, keepdim=True)
        if self.after == "ids":                              # reads the ids, which later stages see as zeros
            return self.head(h) + self.ids_bias(x).reshape(*x.shape, 1)
        if self.after == "between":                          # changes the hidden state between blocks
            return self.head(h)
        if self.after == "rescale":                          # RWKV: the training mode touches every block's weights
            if self.training:
                self.blocks[-1][0].weight.mul_(1.0)
            return self.head(h)
        if self.after == "tag":
            assert self.head.tag is not None
            return self.head(h)
        raise ValueError(self.after)


def _stages(model, p):
    return sorted((st for r in range(p) for st in split_model(model, r, p)), key=lambda s: s.stage_info.index)


@pytest.mark.parametrize("p", [2, 4])
def test_metadata_reads_split_exactly(p):
    """Outputs and gradients of the chained stages = the whole model's, bit for bit."""
    torch.manual_seed(0)
    model = _Net("dtype")
    x = torch.randint(0, VOCAB, (2, 6))
    y = torch.randint(0, VOCAB, (2, 6))
    cross_entropy(model(x), y).backward()
    want = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    model.zero_grad(set_to_none=True)
    stages = _stages(model, p)
    later = stages[-1].emb                                    # the last stage's stand-in for the embedding
    assert isinstance(later.weight, Described) and later.weight.shape == model.emb.weight.shape
    assert stages[0].head.out_features == VOCAB and isinstance(stages[0].head.weight, Described)
    ins, outs, h = [], [], x
    for st in stages:
        h = h.detach().requires_grad_(h.is_floating_point())
        ins.append(h)
        outs.append(h := st(h))
    assert torch.equal(h, model(x))
    cross_entropy(h, y).backward()
    for k in range(len(stages) - 2, -1, -1):
        outs[k].backward(ins[k + 1].grad)
    got = {n: q.grad for st in stages for n, q in st.named_parameters() if q.grad is not None}
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("after, match", [     # silent wrong numbers before the plan-time check
    ("tied_values", r"stage 1 of 2 .*computes with `emb\.weight`.*live on stage 0.*parallel\.pp=1"),
    ("ids", r"differ from the whole model's by .*input ids.*parallel\.pp=1"),
    ("between", r"differ from the whole model's by .*parallel\.pp=1"),
    ("rescale", r"stage 0 of 2 .*\(training mode, .*parallel\.pp=1"),
    ("tag", r"stage 0 of 2 .*reads `head\.tag`, but head lives on stage 1.*parallel\.pp=1"),
])
def test_refused_when_planned_on_every_rank(after, match):
    torch.manual_seed(0)
    model = _Net(after)
    with pytest.raises(ValueError, match=match):
        describe_split(model, 2)
    for r in (0, 1):
        with pytest.raises(ValueError, match=match):
            split_model(model, r, 2)


def test_a_described_tensor_holds_no_values():
    d = Described(torch.ones(3, 2), "head.weight", "stage 1")
    assert (d.shape, d.dtype, d.device) == ((3, 2), torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"`head\.weight` .*live on stage 1"):
        d + 1
    with pytest.raises(RuntimeError, match=r"`head\.weight`"):
        torch.zeros(2, 3) @ d
