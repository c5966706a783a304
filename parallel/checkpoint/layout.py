"""Where each local element came from: the index map of a sharded model.

Run the same sharding (tensor parallel, pipeline split) on a copy of the model whose parameters
hold their own positions — parameter j's elements are ``offset_j + 0, 1, ...`` in float64, exact
below 2^53 — and read the positions back from the sharded copy. For every local parameter this
gives its logical name in the unmodified model and, per element, the position in that
parameter's flattened tensor: the map checkpoints use to save from and load into any layout.
Elements that came from no parameter (padding) get -1.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ParamOrigin:
    name: str                 # name in the unmodified model (first name of a tied parameter)
    full_shape: tuple
    index: object             # int64 tensor of the local shape (-1: padding), or a meta_probe.LocalIndex


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters live on the meta device (no memory; ties
    kept) and whose buffers are real copies (small: masks, rotary tables): the template from
    which the engine rebuilds the unmodified model for probes and consolidation."""
    memo = {}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def materialize(template: nn.Module, dtype=None) -> nn.Module:
    """A CPU copy of a :func:`meta_copy` template with uninitialised parameters (ties kept)."""
    model = copy.deepcopy(template)
    new = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dtype or p.dtype),
                                              requires_grad=p.requires_grad)
                mod._parameters[name] = new[id(p)]
    return model


def _named_unique(modules) -> list:
    """(name, param) of modules' parameters in order, each Parameter object once."""
    seen, out = set(), []
    for i, m in enumerate(modules):
        for n, p in m.named_parameters(remove_duplicate=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((f"{i}.{n}", p))
    return out


def probe_origins(model: nn.Module, transform, modules) -> dict[int, ParamOrigin]:
    """``transform(copy) -> list of modules`` must shard a copy of ``model`` exactly as ``modules``
    (the real, already-transformed modules) were sharded. Returns {id(real param): ParamOrigin}."""
    probe = (materialize(model) if any(p.is_meta for p in model.parameters()) else copy.deepcopy(model))
    probe = probe.to(torch.float64)
    table = []
    offset = 1
    with torch.no_grad():
        for name, p in probe.named_parameters():
            n = p.numel()
            p.copy_(torch.arange(offset, offset + n, dtype=torch.float64).view(p.shape))
            table.append((offset, n, name, tuple(p.shape)))
            offset += n
    if offset >= 2 ** 53:
        raise ValueError("model too large for the float64 index probe (2^53 elements)")
    starts = torch.tensor([t[0] for t in table], dtype=torch.int64)
    probe_params = _named_unique(transform(probe))
    real_params = _named_unique(modules)
    if [n for n, _ in probe_params] != [n for n, _ in real_params]:
        raise RuntimeError("layout probe: the sharded copy's parameters differ from the real ones")
    out = {}
    for (_, q), (_, p) in zip(probe_params, real_params):
        v = q.detach().to(torch.int64)
        valid = v > 0
        if not valid.any():
            raise RuntimeError("layout probe: a local parameter holds no element of the model")
        j = int(torch.searchsorted(starts, v[valid].min(), right=True)) - 1
        off, n, name, shape = table[j]
        idx = torch.where(valid, v - off, torch.full_like(v, -1))
        if int(idx.max()) >= n:
            raise RuntimeError(f"layout probe: local parameter mixes elements of {name!r} and another parameter")
        out[id(p)] = ParamOrigin(name, shape, idx)
    return out
