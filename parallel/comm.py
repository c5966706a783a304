"""Collectives on an explicit group, each one counted.

Every call goes through a :class:`Group` (a process group plus the name of the mesh axis it spans,
its ranks and the :class:`CommStats` that records traffic). Nothing here reads a global group.

Counting follows the ring model (Patarasuk & Yuan, "Bandwidth optimal all-reduce algorithms", 2009)
that DESIGN.md states, for a payload of M bytes on a group of N ranks, per rank:

    all-reduce            2(N-1)/N * M        (reduce-scatter + all-gather)
    reduce-scatter        (N-1)/N  * M        (M = the full, unreduced input)
    all-gather            (N-1)/N  * M        (M = the full, gathered output)
    broadcast             (N-1)/N  * M        (pipelined ring; the root sends, the rest receive M)
    send                  M                   (recv records its payload and 0 wire bytes)

This counts what the algorithm asks for, not what a backend does: gloo, for one, may move more.
Point-to-point messages carry a small header (dtype, ndim, shape) so the receiver needs no shape
argument; header bytes are recorded as ``meta_bytes`` and kept out of ``wire_bytes``.

The Megatron f / g operators (Shoeybi et al., arXiv 1909.08053, §3) and their sequence-parallel
counterparts (Korthikanti et al., arXiv 2205.05198, §4.2) are autograd functions at the bottom.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from .ring import ring_all_gather, ring_reduce_scatter, use_ring

__all__ = [
    "CommStats", "Group", "all_reduce", "all_gather", "reduce_scatter", "broadcast",
    "send", "isend", "recv", "P2PWork", "copy_to_group", "reduce_from_group", "scatter_to_seq",
    "gather_from_seq", "reduce_scatter_to_seq", "all_gather_to_seq",
]

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int8, torch.uint8, torch.bool, torch.int16]
_MAX_DIMS = 8
_HEADER_LEN = 2 + _MAX_DIMS


@dataclass
class OpCount:
    calls: int = 0
    payload_bytes: int = 0
    wire_bytes: float = 0.0
    meta_bytes: int = 0


class CommStats:
    """Per-process record of traffic, keyed by (axis, op).

    ``recorder`` (None by default: nothing happens) is called as ``recorder(op, group, tensor,
    peer, tag)`` when each call is *issued* (before it can block) — the hook the collective
    fingerprints of :mod:`parallel.fingerprint` and the watchdog's "last collective" use. It is
    never counted and never sees calls on single-rank groups (they move nothing)."""

    def __init__(self):
        self.counts: dict[tuple[str, str], OpCount] = {}
        self.recorder = None

    def record(self, axis: str, op: str, payload: int, wire: float, meta: int = 0) -> None:
        c = self.counts.setdefault((axis, op), OpCount())
        c.calls += 1
        c.payload_bytes += int(payload)
        c.wire_bytes += wire
        c.meta_bytes += meta

    def reset(self) -> None:
        self.counts.clear()

    def snapshot(self) -> dict:
        """``{axis: {op: {calls, payload_bytes, wire_bytes, meta_bytes}}}`` — a plain, JSON-able copy."""
        out: dict = {}
        for (axis, op), c in sorted(self.counts.items()):
            out.setdefault(axis, {})[op] = dict(vars(c))
        return out

    @staticmethod
    def diff(after: dict, before: dict) -> dict:
        """Traffic between two snapshots (entries with no new calls are dropped)."""
        out: dict = {}
        for axis, ops in after.items():
            for op, c in ops.items():
                b = before.get(axis, {}).get(op, {})
                d = {k: v - b.get(k, 0) for k, v in c.items()}
                if d["calls"]:
                    out.setdefault(axis, {})[op] = d
        return out

    def total(self, axis: str | None = None, op: str | None = None, key: str = "wire_bytes"):
        return sum(getattr(c, key) for (a, o), c in self.counts.items()
                   if (axis is None or a == axis) and (op is None or o == op))


@dataclass(eq=False)
class Group:
    """A process group seen from one rank: the axis it spans, its global ranks in group order,
    this rank's index in it, and the stats every collective on it records into."""
    pg: object
    axis: str
    ranks: tuple
    rank: int
    stats: CommStats = field(default_factory=CommStats)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def __deepcopy__(self, memo):
        return self                     # a process group is shared, never copied

    def control(self) -> "Group":
        """The same ranks, recorded under axis ``"control:<axis>"``: for loss/metric reductions that
        are bookkeeping, so the axis' own counts stay exactly the algorithm's traffic."""
        return Group(self.pg, f"control:{self.axis}", self.ranks, self.rank, self.stats)

    def __repr__(self):
        return f"Group(axis={self.axis!r}, ranks={self.ranks}, rank={self.rank})"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _ring(n: int, m: int, factor: int = 1) -> float:
    return factor * (n - 1) * m / n


