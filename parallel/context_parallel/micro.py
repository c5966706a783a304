"""One micro-batch → this cp rank's share of it: tokens, targets, positions, padding and labels, all cut
by the same zig-zag split (:mod:`.layout`), so the loss over the cp ranks is the one-process loss.

* ``(x, y)`` tuple batches: x and y (aligned targets) sharded; position ids = the global positions.
* dict batches (:mod:`parallel.batch`): ``position_ids`` (packed documents) give the document ids the
  attention masks by when the model itself does so in one process (:mod:`.doc_probe`; else positions only),
  and the shard's positions; a 2-D ``attention_mask`` (1 = token, 0 = padding) is
  folded into the document ids: a padding token gets a document of its own (id −1 − t), so no real
  query sees it — the keys a one-process padding mask hides — and it sees only itself (its output is
  never scored). The model then gets no mask (the cp attention masks by global position). A (b, 1, s, s)
  mask (bool, or transformers' 0 / dtype-minimum float) is kept whole on every rank and decides alone, as it
  does for one process (:mod:`.masks`; position ids then only place the tokens). Any other
  (b, s) tensor (token_type_ids, …) is sharded like the tokens; other shapes are refused.
* labels: the transformers convention scores position t against ``labels[t+1]``, a shift across the
  zig-zag cut; so the labels are shifted once on the whole sequence — aligned[t] = labels[t+1],
  aligned[s−1] = −100 — and then sharded (``targets`` are aligned already). The micro-batch's count n_i
  becomes this rank's scored count and its weight is multiplied by cp: rank c contributes
  L' = S_i^c · cp·m·dp / N and the engine's mean over dp×cp ranks and m micro-batches is Σ S / N, the
  mean over the scored tokens of the global batch (parallel/batch.py's contract), exactly.
* ``loss: model``: the model's own loss must score the shard's aligned labels. With ``targets`` (nanoGPT)
  the sharded aligned targets are passed as they are; with ``labels`` (transformers) they go as
  ``shift_labels=`` (transformers' ``ForCausalLMLoss`` then does not shift again) with ``labels=`` the same
  tensor, which needs a forward taking ``**kwargs``; a model without it is refused (its own shift would be
  across the zig-zag cut: a silently wrong loss).
"""
from __future__ import annotations

import dataclasses

import torch

from parallel.batch import IGNORE, Targets, forward_params, shift_for
from parallel.context_parallel.layout import check_seq, document_ids, shard
from parallel.context_parallel.masks import Visibility, dense_allow

__all__ = ["shard_micro", "aligned_labels"]


def aligned_labels(y: Targets) -> torch.Tensor:
    """The labels of ``y`` in the aligned convention, −100 where not scored (shifted once, globally)."""
    t = y.labels
    if shift_for(y.key):
        return torch.cat([t[:, 1:], torch.full_like(t[:, :1], IGNORE)], dim=1)
    return torch.where(t < 0, IGNORE, t)


def _docs(b, s, pos, mask, device):
    """(b, s) document ids from restarting position ids and a padding mask; None when neither is given."""
    if pos is None and mask is None:
        return None
    docs = document_ids(pos).expand(b, s) if pos is not None else torch.zeros(b, s, dtype=torch.int64)
    if mask is not None:
        own = -1 - torch.arange(s, device=mask.device).expand(b, s)
        docs = torch.where(mask.to(torch.bool), docs.to(mask.device), own)
    return docs.to(device)


def shard_micro(cp, mb, loss_mode: str, label_name: str | None, model=None):
    """(this cp rank's shard of micro-batch ``mb``, its (b, s) document ids or None). ``cp``: the
    :class:`.context.ContextParallel`; ``model``: the unmodified model (``loss: model`` with labels checks
    that its forward takes ``**kwargs``)."""
    x = mb.x
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"context parallel: the inputs must be (b, s) token ids, got "
                         f"{type(x).__name__ if not isinstance(x, torch.Tensor) else tuple(x.shape)}")
    b, s = x.shape[0], x.shape[1]
    n, r = cp.group.size, cp.group.rank
    check_seq(s, n)
    kw = dict(mb.kwargs)
    pos, mask = kw.pop("position_ids", None), kw.pop("attention_mask", None)
    if pos is not None:
        pos = pos.expand(b, s) if pos.dim() == 2 else pos[None].expand(b, s)
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise ValueError(f"context parallel: attention_mask must be a tensor, got {type(mask).__name__}")
    dense = None
    if mask is not None and tuple(mask.shape) != (b, s):       # (b, 1, s, s): the mask alone decides (masks.py)
        dense = dense_allow(mask, b, s).to(x.device)
        if not dense.any(-1).all():
            raise ValueError("context parallel: the attention mask hides every key from some query; give each "
                             "query at least itself (a padding query's own key), as the cp attention has no "
                             "output for a row that sees nothing")
        mask = None
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == (b, s):
            out[k] = shard(v, n, r)
        else:
            raise ValueError(f"context parallel: the batch key {k!r} (shape {tuple(getattr(v, 'shape', ()))}) is not "
                             f"a (b, s, …) per-token tensor, so it cannot be split over the sequence: drop it or set "
                             f"parallel.cp=1")
    own = pos if getattr(cp, "masks_documents", None) is not False else None   # the model's own documents
    docs = _docs(b, s, own, mask, x.device) if dense is None else Visibility(allow=dense)
    glob = pos if pos is not None else torch.arange(s, device=x.device).expand(b, s)
    out["position_ids"] = shard(glob, n, r).to(x.device)
    y = mb.y
    if isinstance(y, Targets):
        local = shard(aligned_labels(y), n, r)
        count, key = int((local != IGNORE).sum()), "targets"        # aligned now; IGNORE is not scored
        if loss_mode == "model" and shift_for(y.key):
            names, var_kw = forward_params(model) if model is not None else (set(), False)
            if not var_kw and "shift_labels" not in names:
                raise ValueError(f"context parallel with loss=model: {type(model).__name__}.forward takes labels= but "
                                 f"not shift_labels= (or **kwargs), so its own loss would shift the labels across the "
                                 f"zig-zag cut of the sequence; use loss=cross_entropy, or a transformers model")
            out["shift_labels"], key = local, y.key
        elif loss_mode == "model":                     # the model's own aligned convention (nanoGPT: −1 ignored)
            local, key = shard(y.labels, n, r), y.key
        y = Targets(local, key, count, y.weight * n)
    elif isinstance(y, torch.Tensor) and y.dim() >= 2 and y.shape[1] == s:
        y = shard(y, n, r)
    return dataclasses.replace(mb, x=shard(x, n, r), y=y, kwargs=out), docs
