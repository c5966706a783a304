"""Activation shapes declared ahead of the first step, so no pipeline message carries a header.

The executor (:mod:`.runtime`) learns each (src stage, dst stage) activation shape from a header on
its first message; reading it is a host sync on CUDA. Every rank runs the split's probe on the whole
model (:mod:`.split_probe`: token ids of shape P, by default (1, 4)), which records what each block
hands on. When a boundary's probe activation keeps the ids' dims — shape P + T (GPT-like
blocks: (b, s) → (b, s, h), T = (h,)) — the activation for a micro-batch of ids of shape Q is
Q + T on both ends, with no message: :func:`declared_shapes` answers the executor's ``act_shapes``
question from the stage modules a rank holds (the sender from its stage's "out", the receiver from
its stage's "in": the same probe, so both ends agree). Its dtype is the probe's unless the stage's
floating parameters were cast since (a bf16 engine): then theirs. It answers None — the first
message then carries a header as before — for a boundary whose probe activation does not keep the
ids' dims (a CNN's feature maps), a stage under sequence parallel (``seq_factor`` > 1: s/tp
positions) or without a probe (nn.Sequential splits). A wrong answer is refused by the sender
(:meth:`.messages.Messages._known`), never received silently: the receiver preallocates what was
declared, and the sender checks its tensor against the same declaration before sending.
"""
from __future__ import annotations

__all__ = ["declared_shapes"]


def _float_dtype(stage):
    return next((q.dtype for q in stage.parameters() if q.is_floating_point()), None)


def _declare(stage, side: str, sig):
    info = getattr(stage, "stage_info", None)
    if info is None or info.io is None or info.seq_factor != 1 or sig is None:
        return None
    probe_shape, io = info.io
    got = io.get(side)
    if got is None:
        return None
    shape, dtype = got
    n = len(probe_shape)
    if tuple(shape[:n]) != tuple(probe_shape) or len(sig[0]) != n:
        return None
    if dtype.is_floating_point:
        now = _float_dtype(stage)
        dtype = now if now is not None else dtype
    return tuple(sig[0]) + tuple(shape[n:]), dtype


def declared_shapes(stages: dict):
    """``act_shapes`` for :class:`.runtime.PipelineExecutor` over this rank's ``stages`` ({global
    stage index: stage module}): (src, dst, (input shape, input dtype)) → (shape, dtype) or None."""
    def act_shapes(src: int, dst: int, sig):
        if dst in stages:
            return _declare(stages[dst], "in", sig)
        if src in stages:
            return _declare(stages[src], "out", sig)
        return None
    return act_shapes
