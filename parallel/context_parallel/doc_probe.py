"""Does the model itself keep attention inside packed documents? Context parallelism must do what one
process does, and models differ: given position ids that restart at each document and no mask, a
transformers Llama/Qwen2/GPT-2 builds the block-diagonal causal mask itself (``masking_utils``' packed-
sequence detection), while OPT (its ``create_causal_mask`` is not given the position ids) and a model
calling ``scaled_dot_product_attention(is_causal=True)`` (examples/gpt.py) attend across the documents,
with positions that restart.

The probe (two forwards of a (1, 8) input on the unconverted model, eval mode, RNG and buffers restored): tokens
t_0..t_7 at positions [0, 1, 2, 3, 0, 1, 2, 3] — two documents — and t_4..t_7 alone at [0, 1, 2, 3]. The
model keeps attention inside documents iff the second document's outputs are equal in both (1e-5
relative): with attention across documents, t_4..t_7 also see t_0..t_3.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

__all__ = ["masks_documents", "quiet"]

TOL = 1e-5


def _vocab(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Embedding):
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else None


def _out(o) -> torch.Tensor | None:
    o = getattr(o, "logits", o)
    if isinstance(o, (tuple, list)) and o:
        o = o[0]
    return o if isinstance(o, torch.Tensor) and o.dim() >= 2 else None


@contextlib.contextmanager
def quiet(model: nn.Module):
    """Probe forwards that leave no trace: eval mode, no grad, RNG forked; mode and buffers put back after."""
    was_training = model.training
    buffers = [(b, b.detach().clone()) for b in model.buffers()]      # a forward may update them: put back
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def masks_documents(model: nn.Module) -> bool | None:
    """True when ``model(ids, position_ids=…)`` keeps attention inside the documents the restarting position
    ids mark, False when it attends across them, None when the probe cannot tell (parameters on meta, no
    token embedding, a forward that refuses the probe or returns no per-token tensor)."""
    if any(p.is_meta for p in model.parameters()):
        return None
    vocab = _vocab(model)
    if not vocab:
        return None
    dev = next(model.parameters()).device
    ids = (torch.arange(8, device=dev) * 7 + 3) % vocab
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3], device=dev)
    try:
        with quiet(model):
            both = _out(model(ids[None], position_ids=pos[None]))
            alone = _out(model(ids[None, 4:], position_ids=pos[None, 4:]))
    except Exception:                              # the probe is a guess at the signature: no verdict
        return None
    if both is None or alone is None or both.shape[1] != 8 or alone.shape[1] != 4:
        return None
    a, b = both[0, 4:].float(), alone[0].float()
    return bool((a - b).abs().max() <= TOL * max(1.0, b.abs().max().item()))
