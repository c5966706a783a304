"""The XOR network of the product notes: Linear 2→2, ReLU, Linear 2→1, MSE loss, SGD lr 0.1.

    python -m launch --config configs/xor.yaml          # dp = 2 on two CPU ranks

A 2-2-1 ReLU net has seeds whose hidden units die and never learn XOR; configs/xor.yaml fixes a
seed that converges (outputs within 0.1 of [0, 1, 1, 0]).
"""
import torch
import torch.nn as nn

INPUTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
TARGETS = torch.tensor([[0.0], [1.0], [1.0], [0.0]])


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))


class XorData(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return INPUTS[i], TARGETS[i]


def dataset() -> XorData:
    return XorData()
