"""Ring reduce-scatter over two ranks straight from the gradients' own tensors, without a flat copy of them.

ZeRO-3 (and FSDP) reduce-scatter a unit's gradient as one flat vector of ``padded = 2·S`` elements: the
parameters' gradients laid end to end (+ padding), rank r receiving the sum of chunk ``[r·S, (r+1)·S)``. The
usual way builds that vector first — every gradient copied into a flat buffer (read 4, write 4 bytes per
element, Ψ·4 bytes a step per rank: FSDP2's ``chunk_cat``, our reducer's ``flat_grad``) — and then sends one
half of it. Over N = 2 with the p2p ring of :mod:`parallel.comm.ring` nothing needs the vector itself:

    rank r sends, for every part (a parameter's gradient, or the padding) that overlaps the peer's chunk,
    that overlap as one message (cut into ≤ ``SUB_BYTES`` sub-messages) straight from the gradient tensor;
    it receives the same cuts of its own chunk into ``out`` and adds its own gradient's overlap there:
    ``out ← recv + own`` — the same a + b per element as the flat ring (:mod:`parallel.comm.ring`, N = 2),
    so the result is bitwise the flat path's.

Both ranks cut the flat index range by the same part boundaries (the bucket's layout, the same on every rank)
and the same sub-message size, so the k-th message of one rank's send is the k-th receive of the other, of
equal size. Neighbouring pieces under ``PACK_BYTES`` each (norm weights, biases) travel as one message
(:func:`messages`): the sender copies them into one small buffer (a block's few KiB), the receiver takes the
message into its contiguous range of ``out`` and adds each own piece there as before — every p2p message costs
a rendezvous and a receive posting (a GPT block at n_embd 256: 9 + 4 messages per reduce-scatter became 6 + 4).
Messages carry tags from the ring's per-group counter (one 64-tag block per 64 messages).
Patarasuk & Yuan, JPDC 2009 (the ring); FSDP's flat-parameter reduce-scatter (Zhao et al., arXiv 2304.11277).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.comm import ring
from parallel.comm.ring import RingWork

__all__ = ["cuts", "messages", "ring_reduce_scatter_parts", "parts_fit", "PACK_BYTES"]

PACK_BYTES = 64 << 10          # pieces below this share a message with their small neighbours (module docstring)


def cuts(sizes: list, lo: int, hi: int, sub: int) -> list:
    """``(part index, a, b)`` in part-local element indices: the flat range [lo, hi) of parts of ``sizes`` laid
    end to end, cut at part boundaries and into pieces of at most ``sub`` elements; in flat order."""
    out, off = [], 0
    for i, n in enumerate(sizes):
        a, b = max(off, lo), min(off + n, hi)
        while a < b:
            e = min(b, a + sub)
            out.append((i, a - off, e - off))
            a = e
        off += n
    return out


def messages(pieces: list, sub: int, pack: int) -> list:
    """:func:`cuts`' pieces grouped into messages, in flat order: a piece of ``pack`` elements or more alone, runs
    of smaller neighbouring pieces together up to ``sub`` elements."""
    out, run, run_n = [], [], 0
    for pc in pieces:
        n = pc[2] - pc[1]
        if run and (n >= pack or run_n + n > sub):     # the run ends: a large piece, or no room left
            out.append(run)
            run, run_n = [], 0
        if n >= pack:
            out.append([pc])
        else:
            run.append(pc)
            run_n += n
    if run:
        out.append(run)
    return out


def _messages(sizes: list, lo: int, hi: int, sub: int, itemsize: int) -> list:
    return messages(cuts(sizes, lo, hi, sub), sub, max(1, PACK_BYTES // itemsize))


def parts_fit(group, numel: int, dtype: torch.dtype, device) -> bool:
    """Whether a reduce-scatter of ``numel`` elements over ``group`` runs on the ring at N = 2 (this path)."""
    return group.size == 2 and ring.ring_fits(group, numel * dtype.itemsize, device)


def _steps(out, parts, group, tags):
    r, peer = group.rank, 1 - group.rank
    S, sub = out.numel(), max(1, ring.SUB_BYTES // out.element_size())
    sizes = [t.numel() for t in parts]
    mine = _messages(sizes, r * S, (r + 1) * S, sub, out.element_size())
    theirs = _messages(sizes, peer * S, (peer + 1) * S, sub, out.element_size())

    def tag(j):
        return tags[j // 64] + j % 64

    def payload(msg):                                 # one piece: the gradient's own slice; several: packed
        views = [parts[i][a:b] for i, a, b in msg]
        return views[0] if len(views) == 1 else torch.cat(views)
    recvs, pos = [], 0
    for j, msg in enumerate(mine):
        n = sum(b - a for _, a, b in msg)
        recvs.append(dist.irecv(out[pos:pos + n], group=group.pg, group_src=peer, tag=tag(j)))
        pos += n
    bufs = [payload(msg) for msg in theirs]           # alive until the sends are done
    sends = [dist.isend(x, group=group.pg, group_dst=peer, tag=tag(j)) for j, x in enumerate(bufs)]
    pos = 0
    for j, msg in enumerate(mine):
        yield [recvs[j]]
        for i, a, b in msg:
            out[pos:pos + b - a].add_(parts[i][a:b])  # recv + own, as the flat ring's N = 2 step
            pos += b - a
    yield sends


def ring_reduce_scatter_parts(out: torch.Tensor, parts: list, group, async_op: bool = False):
    """Σ over the 2 ranks of ``group`` of the flat vector ``torch.cat(parts)`` (never built), this rank's
    half into ``out`` (1-D, contiguous). ``parts``: 1-D contiguous tensors of ``out``'s dtype, the same sizes on
    both ranks; they must stay unchanged until the returned work's ``wait()``."""
    if group.size != 2:
        raise ValueError(f"ring_reduce_scatter_parts: a group of 2 ranks, not {group.size} (use the flat ring)")
    total = sum(t.numel() for t in parts)
    if total != 2 * out.numel():
        raise ValueError(f"ring_reduce_scatter_parts: the parts hold {total} elements, expected 2 x {out.numel()}")
    if any(t.dim() != 1 or not t.is_contiguous() or t.dtype != out.dtype for t in parts):
        raise ValueError("ring_reduce_scatter_parts: every part must be 1-D, contiguous and of out's dtype")
    sub = max(1, ring.SUB_BYTES // out.element_size())
    n = max(len(_messages([t.numel() for t in parts], k * out.numel(), (k + 1) * out.numel(), sub, out.element_size()))
            for k in (0, 1))
    tags = [ring._next_tag(group.pg) for _ in range(-(-n // 64))]
    ring.calls["reduce_scatter"] += 1
    work = RingWork(_steps(out, parts, group, tags))
    if async_op:
        return work
    work.wait()
    return None