def _trace(group: Group, op: str, t=None, peer=None, tag=None) -> None:
    rec = getattr(group.stats, "recorder", None)
    if rec is not None:
        rec(op, group, t, peer, tag)


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return fn(*args, **kw)


def all_reduce(t: torch.Tensor, group: Group, op: str = "sum", async_op: bool = False):
    """In-place all-reduce of ``t``; returns ``t`` (or the Work handle when ``async_op``)."""
    if group.size == 1:
        return None if async_op else t
    _trace(group, "all_reduce", t)
    group.stats.record(group.axis, "all_reduce", _nbytes(t), _ring(group.size, _nbytes(t), 2))
    work = dist.all_reduce(t, op=_REDUCE_OPS[op], group=group.pg, async_op=async_op)
    return work if async_op else t


def all_gather(t: torch.Tensor, group: Group, dim: int = 0, async_op: bool = False):
    """Concatenate every rank's ``t`` along ``dim``. Returns the output, or (output, work)."""
    if group.size == 1:
        return (t, None) if async_op else t
    src = t.movedim(dim, 0).contiguous() if dim != 0 else t.contiguous()
    out = torch.empty((group.size * src.shape[0],) + tuple(src.shape[1:]), dtype=t.dtype, device=t.device)
    _trace(group, "all_gather", src)
    group.stats.record(group.axis, "all_gather", _nbytes(out), _ring(group.size, _nbytes(out)))
    if use_ring(group, out):                       # gloo: p2p ring (parallel/ring.py)
        work = ring_all_gather(out.view(-1), src.reshape(-1), group, async_op=async_op)
    else:
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        work = _quiet(fn, out, src, group=group.pg, async_op=async_op)
    if dim != 0:
        if async_op:
            work.wait()
        out = out.movedim(0, dim)
    return (out, work) if async_op else out


