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
Point-to-point messages are in :mod:`parallel.comm.p2p`, the Megatron f / g operators in
:mod:`parallel.comm.mappings`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.comm.ring import ring_all_gather, ring_reduce_scatter, use_ring
from parallel.comm.ring_parts import ring_reduce_scatter_parts

__all__ = ["CommStats", "Group", "all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_gather_into",
           "reduce_scatter_into"]

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


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
    fingerprints of :mod:`parallel.reliability.fingerprint` and the watchdog's "last collective" use. It is
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


def all_gather_into(out: torch.Tensor, shard: torch.Tensor, group: Group, async_op: bool = False,
                    fill_own: bool = True):
    """All-gather equal ``shard``s into the preallocated contiguous ``out`` (``shard`` may be ``out``'s own
    slice). Recorded as all_gather with M = bytes of ``out``: (N−1)/N · M on the wire. Returns the Work
    handle (None when the group has one rank or the call was synchronous). ``fill_own=False`` allows leaving
    this rank's chunk of ``out`` unwritten (one rank, and the gloo ring, skip copying ``shard`` there; other
    backends write it anyway): for a caller that reads its own part from ``shard``."""
    if group.size == 1:
        if fill_own and out.data_ptr() != shard.data_ptr():
            out.copy_(shard.view_as(out))
        return None
    _trace(group, "all_gather", shard)
    group.stats.record(group.axis, "all_gather", _nbytes(out), _ring(group.size, _nbytes(out)))
    if use_ring(group, out):                       # gloo: p2p ring (comm/ring.py)
        return ring_all_gather(out.view(-1), shard.reshape(-1), group, async_op=async_op, fill_own=fill_own)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return _quiet(fn, out, shard, group=group.pg, async_op=async_op)


def reduce_scatter_into(out: torch.Tensor, full: torch.Tensor, group: Group, op: str = "sum",
                        async_op: bool = False):
    """Reduce the contiguous ``full`` over ranks; this rank's equal chunk lands in ``out``. Recorded as
    reduce_scatter with M = bytes of ``full``: (N−1)/N · M on the wire. Returns the Work handle or None."""
    if group.size == 1:
        out.copy_(full.view_as(out))
        return None
    _trace(group, "reduce_scatter", full)
    group.stats.record(group.axis, "reduce_scatter", _nbytes(full), _ring(group.size, _nbytes(full)))
    if op == "sum" and use_ring(group, full):      # gloo: p2p ring (comm/ring.py)
        return ring_reduce_scatter(out.view(-1), full.reshape(-1), group, async_op=async_op)
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return _quiet(fn, out, full, op=_REDUCE_OPS[op], group=group.pg, async_op=async_op)


def reduce_scatter_parts_into(out: torch.Tensor, parts: list, group: Group, async_op: bool = False):
    """:func:`reduce_scatter_into` of the flat vector ``torch.cat(parts)`` without building it: two ranks on the
    gloo ring only (:mod:`parallel.comm.ring_parts`); recorded as that reduce-scatter (M = bytes of the parts)."""
    m = sum(_nbytes(t) for t in parts)
    _trace(group, "reduce_scatter", torch.empty((), dtype=out.dtype).expand(m // out.element_size()))
    group.stats.record(group.axis, "reduce_scatter", m, _ring(group.size, m))
    return ring_reduce_scatter_parts(out.view(-1), parts, group, async_op=async_op)


def _moved_back(out: torch.Tensor, work, dim: int, async_op: bool):
    if dim != 0:
        if async_op and work is not None:
            work.wait()
        out = out.movedim(0, dim)
    return (out, work) if async_op else out


def all_gather(t: torch.Tensor, group: Group, dim: int = 0, async_op: bool = False):
    """Concatenate every rank's ``t`` along ``dim``. Returns the output, or (output, work)."""
    if group.size == 1:
        return (t, None) if async_op else t
    src = t.movedim(dim, 0).contiguous() if dim != 0 else t.contiguous()
    out = torch.empty((group.size * src.shape[0],) + tuple(src.shape[1:]), dtype=t.dtype, device=t.device)
    work = all_gather_into(out, src, group, async_op=async_op)
    return _moved_back(out, work, dim, async_op)


def reduce_scatter(t: torch.Tensor, group: Group, dim: int = 0, op: str = "sum", async_op: bool = False):
    """Reduce ``t`` over ranks and keep this rank's equal chunk along ``dim``."""
    if group.size == 1:
        return (t, None) if async_op else t
    if t.shape[dim] % group.size:
        raise ValueError(f"reduce_scatter on axis {group.axis!r}: dim {dim} of size {t.shape[dim]} "
                         f"does not divide into {group.size} equal chunks")
    src = t.movedim(dim, 0).contiguous() if dim != 0 else t.contiguous()
    out = torch.empty((src.shape[0] // group.size,) + tuple(src.shape[1:]), dtype=t.dtype, device=t.device)
    work = reduce_scatter_into(out, src, group, op=op, async_op=async_op)
    return _moved_back(out, work, dim, async_op)


def broadcast(t: torch.Tensor, group: Group, src: int = 0) -> torch.Tensor:
    """In-place broadcast from the group's local rank ``src``."""
    if group.size == 1:
        return t
    _trace(group, "broadcast", t, peer=group.ranks[src])
    group.stats.record(group.axis, "broadcast", _nbytes(t), _ring(group.size, _nbytes(t)))
    dist.broadcast(t, src=group.ranks[src], group=group.pg)
    return t
