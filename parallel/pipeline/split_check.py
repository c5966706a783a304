"""The pipeline split's plan-time check: every stage of the plan run once, in order, on one process.

Stage k of a split runs the model's own forward over stand-ins (:mod:`.stage`, :mod:`.stand_ins`), so what the
model's code does outside its blocks decides whether the stages compute what the whole model computes. Before
any rank trains, :func:`check_stages` builds all S stages of the plan, feeds stage 0 the probe input and stage
k > 0 the output of stage k − 1 (what the pipeline sends), and compares the last stage's logits with the whole
model's on the same input (eval mode, no gradients):

    max |z_chain − z_model| ≤ RTOL · max |z_model|

A stage that raises (code reading a value another stage owns, a stand-in lacking an attribute) or a mismatch
(code after the blocks that recomputes something from the input ids the later stages rebuild as zeros) is a
ValueError naming the stage and the cause — on every rank, since every rank plans the same split, so none
trains and none waits on a failed peer. The probe's token ids are 1, 2, …, n (below the smallest embedding's
vocabulary) rather than zeros, so code that reads the ids' values (padding masks) differs from its stand-in.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from parallel.comm import Group, all_reduce
from parallel.loss import logits_of
from parallel.pipeline.stage import build_stage

__all__ = ["check_stages", "RTOL"]

RTOL = 1e-5


def _ids_like(model: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    """Token ids 1..n of ``sample``'s shape (wrapped below the smallest nn.Embedding vocabulary), or
    ``sample`` itself when it is not a tensor of integer ids."""
    if not isinstance(sample, torch.Tensor) or sample.is_floating_point() or sample.any():
        return sample
    vocab = min((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), default=2)
    ids = torch.arange(1, sample.numel() + 1, device=sample.device).remainder_(max(vocab - 1, 1)).add_(1)
    return ids.reshape(sample.shape).to(sample.dtype) if vocab > 1 else sample


def check_stages(model: nn.Module, plan, owners: dict, probe: dict, sample) -> None:
    """Run the S stages of ``plan`` in sequence on ``sample`` and compare with ``model(sample)``; raise a
    ValueError naming the stage and the cause when a stage fails or the logits differ (see the module doc)."""
    S = plan.n_stages
    if S < 2 or plan.kind != "model":
        return
    x0, name = _ids_like(model, sample), type(model).__name__
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            want = logits_of(model(x0))
            stages = [build_stage(model, plan, owners, probe, k) for k in range(S)]
            x = _chain(stages, x0, False, plan, name)
            # the training mode's code paths too (RWKV rescales every block's weights when its mode flips): values
            # not compared (dropout); RNG and buffers (BatchNorm statistics) left as they were
            bufs = [(b, b.detach().clone()) for b in model.buffers()]
            with torch.random.fork_rng(devices=[]):
                try:
                    _chain(stages, x0, True, plan, name)
                finally:
                    for b, v in bufs:
                        b.copy_(v)
            del stages
    finally:
        for m, t in modes.items():
            m.training = t
    if not isinstance(want, torch.Tensor) or want.is_meta or not isinstance(x, torch.Tensor):
        return
    if x.shape != want.shape:
        raise ValueError(f"pipeline split: the {S} stages of {name} return logits of shape {tuple(x.shape)}, "
                         f"the whole model {tuple(want.shape)}; set parallel.pp=1 for this model")
    err, scale = _agreed(model, *_error(x, want))
    if not err <= RTOL * max(scale, 1e-30):
        raise ValueError(
            f"pipeline split: the {S} stages of {name}, run in sequence on a probe input, give logits that differ "
            f"from the whole model's by {err:.3g} (largest |logit| {scale:.3g}): its code outside the blocks depends "
            "on what later stages rebuild (input ids, which they see as zeros, or values computed before the first "
            "block) — splitting it would train on wrong numbers. Set parallel.pp=1 for this model")


def _chain(stages: list, x, training: bool, plan, name: str):
    """The stages run in sequence from ``x`` in training or eval mode; a stage that raises is a ValueError."""
    S, seq = len(stages), x.shape[1] if x.dim() > 1 else None
    for k, stage in enumerate(stages):
        stage.train(training)
        info = getattr(stage, "stage_info", None)
        if k and info is not None and seq and x.dim() > 2 and x.shape[1] < seq and seq % x.shape[1] == 0:
            info.seq_factor = seq // x.shape[1]     # region SP: s/tp positions arrive (as the engine sets it)
        try:
            x = stage(x)
        except Exception as e:
            raise ValueError(
                f"pipeline split: stage {k} of {S} of {name} fails when run alone on a probe input "
                f"({'training' if training else 'eval'} mode, blocks {plan.bounds[k][0]}..{plan.bounds[k][1] - 1}; "
                f"the modules other stages own are stand-ins): {type(e).__name__}: {' '.join(str(e).split())[:600]}"
                + ("" if "parallel.pp=1" in str(e) else " — set parallel.pp=1 for this model")) from e
    return x


def _error(x: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |x − want| where they differ — equal infinities, a padded vocabulary's −inf logits, count as equal,
    NaN if only one side is not finite; the largest finite |want|)."""
    d = (x.double() - want.double()).abs().masked_fill(x == want, 0.0)
    fin = want.isfinite()
    scale = want.double()[fin].abs().max().item() if fin.any() else 1.0
    return (float("nan") if d.isnan().any() else d.max().item()), scale


def _agreed(model: nn.Module, err: float, scale: float) -> tuple[float, float]:
    """The worst error over the model's tensor-parallel groups (its parallel layers' ``group``): a rank holding a
    vocabulary shard sees only its logits, and every rank must reach the same verdict (none trains alone)."""
    groups = {}
    for m in model.modules():
        g = getattr(m, "group", None)
        if isinstance(g, Group) and g.size > 1:
            groups.setdefault((g.axis, tuple(g.ranks)), g)
    if not groups:
        return err, scale
    t = torch.tensor([1.0 if err != err else 0.0, 0.0 if err != err else err, scale], dtype=torch.float64)
    for key in sorted(groups):
        all_reduce(t, groups[key].control(), op="max")
    return (float("nan") if t[0] > 0 else t[1].item()), t[2].item()
