"""Context parallelism for unmodified models: shard the batch's sequence, give each rank its global
positions, and route the model's attention to ring or Ulysses attention over the cp group.

How the model's attention is reached, without editing it:
* transformers models: ``cp_attention`` is registered in transformers' attention-function registry
  (``AttentionInterface``, with a mask function that builds no mask: the cp attention masks by global
  position itself) under the name ``"parallel3d_cp"``; while a :meth:`ContextParallel.active` block runs,
  the configs of the model (and of its pipeline-stage copies) name it as their attention implementation,
  and get their own back on exit — so outside a step (evaluation by the user, ``save_pretrained``, the
  engine's template and ``full_model()``) the model is the one the user built, not ours;
* models calling ``torch.nn.functional.scaled_dot_product_attention`` (our GPT): while a
  :meth:`ContextParallel.active` block runs, that function is replaced by a dispatcher that sends
  self-attention over the sequence shard to the cp algorithm (the approach of torch's own
  ``context_parallel``), and calls the original otherwise (no cp context active).

Positions: rank r holds the zig-zag shard (:mod:`.layout`); the model receives ``position_ids`` =
the global positions of its tokens (rotary / learned position embeddings are then computed for the
right positions). Packed sequences: given (b, s) position ids that restart per document, the shard
gets those positions and attention stays within each document (document ids travel in the context,
computed from the full position ids every cp rank has: nothing extra is communicated) — when the model
does so in one process; a model that attends across documents (OPT, an ``is_causal`` SDPA model: the
probe of :mod:`.doc_probe`) keeps doing so. A transformers
attention's ``sliding_window`` and a batch's (b, 1, s, s) mask are applied the same way (:mod:`.masks`).

Loss: each rank's loss is the mean over its s/cp tokens; all shards are equal, so the mean over cp
ranks of these is the mean over the whole sequence, and gradients averaged over dp×cp are exact.
"""
from __future__ import annotations

import contextlib
import inspect
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from parallel.context_parallel.attn_probe import alibi_note, reaches_cp_attention
from parallel.context_parallel.doc_probe import masks_documents
from parallel.context_parallel.layout import check_seq, document_ids, shard
from parallel.context_parallel.masks import Visibility
from parallel.context_parallel.ring import ring_attention
from parallel.context_parallel.ulysses import _SDPA, ulysses_attention

__all__ = ["ContextParallel", "current", "cp_attention", "register_hf", "HF_NAME"]

HF_NAME = "parallel3d_cp"
ALGORITHMS = {"ring": ring_attention, "ulysses": ulysses_attention}
_STACK: list = []                    # the active contexts (innermost last)


def current():
    """The active :class:`ContextParallel`, or None."""
    return _STACK[-1] if _STACK else None


def _dispatch_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, **kw):
    cp = current()
    if cp is None or kw:
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa, **kw)
    if attn_mask is not None:
        raise ValueError("context parallel: scaled_dot_product_attention got an explicit attn_mask; under "
                         "parallel.cp the mask comes from the global positions (causal, and per document when "
                         "position ids restart): call it with is_causal=True and no mask")
    return cp.attention(query, key, value, causal=is_causal, scale=scale, dropout=dropout_p)


