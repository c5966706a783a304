"""A small convolutional classifier on synthetic images: the example that is not a language model.

    python -m launch --config configs/cnn_dp2.yaml        # dp = 2, BatchNorm synchronised

The model is an ``nn.Sequential`` the pipeline split cuts between its children (each child is one
class, so no inner stack is mistaken for the body; see parallel/pipeline/split.py ``find_body``):

    Stem      conv 3×3 (in → C), BatchNorm2d(C), ReLU
    ConvBlock × n_blocks:   x + ReLU(BatchNorm2d(conv 3×3 (C → C, no bias)(x)))
    Head      global average pool, Linear(C → n_classes)

BatchNorm's batch statistics make the numbers depend on which samples share a forward: with dp > 1
set ``parallel.sync_batchnorm: true`` and one micro-batch per dp rank to match one process with the
global batch (parallel/data_parallel/sync_batchnorm.py). Data: ``shapes`` draws one fixed random
template per class and returns template + Gaussian noise, so the classes are learnable.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Stem(nn.Module):
    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class ConvBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


class Head(nn.Module):
    def __init__(self, channels: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, n_classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


def build(in_channels: int = 3, channels: int = 8, n_blocks: int = 4, n_classes: int = 4) -> nn.Sequential:
    return nn.Sequential(Stem(in_channels, channels), *[ConvBlock(channels) for _ in range(n_blocks)],
                         Head(channels, n_classes))


class Shapes(torch.utils.data.Dataset):
    """Sample i: class y = i mod n_classes (with a seeded shuffle), image = template[y] + noise·N(0, 1)."""

    def __init__(self, n: int, size: int, in_channels: int, n_classes: int, noise: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        templates = torch.randn(n_classes, in_channels, size, size, generator=g)
        self.y = torch.randperm(n, generator=g) % n_classes
        self.x = templates[self.y] + noise * torch.randn(n, in_channels, size, size, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def shapes(n: int = 256, size: int = 8, in_channels: int = 3, n_classes: int = 4, noise: float = 1.0,
           seed: int = 0) -> Shapes:
    return Shapes(n, size, in_channels, n_classes, noise, seed)
