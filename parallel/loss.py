"""Loss functions by name; each returns the mean over its micro-batch.

The mean over a global batch of equal micro-batches is the mean of the micro-batch means, so the
engine scales each micro-batch's loss by 1/m and sums (the parity contract in DESIGN.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel.config import import_object


def logits_of(output) -> torch.Tensor:
    """The prediction tensor of a model output: a tensor, a transformers ModelOutput (.logits), or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the prediction in a model output of type {type(output).__name__}; "
                    f"return a tensor, a tuple starting with it, or an object with .logits")


def cross_entropy(output, target):
    logits = logits_of(output)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


def mse(output, target):
    pred = logits_of(output)
    return F.mse_loss(pred.float(), target.float().reshape(pred.shape))


def resolve_loss(name: str):
    """"cross_entropy" | "mse" | "pkg.module:function" → loss(output, target)."""
    if name == "cross_entropy":
        return cross_entropy
    if name == "mse":
        return mse
    return import_object(name, "loss")
