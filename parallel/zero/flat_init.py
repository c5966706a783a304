"""The first state of a :class:`~parallel.zero.optimizer.ZeroOptimizer`: real tensors for a
meta-built module, then each bucket's flat parameters and fp32 master.

For a bucket of N ranks with shard [lo, hi) of the padded flat vector (:mod:`parallel.data_parallel.bucket`):

* stages 0–2 (and stage 3's deferred bucket): the full flat parameter in the compute dtype, the
  parameters become views into it, the master is the fp32 slice [lo, hi) (a copy with mixed
  precision, the same memory in fp32; stage 0 owns the whole vector);
* stage 3: only the shard [lo, hi) is kept (``shard_param`` and the master); the flat parameter
  is an empty storage of the padded size that gathers fill, the parameters hold no memory.

Meta-built parameters (``init``: the record of :func:`parallel.zero.deferred_init`) get a
zero-stride placeholder; their values are materialised one parameter at a time while the buckets
are filled, so the whole model never exists on one rank.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["materialize_buffers", "replace_meta_params", "init_full", "init_sharded"]


def materialize_buffers(module: nn.Module, init, copy: bool = False) -> None:
    """Meta buffers of ``module`` get their values from the init record (``copy``: a copy of them, sharing
    no storage with the record)."""
    for mod in module.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                if init is None:
                    raise ValueError(f"buffer {name!r} of {type(mod).__name__} is on the meta device: pass init=")
                value = init.materialize(buf)
                mod._buffers[name] = value.clone() if copy else value


def replace_meta_params(module: nn.Module, init) -> dict:
    """Meta parameters become CPU ones (tied ones stay tied) holding no memory yet: a zero-stride
    placeholder of the right shape. Returns {new parameter: its meta original} (the values come
    from the init record when needed); frozen ones are materialised whole (they are not managed)."""
    new, src = {}, {}
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is None or not p.is_meta:
                continue
            if p not in new:
                q = nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=p.requires_grad)
                q.__dict__.update(p.__dict__)               # its ParamInfo record travels along
                new[p], src[q] = q, p
                if not p.requires_grad:
                    q.data = init.materialize(p).clone()
            mod._parameters[name] = new[p]
    return src


def init_full(b, value, prec) -> None:
    """Stages 0–2 (and stage 3's deferred bucket): full flat params, master = (a copy of) a slice.
    ``value(p)``: the parameter's full fp32 value; ``prec``: the :class:`parallel.precision.Precision`."""
    src = b.flatten([value(p) for p in b.params], torch.float32)
    dtype = prec.param_dtype
    b.flat_param = src if dtype == torch.float32 else src.to(dtype)
    if prec.master:
        b.master = src if b.shard == b.padded else src[b.lo:b.hi].clone()
    else:
        b.master = b.flat_param[b.lo:b.hi]
    for p, v in zip(b.params, b.views(b.flat_param)):
        p.data = v


def init_sharded(b, value, prec) -> None:
    """Stage 3: keep only this rank's shard; full values are produced one parameter at a time."""
    dtype, dev = prec.param_dtype, b.params[0].device
    master = torch.zeros(b.shard, dtype=torch.float32, device=dev)
    for i, a, e in b.pieces():
        o = b.offsets[i]
        master[a - b.lo:e - b.lo] = value(b.params[i]).reshape(-1)[a - o:e - o]
    b.shard_param = master if dtype == torch.float32 else master.to(dtype)
    b.master = master if prec.master else b.shard_param
    b.flat_param = torch.empty(b.padded, dtype=dtype, device=dev)
    b.flat_param.untyped_storage().resize_(0)
    for p in b.params:
        p.data = torch.empty(0, dtype=dtype, device=dev)