def reduce_scatter(t: torch.Tensor, group: Group, dim: int = 0, op: str = "sum", async_op: bool = False):
    """Sum ``t`` over ranks and keep this rank's equal chunk along ``dim``."""
    if group.size == 1:
        return (t, None) if async_op else t
    if t.shape[dim] % group.size:
        raise ValueError(f"reduce_scatter on axis {group.axis!r}: dim {dim} of size {t.shape[dim]} "
                         f"does not divide into {group.size} equal chunks")
    src = t.movedim(dim, 0).contiguous() if dim != 0 else t.contiguous()
    out = torch.empty((src.shape[0] // group.size,) + tuple(src.shape[1:]), dtype=t.dtype, device=t.device)
    _trace(group, "reduce_scatter", src)
    group.stats.record(group.axis, "reduce_scatter", _nbytes(src), _ring(group.size, _nbytes(src)))
    if op == "sum" and use_ring(group, src):       # gloo: p2p ring (parallel/ring.py)
        work = ring_reduce_scatter(out.view(-1), src.reshape(-1), group, async_op=async_op)
    else:
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        work = _quiet(fn, out, src, op=_REDUCE_OPS[op], group=group.pg, async_op=async_op)
    if dim != 0:
        if async_op:
            work.wait()
        out = out.movedim(0, dim)
    return (out, work) if async_op else out


def broadcast(t: torch.Tensor, group: Group, src: int = 0) -> torch.Tensor:
    """In-place broadcast from the group's local rank ``src``."""
    if group.size == 1:
        return t
    _trace(group, "broadcast", t, peer=group.ranks[src])
    group.stats.record(group.axis, "broadcast", _nbytes(t), _ring(group.size, _nbytes(t)))
    dist.broadcast(t, src=group.ranks[src], group=group.pg)
    return t


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


def isend(t: torch.Tensor, dst: int, group: Group, tag: int = 0) -> P2PWork:
    """Non-blocking send of ``t`` (with its header) to global rank ``dst``."""
    t = t.detach().contiguous()
    h = _header(t).to(t.device)
    _trace(group, "send", t, peer=dst, tag=tag)
    group.stats.record(group.axis, "send", _nbytes(t), _nbytes(t), meta=_nbytes(h))
    works = [dist.isend(h, dst=dst, group=group.pg, tag=tag), dist.isend(t, dst=dst, group=group.pg, tag=tag)]
    return P2PWork(works, (h, t))


def send(t: torch.Tensor, dst: int, group: Group, tag: int = 0) -> None:
    """Blocking send of ``t`` to global rank ``dst``."""
    isend(t, dst, group, tag).wait()


def recv(src: int, group: Group, device=None, tag: int = 0) -> torch.Tensor:
    """Receive a tensor sent by :func:`send` from global rank ``src``; shape and dtype come from the header."""
    h = torch.empty(_HEADER_LEN, dtype=torch.int64, device=device)
    _trace(group, "recv", None, peer=src, tag=tag)
    dist.recv(h, src=src, group=group.pg, tag=tag)
    h = h.tolist()
    dtype, ndim = _DTYPES[h[0]], h[1]
    t = torch.empty(h[2:2 + ndim], dtype=dtype, device=device)
    dist.recv(t, src=src, group=group.pg, tag=tag)
    group.stats.record(group.axis, "recv", _nbytes(t), 0, meta=_HEADER_LEN * 8)
    return t


# --- Megatron's conjugate operators as autograd functions -----------------------------------------

class _CopyToGroup(torch.autograd.Function):
    """f: identity forward, all-reduce of the gradient backward."""
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g.contiguous(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToSeq(torch.autograd.Function):
    """Keep this rank's chunk of ``dim`` forward; all-gather the gradient backward."""
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return x.chunk(group.size, dim)[group.rank].contiguous()

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, ctx.dim), None, None


class _GatherFromSeq(torch.autograd.Function):
    """All-gather along ``dim`` forward; keep this rank's chunk of the gradient backward."""
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(ctx.group.size, ctx.dim)[ctx.group.rank].contiguous(), None, None


class _ReduceScatterToSeq(torch.autograd.Function):
    """ḡ (sequence parallel): reduce-scatter along ``dim`` forward, all-gather backward."""
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, ctx.dim), None, None


class _AllGatherToSeq(torch.autograd.Function):
    """f̄ (sequence parallel): all-gather along ``dim`` forward, reduce-scatter backward."""
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter(g, ctx.group, ctx.dim), None, None


def copy_to_group(x, group: Group):
    return x if group.size == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x, group: Group):
    return x if group.size == 1 else _ReduceFromGroup.apply(x, group)


def scatter_to_seq(x, group: Group, dim: int = 1):
    return x if group.size == 1 else _ScatterToSeq.apply(x, group, dim)


def gather_from_seq(x, group: Group, dim: int = 1):
    return x if group.size == 1 else _GatherFromSeq.apply(x, group, dim)


def reduce_scatter_to_seq(x, group: Group, dim: int = 1):
    return x if group.size == 1 else _ReduceScatterToSeq.apply(x, group, dim)


def all_gather_to_seq(x, group: Group, dim: int = 1):
    return x if group.size == 1 else _AllGatherToSeq.apply(x, group, dim)
