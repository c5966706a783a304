"""Per-head parameters of an attention module whose heads a tensor-parallel plan splits.

Column-parallel q/k/v projections give rank r the heads [r·n/tp, (r+1)·n/tp) of each head class (query heads,
key/value heads: contiguous chunks of the output, Megatron-LM, arXiv 1909.08053, §3). A parameter or buffer the
attention module holds with a dimension of n entries — one per head, such as Doge's dynamic-mask coefficients
``A`` (n_kv,) — then meets 1/tp of the heads on each rank while it stays whole, and a row-parallel layer whose
output has n features (Doge's ``dt_proj``, one mask logit per kv head, summed over tp) returns all n heads'
values to every rank. transformers' published Doge plan does both: a shape error at the first step, or,
where the shapes happen to broadcast, a silent wrong number.

Such an attention is converted exactly, or the plan refuses naming the parameter:

* ``per_head_params`` (a style on the attention module): each of its own parameters/buffers with one dimension
  of a head count n (n % tp = 0) keeps rank r's chunk r of that dimension, P_r = P[..., r·n/tp:(r+1)·n/tp, ...]
  (a tp-split parameter: its gradient is rank r's alone, as a column shard's is); each row-parallel child with
  n output features keeps chunk r of its (all-reduced) output: forward y_r = chunk_r(Σ_s X_s W_sᵀ + b), backward
  the all-gather of the chunks' gradients — Megatron's scatter-to-region, so the row layer's identity backward
  sees the whole, identical gradient on every rank. Exact when the forward uses entry h of P (and feature h of
  the row output) only with head h, which is what the style asserts.
* ``plan="auto"`` and any plan given without it: found here and adopted only when a numerical check passes —
  block 0 converted as each tp rank in one process (:func:`.auto_plan_check._simulate`) equals the unsplit block
  to 1e-5 relative — else refused: "a replicated per-head parameter in a head-split attention: <name>, shape …".

Per-head values held by a child module other than a row layer (a norm, a submodule), two dims of head size,
kv heads replicated over tp (n_kv < tp) and sequence parallelism are refused.
"""
from __future__ import annotations

import torch.nn as nn

from parallel.comm import Group
from parallel.comm.mappings import scatter_to_seq
from parallel.tensor_parallel.layers import _is_conv1d, _shard_param, shard_tensor
from parallel.tensor_parallel.styles import _KV_HEADS, _Q_HEADS, PER_HEAD, _int_attr

__all__ = ["PER_HEAD", "find_per_head", "per_head_errors", "shard_per_head"]

_HEAD_SPLIT = ("colwise", "colwise_qkv")


def _out(m) -> int:
    return m.nf if _is_conv1d(m) else m.out_features


def _is_rotary(name: str, m: nn.Module) -> bool:
    return "rotary" in type(m).__name__.lower() or "rotary" in name.lower()


def _heads(parent: nn.Module, children: list, sections: dict) -> set:
    """The head counts of ``parent`` (full, before the split): its head-count attributes and the outputs of its
    head-split column children over ``head_dim``."""
    hd = _int_attr(parent, ("head_dim",))
    out = {v for v in (_int_attr(parent, _Q_HEADS), _int_attr(parent, _KV_HEADS)) if v}
    for name, style, m in children:
        if hd and style in _HEAD_SPLIT and (isinstance(m, nn.Linear) or _is_conv1d(m)):
            out |= {s // hd for s in sections.get(name) or [_out(m)] if s % hd == 0}
    return {n for n in out if n > 1}


def find_per_head(matches: list, mods: dict, sections: dict) -> dict:
    """{attention name: [(kind, name, shape, dim, n)]}: per-head values of each module holding head-split column
    layers. kind: "param" / "buffer" (its own; dim the head dimension), "row" (a row-parallel child with n
    output features), "child" (held by another child; not convertible), "ambiguous" (two dims of head size)."""
    kids: dict = {}
    for name, style, m in matches:
        kids.setdefault(name.rpartition(".")[0], []).append((name, style, m))
    converted = {n for n, s, _ in matches if s != PER_HEAD}
    found = {}
    for pn, children in kids.items():
        if not any(s in _HEAD_SPLIT for _, s, _ in children):
            continue
        parent = mods[pn]
        heads = _heads(parent, children, sections)
        hits = []
        for sub, m in parent.named_modules():
            full = f"{pn}.{sub}" if sub else pn
            if sub and (full in converted or any(full.startswith(c + ".") for c in converted) or _is_rotary(sub, m)):
                continue
            for kind, items in (("param", m._parameters), ("buffer", m._buffers)):
                for a, t in items.items():
                    dims = [d for d, size in enumerate(getattr(t, "shape", ())) if size in heads]
                    if t is None or not dims or "inv_freq" in a:
                        continue
                    k = "ambiguous" if len(dims) > 1 else kind if not sub else "child"
                    hits.append((k, f"{full}.{a}", tuple(t.shape), dims[0], t.shape[dims[0]]))
        for name, style, m in children:
            if style in ("rowwise", "rowwise_split_input") and _out(m) in heads:
                hits.append(("row", name, (_out(m),), -1, _out(m)))
        if hits:
            found[pn] = hits
    return found


def per_head_errors(pn: str, hits: list, tp: int, kv: dict, sp: bool) -> list:
    """Why ``per_head_params`` cannot convert attention ``pn``'s per-head values (empty: it can)."""
    why = []
    for kind, name, shape, _, n in hits:
        if kind in ("child", "ambiguous"):
            why.append(f"{name} (shape {shape}) is held by " + ("a child module other than a row-parallel layer"
                                                                if kind == "child" else "more than one head dim"))
        elif n % tp:
            why.append(f"{name} has {n} heads, not divisible by tp = {tp}")
    if any(k.rpartition(".")[0] == pn for k in kv):
        why.append("its key/value heads are replicated over tp (fewer kv heads than tp)")
    if sp:
        why.append("sequence parallelism is on")
    return why


def refusal(pn: str, hits: list, tp: int, why: str, glob: str) -> str:
    kind, name, shape, dim, n = hits[0]
    what = (f"{name}, a row-parallel layer with {n} output features (one per head) whose output stays whole"
            if kind == "row" else f"{name}, shape {shape} (dim {dim} = {n} heads)")
    more = f" (and {len(hits) - 1} more in {pn})" if len(hits) > 1 else ""
    return (f"a replicated per-head parameter in a head-split attention: {what}{more}; the plan splits {pn}'s "
            f"heads over tp = {tp} ranks, so each rank holds 1/tp of the heads against all {n} values: {why}; "
            f"fix: leave {pn}'s layers out of the plan (replicated attention), or, if every per-head value acts "
            f"on its own head only, add {{{glob!r}: {PER_HEAD!r}}} to the plan")


def shard_per_head(parent: nn.Module, pn: str, hits: list, group: Group, memo: dict) -> None:
    """Keep rank r's heads of ``parent``'s per-head parameters/buffers and of its per-head row outputs."""
    for kind, name, _, dim, _ in hits:
        attr = name[len(pn) + 1:]
        if kind == "param":
            full = parent._parameters[attr]
            parent.register_parameter(attr, _shard_param(full, dim, group, memo=memo))
        elif kind == "buffer":
            keep = attr not in parent._non_persistent_buffers_set
            parent.register_buffer(attr, shard_tensor(parent._buffers[attr], dim, group.size, group.rank),
                                   persistent=keep)
        elif kind == "row":
            parent.get_submodule(attr).register_forward_hook(
                lambda mod, args, out, g=group: scatter_to_seq(out, g, -1))
