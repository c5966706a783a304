"""A forward that reduces a column-parallel output along its features is refused at plan time
(parallel/tensor_parallel/reductions.py): per rank the statistic would cover 1/tp of the features.

Found by the model zoo: Gemma-3n's MLP sparsifies its gate with a Gaussian top-k (mean and std over the
intermediate features); under its published plan (gate/up colwise, down rowwise) tp2 trained to losses 1e-3
relative off one process with no error. Process-free: a fake group of the size, no ranks.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.tensor_parallel.plan import apply_tensor_parallel
from parallel.tensor_parallel.reductions import split_reduction


def _fake(size=2):
    from parallel.comm import Group
    return Group(None, "tp", tuple(range(size)), 0)


class TopKMLP(nn.Module):
    """Gemma-3n's sparse gate: relu(g − (mean(g) + std(g)·1.645)) over the features, in a helper method."""

    def __init__(self, h=16, f=32):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, f), nn.Linear(h, f), nn.Linear(f, h)

    def forward(self, x):
        gate = self.gate_proj(x)
        gate = self._sparse(gate)
        return self.down_proj(F.gelu(gate) * self.up_proj(x))

    def _sparse(self, g):
        cutoff = torch.mean(g, dim=-1, keepdim=True) + g.std(-1, keepdim=True) * 1.645
        return F.relu(g - cutoff)


class NormedMLP(nn.Module):
    """A softmax over the split features, inline."""

    def __init__(self, h=16, f=32):
        super().__init__()
        self.up, self.down = nn.Linear(h, f), nn.Linear(f, h)

    def forward(self, x):
        return self.down(self.up(x).softmax(dim=-1))


class HeadsAttention(nn.Module):
    """Reductions after the split features are reshaped into heads (softmax over keys): exact, not refused."""

    def __init__(self, h=16, heads=4):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))
        self.heads = heads

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        w = (q @ k.transpose(-1, -2)).softmax(dim=-1)
        y = (w @ v).transpose(1, 2).reshape(b, t, -1)
        return self.o(y * y.mean(dim=1, keepdim=True))     # a mean over positions: not the features


@pytest.mark.parametrize("cls,split,row,line", [
    (TopKMLP, {"gate_proj", "up_proj"}, {"down_proj"}, "torch.mean(g, dim=-1"),
    (NormedMLP, {"up"}, {"down"}, "softmax(dim=-1)"),
])
def test_reduction_over_split_features_found(cls, split, row, line):
    where = split_reduction(cls, split, row)
    assert where is not None and line in where, where


def test_reshaped_or_other_dims_not_reported():
    assert split_reduction(HeadsAttention, {"q", "k", "v"}, {"o"}) is None


def test_plan_refuses_naming_the_line():
    with pytest.raises(ValueError, match=r"TopKMLP's forward reduces the output of a layer split across tp ranks "
                                         r"along its features \(TopKMLP._sparse line \d+: `cutoff = torch.mean"):
        apply_tensor_parallel(nn.Sequential(TopKMLP()), _fake(2),
                              {"0.gate_proj": "colwise", "0.up_proj": "colwise", "0.down_proj": "rowwise"})
    apply_tensor_parallel(nn.Sequential(HeadsAttention()), _fake(2),   # converts (checked only: no ranks)
                          {"0.q": "colwise", "0.k": "colwise", "0.v": "colwise", "0.o": "rowwise"})


def test_transformers_gemma3n_mlp_refused_llama_not():
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextMLP
    from transformers.models.llama.modeling_llama import LlamaMLP
    assert "_gaussian_topk" in split_reduction(Gemma3nTextMLP, {"gate_proj", "up_proj"}, {"down_proj"})
    assert split_reduction(LlamaMLP, {"gate_proj", "up_proj"}, {"down_proj"}) is None
