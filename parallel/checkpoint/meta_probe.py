"""The layout probe on the meta device: where each local element came from, without a copy of the model.

:func:`parallel.checkpoint.layout.probe_origins` replays the sharding on a float64 copy of the whole
model whose values are their own positions — 8 bytes per model element on every rank at its first save
or load. Here the sharding (tensor parallelism, then the pipeline split) is replayed on a *meta* copy
(shapes only, no memory); each local parameter is then traced to the unmodified model's parameter it was
cut from (``param_info(p).source``, set where tensor parallelism cuts and where the pipeline copies a
tied weight), and the positions are computed from what tensor parallelism recorded about the cut
(:class:`parallel.parameters.ParamInfo`):

    the full tensor W (shape S) gets ``tp_pad`` zero slices appended along d = ``tp_dim``; every section
    [o, o + s) along d (one section when ``sections`` is None) is chunked into P = tp / ``tp_replicas``
    pieces of c = ⌈s / P⌉ (torch.chunk), and rank r keeps piece i = r // ``tp_replicas`` of each:
    the local coordinates along d are  o + i·c … o + min((i + 1)·c, s) − 1  (≥ S[d]: padding, position −1);
    along every other dim all of W.  A local element at coordinates (u_0 … u_k) is W's element
    Σ_j w_j · stride_j with w_d = coord_d[u_d] and w_j = u_j otherwise.

:class:`LocalIndex` computes these positions for any range of a local parameter's flat elements, so a
ZeRO partition's positions cost 8 bytes per *partition* element, computed when a checkpoint is
written or read (never the whole model's, nor the whole local parameter's).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.checkpoint.layout import ParamOrigin, _named_unique
from parallel.parameters import param_info

__all__ = ["LocalIndex", "MetaScalars", "meta_origins"]


class MetaScalars(TorchDispatchMode):
    """``.item()`` of a meta tensor answers True / 0 instead of failing: transformers' mask helpers branch
    on a data value (are the position ids packed?) in the pipeline split's probe forward, where the probe's
    plain input — one unpacked sequence — gives True. Only control flow sees these; no shape depends on them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return True if args[0].dtype == torch.bool else 0
        return func(*args, **(kwargs or {}))


class LocalIndex:
    """Positions in the flattened unmodified parameter of a local parameter's elements (−1: padding)."""

    def __init__(self, full_shape: tuple, local_shape: tuple, dim: int | None = None, coords=None, table=None):
        self.full_shape, self.local_shape, self.dim = tuple(full_shape), tuple(local_shape), dim
        self.coords = coords                      # int64 coordinates along dim (−1: padding), or None
        self.table = table                        # the value probe's positions (a tensor), when it made them
        self.numel = math.prod(self.local_shape)

    def range(self, a: int, e: int) -> torch.Tensor:
        """Positions of the local flat elements [a, e)."""
        if self.table is not None:
            return self.table.reshape(-1)[a:e]
        pos = torch.arange(a, e, dtype=torch.int64)
        if self.dim is None:
            return pos
        out = torch.zeros_like(pos)
        bad = torch.zeros(pos.shape, dtype=torch.bool)
        stride = 1
        rest = pos
        for j in range(len(self.local_shape) - 1, -1, -1):
            u = rest % self.local_shape[j]
            rest = rest // self.local_shape[j]
            if j == self.dim:
                u = self.coords[u]
                bad |= u < 0
            out += u * stride
            stride *= self.full_shape[j]
        return torch.where(bad, torch.full_like(out, -1), out)

    def full(self) -> torch.Tensor:
        return self.range(0, self.numel).view(self.local_shape)


def _coords(n: int, info, tp: int, rank: int) -> torch.Tensor:
    """The full-tensor coordinates along ``tp_dim`` that rank ``rank`` holds (see the module docstring)."""
    parts, piece = tp // info.tp_replicas, rank // info.tp_replicas
    sections = list(info.sections) if info.sections is not None else [n + info.tp_pad]
    if info.sections is not None and info.tp_pad:
        raise RuntimeError("layout probe: a parameter with both fused sections and vocabulary padding")
    out, o = [], 0
    for s in sections:
        c = -(-s // parts)
        lo, hi = min(piece * c, s), min((piece + 1) * c, s)
        out.append(torch.arange(o + lo, o + hi, dtype=torch.int64))
        o += s
    co = torch.cat(out)
    return torch.where(co >= n, torch.full_like(co, -1), co)


def _trace(q, names: dict):
    """The unmodified-model Parameter ``q`` was cut or copied from (following ``ParamInfo.source``)."""
    src = q
    for _ in range(8):
        if id(src) in names:
            return src
        ref = param_info(src).source
        src = ref() if ref is not None else None
        if src is None:
            return None
    return None


def meta_origins(template: nn.Module, transform, modules, tp: int, tp_rank: int) -> dict:
    """{id(real local param): ParamOrigin} with a :class:`LocalIndex` as ``index``. ``template`` is the
    unmodified model on meta (:func:`parallel.checkpoint.layout.meta_copy`); ``transform(copy) -> modules``
    must shard a copy as ``modules`` were sharded (rank ``tp_rank`` of ``tp``). RuntimeError when a local
    parameter cannot be traced or its traced shape differs (the caller then falls back to the value probe)."""
    probe = copy.deepcopy(template)
    if any(not p.is_meta for p in probe.parameters()):
        raise RuntimeError("layout probe: the template has parameters off the meta device")
    names = {}
    for n, p in probe.named_parameters():
        names.setdefault(id(p), (n, p))
    with MetaScalars():
        probe_params = _named_unique(transform(probe))
    real_params = _named_unique(modules)
    if [n for n, _ in probe_params] != [n for n, _ in real_params]:
        raise RuntimeError("layout probe: the sharded copy's parameters differ from the real ones")
    out = {}
    for (qn, q), (_, p) in zip(probe_params, real_params):
        src = _trace(q, names)
        if src is None:
            raise RuntimeError(f"layout probe: local parameter {qn} cannot be traced to a parameter of the model")
        name, full = names[id(src)]
        info = param_info(q)
        if info.tp_split:
            d = info.tp_dim % full.dim()
            co = _coords(full.shape[d], info, tp, tp_rank)
            shape = tuple(len(co) if j == d else s for j, s in enumerate(full.shape))
            idx = LocalIndex(tuple(full.shape), shape, d, co)
        else:
            shape = tuple(full.shape)
            idx = LocalIndex(shape, shape)
        if shape != tuple(q.shape):
            raise RuntimeError(f"layout probe: local parameter {qn} has shape {tuple(q.shape)} but its cut of "
                               f"{name!r} {tuple(full.shape)} as recorded gives {shape}")
        out[id(p)] = ParamOrigin(name, tuple(full.shape), idx)
    return out
