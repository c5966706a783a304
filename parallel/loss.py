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


def check_class_targets(logits: torch.Tensor, target: torch.Tensor) -> None:
    """``loss: cross_entropy`` (and its vocab-parallel form) takes one integer class id per prediction
    (−100 = not scored). Soft labels — a float target per class — or ids stored as floats are refused
    naming the fix, instead of torch's "Expected input batch_size (32) to match target batch_size (2048)"."""
    per_pred = logits.numel() // max(logits.shape[-1], 1)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool or target.numel() != per_pred:
        raise ValueError(
            f"loss=cross_entropy takes integer class ids, one per prediction, classes on the logits' last dim: logits "
            f"{tuple(logits.shape)} need "
            f"targets of shape {tuple(logits.shape[:-1])} (int64; -100 = not scored), got {target.dtype} "
            f"{tuple(target.shape)}. Class ids stored as floats: return them as torch.long from data.factory. Soft "
            f"labels (a probability per class): give your own loss, loss: 'pkg.module:function' (e.g. "
            f"F.cross_entropy(logits.flatten(0, -2), probs.flatten(0, -2))), with a tp plan whose head gathers")


def cross_entropy(output, target):
    logits = logits_of(output)
    check_class_targets(logits, target)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


def mse(output, target):
    """Mean squared error over every predicted value. The target must hold one value per prediction in
    the same order: its shape equals the prediction's up to dimensions of size 1 ((B,) for (B, 1) is
    reshaped). Anything else is refused, naming both shapes: class ids (a target with 1/V of the values)
    gave torch's "shape '[2, 16, 64]' is invalid for input of size 32", and a transposed target of the
    same size, e.g. (2, 3) for (3, 2), was reshaped onto the wrong predictions without an error."""
    pred = logits_of(output)
    if target.numel() != pred.numel() or [d for d in target.shape if d != 1] != [d for d in pred.shape if d != 1]:
        hint = (" (integer class ids: use loss: cross_entropy)" if not target.is_floating_point()
                and target.numel() * max(pred.shape[-1], 1) == pred.numel() else "")
        raise ValueError(f"loss=mse needs one target value per prediction, in the prediction's shape: the model "
                         f"predicts {tuple(pred.shape)} ({pred.numel()} values) but the target is {target.dtype} "
                         f"{tuple(target.shape)} ({target.numel()} values){hint}; return targets of shape "
                         f"{tuple(pred.shape)} from data.factory, or give your own loss: 'pkg.module:function'")
    return F.mse_loss(pred.float(), target.float().reshape(pred.shape))


def resolve_loss(name: str):
    """"cross_entropy" | "mse" | "pkg.module:function" → loss(output, target)."""
    if name == "cross_entropy":
        return cross_entropy
    if name == "mse":
        return mse
    return import_object(name, "loss")