def cp_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers attention function (the registry's signature): q (b, h, n, d), k/v (b, h_kv, n, d);
    returns ((b, n, h, d), None). Outside a cp context it is transformers' sdpa."""
    cp = current()
    if cp is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if attention_mask is not None:
        raise ValueError("context parallel: the model passed an attention mask of its own making; under parallel.cp "
                         "masks come from the batch (causal, per document with restarting position ids, a (b, s) "
                         "padding or (b, 1, s, s) attention_mask: parallel/context_parallel/micro.py), which the "
                         "model then does not get: give the mask in the batch, or set parallel.cp=1")
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ValueError(f"context parallel: the model's attention uses {name}={kwargs[name]!r}, which the cp "
                             f"attention does not implement: set parallel.cp=1 for this model")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = cp.attention(query, key, value, causal=causal, scale=scaling, dropout=dropout,
                       window=kwargs.get("sliding_window"))
    return out.transpose(1, 2).contiguous(), None


def register_hf() -> bool:
    """Register :func:`cp_attention` (and a no-mask mask function) with transformers; False without it."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(HF_NAME, cp_attention)
    AttentionMaskInterface.register(HF_NAME, lambda *a, **k: None)
    return True


class ContextParallel:
    """The sequence split over the cp ``group`` with ``algorithm`` ("ring" or "ulysses")."""

    def __init__(self, group, algorithm: str = "ring"):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"parallel.cp_algorithm={algorithm!r} is not one of {list(ALGORITHMS)}")
        self.group, self.algorithm = group, algorithm
        self.docs = None                 # (b, s) document ids of the current micro-batch, a masks.Visibility, or None
        self._configs: list = []         # transformers configs whose attention is ours while active
        self._seen: tuple = ()
        self.masks_documents = None      # the model's own treatment of restarting position ids (.doc_probe)
        self.calls, self.routed, self._name = 0, False, None   # attention calls; one seen in a forward; model

    # --- the model ---------------------------------------------------------------------------------
    def prepare(self, model) -> None:
        """Register :func:`cp_attention` with transformers (a transformers model's attention goes to it
        while :meth:`active`); check the model takes ``position_ids`` (each rank's tokens sit at global
        positions)."""
        self._configs = _hf_configs([model]) if register_hf() else []
        params = inspect.signature(model.forward).parameters
        if "position_ids" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise ValueError(f"parallel.cp={self.group.size}: {type(model).__name__}.forward takes no position_ids, "
                             f"so its position embeddings cannot be given each rank's global positions; add a "
                             f"position_ids=None argument (as transformers models have) or set parallel.cp=1")
        self._name = type(model).__name__
        if reaches_cp_attention(model, _Probe(self._configs)) is False:  # asked now, not after a first step
            raise ValueError(self._unrouted() + alibi_note(model) + "; set parallel.cp=1 for this model")
        self.masks_documents = masks_documents(model)

    # --- the batch ---------------------------------------------------------------------------------
    def shard_batch(self, x, y=None, position_ids=None):
        """This rank's zig-zag shard of (b, s) inputs ``x`` and targets ``y``, and the model keyword
        arguments {"position_ids": its global positions} (the batch's own position ids when given: a
        packed batch; the document ids are kept for the attention)."""
        if x.dim() < 2:
            raise ValueError(f"context parallel: inputs of shape {tuple(x.shape)} have no sequence dim (dim 1)")
        b, s = x.shape[0], x.shape[1]
        cp, r = self.group.size, self.group.rank
        check_seq(s, cp)
        if position_ids is None:
            pos = torch.arange(s, device=x.device).expand(b, s)
            self.docs = None
        else:
            pos = position_ids.expand(b, s) if position_ids.dim() == 2 else position_ids[None].expand(b, s)
            self.docs = document_ids(pos).to(x.device) if self.masks_documents is not False else None
        ys = shard(y, cp, r) if y is not None and y.dim() >= 2 and y.shape[1] == s else y
        return shard(x, cp, r), ys, {"position_ids": shard(pos, cp, r).to(x.device)}

    # --- attention ---------------------------------------------------------------------------------
    def attention(self, q, k, v, causal=True, scale=None, dropout=0.0, window=None):
        """q (b, h, s/cp, d), k/v (b, h_kv, s/cp, d) of this rank's shard → (b, h, s/cp, d); ``window``: a
        sliding window of that many tokens (causal only). With a dense mask in the batch (``docs`` a
        :class:`.masks.Visibility` with ``allow``) the mask alone decides, not causality (:mod:`.masks`)."""
        if dropout:
            raise ValueError(f"context parallel: attention dropout ({dropout}) is not supported; set it to 0")
        if q.dim() != 4 or k.shape[-2] != q.shape[-2]:
            raise ValueError(f"context parallel: attention of q {tuple(q.shape)} against k {tuple(k.shape)} is not "
                             f"self-attention over the sequence shard (b, heads, s/cp, d)")
        if window is not None and not causal:
            raise ValueError(f"context parallel: a sliding window ({window}) on non-causal attention is not supported")
        self.calls += 1
        docs = Visibility.of(self.docs, window)
        if docs is not None:
            docs = docs.expand(q.shape[0])
            causal = causal and docs.allow is None
        return ALGORITHMS[self.algorithm](q, k, v, self.group, causal=causal, docs=docs, scale=scale)

    def _unrouted(self) -> str:
        return (f"parallel.cp={self.group.size}: {self._name}'s forward made no call to the cp attention: it computes "
                f"its attention (or mixes the sequence) in its own code, not through transformers' attention functions "
                f"or torch's scaled_dot_product_attention, so each rank would see only its own shard of the sequence")

    @contextlib.contextmanager
    def active(self, modules=()):
        """While inside: this context handles the model's attention (see the module docstring); ``modules``:
        copies of the prepared model that run too (the pipeline's stage modules)."""
        key = tuple(id(m) for m in modules)
        if key and key != self._seen:
            self._configs = list({id(c): c for c in self._configs + _hf_configs(modules)}.values())
            self._seen = key
        own = [c._attn_implementation for c in self._configs]
        start = self.calls
        _STACK.append(self)
        F.scaled_dot_product_attention = _dispatch_sdpa
        try:
            for c in self._configs:
                c._attn_implementation = HF_NAME
            yield self
            if self._name is not None and not self.routed and self.calls == start:   # a prepared model's forward
                raise ValueError(self._unrouted() + "; set parallel.cp=1 for this model")
            self.routed = self.routed or self.calls > start
        finally:
            for c, name in zip(self._configs, own):
                c._attn_implementation = name
            _STACK.remove(self)
            if not _STACK:
                F.scaled_dot_product_attention = _SDPA


class _Probe(ContextParallel):
    """A context over a group of one for :func:`.attn_probe.reaches_cp_attention`: counts the attention calls
    it routes and computes each locally (``configs``: the model's transformers configs to switch)."""

    def __init__(self, configs):
        super().__init__(SimpleNamespace(size=1, rank=0))
        self._configs = list(configs)

    def attention(self, q, k, v, causal=True, scale=None, dropout=0.0, window=None):
        self.calls += 1
        return _SDPA(q, k, v, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _hf_configs(modules) -> list:
    """The distinct transformers configs (those with an attention implementation) of ``modules``' trees."""
    out: dict = {}
    for root in modules:
        for mod in root.modules():
            cfg = getattr(mod, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                out[id(cfg)] = cfg
    return list(out.values())
