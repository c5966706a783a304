"""Progressive Layer Dropping (Zhang & He, "Accelerating Training of Transformer-Based Language
Models with Progressive Layer Dropping", arXiv 2010.13369).

At optimizer step t the global keep probability falls from 1 towards θ̄ and is scaled by depth,
block l = 1 … L (the model's repeated blocks, the pipeline split's body, in order):

    θ(t)   = (1 − θ̄)·exp(−γ·t) + θ̄                 (θ̄ = ``pld.theta``, γ = ``pld.gamma``)
    p_l(t) = 1 − (l / L)·(1 − θ(t))                   (lower blocks are kept more often)

Block l is kept at step t iff u < p_l(t), u ~ U[0, 1) drawn from a generator seeded with
(``train.seed``, t, l) alone: the decision depends on nothing about the layout, so every dp, tp and
pp rank (and a single process) drops the same blocks for every micro-batch of the step. A dropped
block is skipped in forward and backward: it returns its input hidden state (a pipeline stage
passes it on unchanged) plus 0·(one element of each of its trainable parameters), so its
parameters get an all-zero gradient — every dp rank's reducer sees the gradients it expects and the
optimizer sees the same zero gradient a single process with this module sees (AdamW still decays
and moves by momentum, identically everywhere). No rescaling of kept blocks (the paper's form).
Only in training mode; eval keeps every block.

Implementation: each block's class is swapped for a subclass whose ``forward`` asks the shared
:class:`LayerDrop` (names, state dict, hooks and the pipeline's deepcopy are unchanged). Blocks must
take the hidden state as their first argument (or ``hidden_states=``) and return a tensor or a tuple
starting with it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from parallel.pipeline import find_body

__all__ = ["LayerDrop", "apply_layer_drop"]

_CLASSES: dict = {}


class LayerDrop:
    """The shared schedule; ``step`` is set by the engine (or the user's loop) before each forward."""

    def __init__(self, theta: float, gamma: float, seed: int, n_blocks: int):
        if not 0.0 < theta <= 1.0:
            raise ValueError(f"pld.theta={theta} must be in (0, 1] (the keep probability it decays to)")
        if not gamma >= 0.0:
            raise ValueError(f"pld.gamma={gamma} must be >= 0 (the decay rate per step)")
        self.theta, self.gamma, self.seed, self.n = theta, gamma, int(seed), n_blocks
        self.step = 0
        self.dropped_count = 0          # blocks skipped (this process, all forwards)

    def __deepcopy__(self, memo):
        return self                     # one schedule for every stage copy

    def theta_t(self, t: int) -> float:
        return (1.0 - self.theta) * math.exp(-self.gamma * t) + self.theta

    def keep_prob(self, t: int, layer: int) -> float:
        """p_l(t) for the 0-based block index ``layer`` (l = layer + 1)."""
        return 1.0 - (layer + 1) / self.n * (1.0 - self.theta_t(t))

    def keeps(self, t: int, layer: int) -> bool:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + t) * 10_007 + layer)
        return float(torch.rand((), generator=g)) < self.keep_prob(t, layer)

    def dropped(self, t: int) -> list:
        """The 0-based indices of the blocks dropped at step t."""
        return [i for i in range(self.n) if not self.keeps(t, i)]


def _drop_class(cls):
    if cls not in _CLASSES:
        def forward(self, *args, **kwargs):
            pld = self._pld
            if not self.training or pld.keeps(pld.step, self._pld_index):
                return cls.forward(self, *args, **kwargs)
            pld.dropped_count += 1
            h = args[0] if args else kwargs["hidden_states"]
            ps = [p for p in self.parameters() if p.requires_grad and p.numel()]
            if ps and torch.is_grad_enabled():
                h = h + sum(p.reshape(-1)[0] for p in ps).to(h.dtype) * 0.0
            return h
        _CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                   "__qualname__": cls.__qualname__, "_pld_base": cls})
    return _CLASSES[cls]


def apply_layer_drop(model: nn.Module, theta: float, gamma: float, seed: int) -> LayerDrop:
    """Make the model's repeated blocks (:func:`parallel.pipeline.find_body`) droppable; returns the
    schedule, whose ``step`` the training loop sets to the optimizer step before each forward."""
    try:
        body = find_body(model)[1]
    except ValueError as e:
        raise ValueError(f"pld.enabled: progressive layer dropping needs repeated blocks: {e}") from None
    pld = LayerDrop(theta, gamma, seed, len(body))
    for i, blk in enumerate(body):
        base = getattr(type(blk), "_pld_base", type(blk))
        blk.__class__ = _drop_class(base)
        blk._pld, blk._pld_index = pld, i
    return pld
