"""Point-to-point messages on an explicit group, counted.

A message carries a small header (dtype, ndim, shape) so the receiver needs no shape argument;
header bytes are recorded as ``meta_bytes`` and kept out of ``wire_bytes``. Reading the header
(``.tolist()``) is a host sync per message on CUDA; a caller that knows the shape and dtype in
advance sends with ``header=False`` and receives with ``shape=``/``dtype=``: payload only, no sync.
Both ends must agree on whether a header travels (the pipeline executor decides it from what both
saw in the first step). A send of M bytes is
M wire bytes for the sender; the receiver records its payload and 0 wire bytes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.comm.collectives import Group, _nbytes, _trace

__all__ = ["P2PWork", "isend", "send", "recv", "exchange", "exchange_start"]

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int8, torch.uint8, torch.bool, torch.int16]
_MAX_DIMS = 8
_HEADER_LEN = 2 + _MAX_DIMS


def _header(t: torch.Tensor) -> torch.Tensor:
    if t.dim() > _MAX_DIMS:
        raise ValueError(f"send: tensors of more than {_MAX_DIMS} dims are not supported (got {t.dim()})")
    if t.dtype not in _DTYPES:
        raise ValueError(f"send: dtype {t.dtype} is not supported; use one of {_DTYPES}")
    h = [_DTYPES.index(t.dtype), t.dim(), *t.shape] + [0] * (_MAX_DIMS - t.dim())
    return torch.tensor(h, dtype=torch.int64)


class P2PWork:
    """Handles of one non-blocking send (header and payload); keeps the payload alive until done."""

    def __init__(self, works, payload):
        self.works, self.payload = works, payload

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works, self.payload = [], None


def isend(t: torch.Tensor, dst: int, group: Group, tag: int = 0, header: bool = True) -> P2PWork:
    """Non-blocking send of ``t`` (with its header unless ``header=False``) to global rank ``dst``."""
    t = t.detach().contiguous()
    h = _header(t).to(t.device) if header else None
    _trace(group, "send", t, peer=dst, tag=tag)
    group.stats.record(group.axis, "send", _nbytes(t), _nbytes(t), meta=_nbytes(h) if header else 0)
    works = [dist.isend(h, dst=dst, group=group.pg, tag=tag)] if header else []
    works.append(dist.isend(t, dst=dst, group=group.pg, tag=tag))
    return P2PWork(works, (h, t))


def send(t: torch.Tensor, dst: int, group: Group, tag: int = 0) -> None:
    """Blocking send of ``t`` to global rank ``dst``."""
    isend(t, dst, group, tag).wait()


def recv(src: int, group: Group, device=None, tag: int = 0, shape=None, dtype=None) -> torch.Tensor:
    """Receive a tensor sent by :func:`send` from global rank ``src``; shape and dtype come from the
    header, or from ``shape`` and ``dtype`` when given (the sender used ``header=False``)."""
    _trace(group, "recv", None, peer=src, tag=tag)
    meta = 0
    if shape is None:
        h = torch.empty(_HEADER_LEN, dtype=torch.int64, device=device)
        dist.recv(h, src=src, group=group.pg, tag=tag)
        h = h.tolist()
        dtype, shape, meta = _DTYPES[h[0]], h[2:2 + h[1]], _HEADER_LEN * 8
    t = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(t, src=src, group=group.pg, tag=tag)
    group.stats.record(group.axis, "recv", _nbytes(t), 0, meta=meta)
    return t


def exchange(sends: list, recvs: list, group: Group, device=None) -> tuple[P2PWork, list]:
    """One group of headerless point-to-point messages, issued together with
    ``dist.batch_isend_irecv`` (one ncclGroupStart/End on NCCL, so the sends and receives of the
    group progress together and two ranks sending to each other inside one group cannot block).
    ``sends``: [(tensor, dst, tag)]; ``recvs``: [(src, shape, dtype, tag)]. Waits for the receives
    (with one coalesced work, NCCL's case, for the group: a stream wait), returns (the sends' work,
    to wait for before their buffers are dropped, and the received tensors in ``recvs`` order)."""
    work, got, received = exchange_start(sends, recvs, group, device)
    received.wait()
    return work, got


def exchange_start(sends: list, recvs: list, group: Group, device=None) -> tuple[P2PWork, list, P2PWork]:
    """:func:`exchange` without the wait: returns (the sends' work, the tensors to be received, the
    work to wait for before reading them). A caller issuing groups on several process groups starts
    them all, then waits (so no receive waits while another group's sends are not yet issued). With
    one coalesced work (NCCL) a group of sends only has nothing to wait for before computing (the
    pipeline's stream model, :mod:`parallel.pipeline.p2p_streams`); else the receive work is the
    group's."""
    ops, payload, got = [], [], []
    for t, dst, tag in sends:
        t = t.detach().contiguous()
        _trace(group, "send", t, peer=dst, tag=tag)
        group.stats.record(group.axis, "send", _nbytes(t), _nbytes(t))
        ops.append(dist.P2POp(dist.isend, t, dst, group.pg, tag))
        payload.append(t)
    for src, shape, dtype, tag in recvs:
        t = torch.empty(shape, dtype=dtype, device=device)
        _trace(group, "recv", None, peer=src, tag=tag)
        group.stats.record(group.axis, "recv", _nbytes(t), 0)
        ops.append(dist.P2POp(dist.irecv, t, src, group.pg, tag))
        got.append(t)
    works = dist.batch_isend_irecv(ops) if ops else []
    if len(works) != len(ops):                  # one coalesced work (NCCL): a stream wait, not a host one
        if not recvs:
            return P2PWork(works, payload), got, P2PWork([], None)
        return P2PWork([], None), got, P2PWork(works, payload)
    return P2PWork(works[:len(sends)], payload), got, P2PWork(works[len(sends):], None)
