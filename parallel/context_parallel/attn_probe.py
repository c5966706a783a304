"""Does the model's attention reach the cp attention at all? Asked at setup (:meth:`.ContextParallel.prepare`),
before any step: a model that computes its attention in its own code — Bloom adds ALiBi biases to q·kᵀ by
``alibi.baddbmm`` (arXiv 2108.12409), not through transformers' attention functions or
``scaled_dot_product_attention`` — would attend within each rank's shard only (and unmasked), a silent wrong
number (Bloom cp 2: 7.5e-5 off one process by step 3). :meth:`.ContextParallel.active` refused it only at the
end of the first step, after a forward and backward had run.

The probe: one forward of a (1, 8) input on the unconverted model (eval, no grad, RNG and buffers restored:
:func:`.doc_probe.quiet`) with a counting context on the stack that computes each attention call it receives
locally (a cp "group" of one).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from parallel.context_parallel.doc_probe import _vocab, quiet

__all__ = ["reaches_cp_attention", "alibi_note"]


def reaches_cp_attention(model: nn.Module, probe) -> bool | None:
    """True when a forward of ``model`` calls the attention a cp context routes, False when it makes no such call,
    None when the probe cannot tell (parameters on meta, no token embedding, a forward that fails on the probe).
    ``probe``: a context (:class:`.context.ContextParallel` over a group of one, computing each call locally)
    whose ``active()`` routes the model's attention and whose ``calls`` counts it."""
    if any(p.is_meta for p in model.parameters()) or not _vocab(model):
        return None
    dev = next(model.parameters()).device
    pos = torch.arange(8, device=dev)
    try:
        with quiet(model), probe.active():
            model(((pos * 7 + 3) % _vocab(model))[None], position_ids=pos[None])
    except Exception:                                # no verdict: the first step's check still stands
        return None
    return probe.calls > 0


def alibi_note(model: nn.Module) -> str:
    """" (its attention adds ALiBi biases …)" when the model uses ALiBi, else ""."""
    cfgs = [getattr(m, "config", None) for m in model.modules()]
    cfgs += [getattr(c, "attn_config", None) for c in cfgs]
    if any(getattr(c, "alibi", False) is True for c in cfgs if c is not None) or any(
            hasattr(m, "build_alibi_tensor") for m in model.modules()):
        return (" (it adds ALiBi biases to the attention scores in its own code, arXiv 2108.12409; the cp "
                "attention has no ALiBi)")
    return ""
