"""Ring reduce-scatter and all-gather from point-to-point messages, for gloo (CPU) process groups.

Gloo's ``reduce_scatter`` is slower than its own ``all_reduce`` of the same tensor (it emulates it
with an all-reduce; timings in benchmarks/README.md), which would make ZeRO stages 1–2 pay more
than plain data parallelism for the same (N−1)/N·M bytes on the wire. The ring algorithms below
are the textbook ones (Patarasuk & Yuan, "Bandwidth optimal all-reduce algorithms for clusters
of workstations", JPDC 2009; the two halves of NCCL's ring all-reduce): with chunks c_0 … c_{N−1} of M/N bytes,

    reduce-scatter  step s = 0 … N−2: rank r sends its running sum of chunk (r−s−1) mod N to
                    r+1, receives chunk (r−s−2) mod N from r−1 and adds its own; after N−1 steps
                    rank r holds Σ_ranks c_r.
    all-gather      step s: rank r sends chunk (r−s) mod N to r+1 and receives (r−s−1) mod N.

Each moves (N−1)/N·M bytes per rank, as :mod:`parallel.comm.collectives` records. Every chunk is cut into
sub-chunks of ~1 MiB whose messages are all posted at once, so receiving one overlaps adding (and
forwarding) the previous one. Summation order per element is the ring's (for N = 2: a + b, exact either way).

Receive buffers (the partial sums coming from the left neighbour) are not allocated per call: for N = 2 with
``out`` apart from ``full`` (ZeRO-2/3's shard) the one incoming chunk lands directly in ``out`` and the own
chunk is added there (``out ← recv + own``: the same a + b); otherwise the buffers come from a small
per-process free list (:data:`SCRATCH`, at most ``SCRATCH_KEEP`` buffers per (dtype, size), ``SCRATCH_MAX``
bytes in all) that every call returns them to once its sends are done. A fresh multi-MiB tensor per call was
returned to the OS by malloc when freed and faulted in again, page by page, by gloo's receiving thread on
the next call (session 7: 32–38k fresh pages per step at 50M, ZeRO-1/2; tests/test_ring_buffers.py counts).

The returned handle posts the first step at once (for N = 2 that is everything: the messages move
in gloo's background while the caller computes) and does the rest in ``wait()``. Messages carry tags from a
per-process-group counter, so every rank must issue these in the same order — as any collective.
"""
from __future__ import annotations

import itertools
import weakref

import torch
import torch.distributed as dist

__all__ = ["use_ring", "ring_reduce_scatter", "ring_all_gather", "MIN_BYTES", "SCRATCH", "release_scratch"]

MIN_BYTES = 256 << 10          # below this, gloo's own collectives (one message) are as fast
SUB_BYTES = 1 << 20            # bytes per pipelined sub-chunk
_TAG_BASE = 1 << 24
_tags = weakref.WeakKeyDictionary()   # per group tag counter; weak: must not keep a group alive
calls = {"reduce_scatter": 0, "all_gather": 0}       # how often each ran (tests check the path is taken)
SCRATCH_KEEP = 8               # free receive buffers kept per (dtype, numel)
SCRATCH_MAX = 256 << 20        # ... and in bytes over all keys
SCRATCH: dict = {}             # (dtype, numel) -> free 1-D tensors
scratch_counts = {"allocated": 0, "reused": 0}


def _take(numel: int, dtype) -> torch.Tensor:
    free = SCRATCH.get((dtype, numel))
    if free:
        scratch_counts["reused"] += 1
        return free.pop()
    scratch_counts["allocated"] += 1
    return torch.empty(numel, dtype=dtype)


def _give(t: torch.Tensor) -> None:
    free = SCRATCH.setdefault((t.dtype, t.numel()), [])
    held = sum(x.numel() * x.element_size() for v in SCRATCH.values() for x in v)
    if len(free) < SCRATCH_KEEP and held + t.numel() * t.element_size() <= SCRATCH_MAX:
        free.append(t)


def release_scratch() -> int:
    """Free every kept receive buffer; returns the bytes released."""
    held = sum(x.numel() * x.element_size() for v in SCRATCH.values() for x in v)
    SCRATCH.clear()
    return held


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def use_ring(group, t: torch.Tensor) -> bool:
    """True for a gloo group of ≥ 2 ranks and a CPU tensor of at least ``MIN_BYTES``. The backend is
    looked up per call (a dict lookup in c10d), not cached by group: a module-level cache keyed by the
    process group kept every group alive, and with it gloo's threads, past destroy_process_group."""
    return ring_fits(group, t.numel() * t.element_size(), t.device)


def ring_fits(group, nbytes: int, device) -> bool:
    """:func:`use_ring` for ``nbytes`` on ``device`` without a tensor (a vector not yet built)."""
    if group.size < 2 or torch.device(device).type != "cpu" or nbytes < MIN_BYTES:
        return False
    try:
        return dist.get_backend(group.pg) == "gloo"
    except (RuntimeError, ValueError):
        return False


def _next_tag(pg) -> int:
    c = _tags.setdefault(pg, itertools.count())
    return _TAG_BASE + (next(c) % (1 << 20)) * 64


def _subs(t: torch.Tensor) -> list:
    k = max(1, min(64, t.numel() * t.element_size() // SUB_BYTES))
    return list(t.chunk(k))


class RingWork:
    """A handle like torch's ``Work``: ``wait()``, ``is_completed()``."""

    def __init__(self, steps):
        self._steps = steps              # a generator: yields lists of pending p2p works
        self._pending: list = []
        self._done = False
        self._advance()

    def _advance(self) -> None:
        try:
            self._pending = next(self._steps)
        except StopIteration:
            self._pending, self._done = [], True

    def is_completed(self) -> bool:
        """True once ``wait()`` has run: gloo's p2p handles report completion only after their own
        ``wait()``, so there is nothing to probe; callers retire these in program order, the same
        on every rank (which is also what keeps a ring with N > 2 from waiting on a busy peer)."""
        return self._done

    def wait(self) -> bool:
        while not self._done:
            for w in self._pending:
                w.wait()
            self._advance()
        return True


def _peers(group):
    n, r = group.size, group.rank
    return n, r, (r + 1) % n, (r - 1) % n


def _rs_steps(out, full, group, tag):
    n, r, nxt, prv = _peers(group)
    own = [_subs(c) for c in full.chunk(n)]
    res = _subs(out)
    k = len(res)
    direct = n == 2 and not _overlaps(out, full)     # the one incoming chunk lands in out (module docstring)
    flats = [] if direct else [_take(full.numel() // n, full.dtype) for _ in range(2 if n > 2 else 1)]
    bufs = [res] if direct else [_subs(f) for f in flats]

    def recv(s, j):
        return dist.irecv(bufs[s % len(bufs)][j], group=group.pg, group_src=prv, tag=tag + j)

    def send(x, j):
        return dist.isend(x, group=group.pg, group_dst=nxt, tag=tag + j)

    recvs = [recv(0, j) for j in range(k)]
    sends = [send(own[(r - 1) % n][j], j) for j in range(k)]      # step 0: the own chunk (r−1) mod n as is
    for s in range(n - 1):
        idx, cur = (r - s - 2) % n, bufs[s % len(bufs)]
        for j in range(k):
            yield [recvs[j]]                          # sub-chunk j of step s has arrived
            if s == n - 2:                            # the last step's sum is this rank's result
                if direct:
                    res[j].add_(own[idx][j])          # recv + own, as torch.add(recv, own) below
                else:
                    torch.add(cur[j], own[idx][j], out=res[j])
                continue
            cur[j].add_(own[idx][j])
            sends[j].wait()                           # its buffer receives step s + 1
            recvs[j], sends[j] = recv(s + 1, j), send(cur[j], j)
    yield sends
    for f in flats:                                   # every send from them is done
        _give(f)


def ring_reduce_scatter(out: torch.Tensor, full: torch.Tensor, group, async_op: bool = False):
    """Σ over ``group`` of ``full`` (1-D, contiguous, size divisible by N), this rank's chunk into ``out``."""
    if full.numel() % group.size or out.numel() * group.size != full.numel():
        raise ValueError(f"ring_reduce_scatter: {full.numel()} elements do not split into {group.size} chunks "
                         f"of {out.numel()}")
    calls["reduce_scatter"] += 1
    work = RingWork(_rs_steps(out, full.contiguous(), group, _next_tag(group.pg)))
    if async_op:
        return work
    work.wait()
    return None


def _ag_steps(out, shard, group, tag):
    n, r, nxt, prv = _peers(group)
    ch = [_subs(c) for c in out.chunk(n)]
    own = _subs(shard)                                # step 0 sends the shard itself (out's own chunk may be unfilled)
    k = len(ch[0])
    sends: list = []
    recvs = [None] * k
    for j in range(k):
        recvs[j] = dist.irecv(ch[(r - 1) % n][j], group=group.pg, group_src=prv, tag=tag + j)
        sends.append(dist.isend(own[j], group=group.pg, group_dst=nxt, tag=tag + j))
    for s in range(1, n - 1):                         # forward what the previous step received
        si, ri = (r - s) % n, (r - s - 1) % n
        for j in range(k):
            yield [recvs[j]]
            recvs[j] = dist.irecv(ch[ri][j], group=group.pg, group_src=prv, tag=tag + j)
            sends.append(dist.isend(ch[si][j], group=group.pg, group_dst=nxt, tag=tag + j))
    yield recvs + sends


def ring_all_gather(out: torch.Tensor, shard: torch.Tensor, group, async_op: bool = False, fill_own: bool = True):
    """Every rank's ``shard`` into its chunk of ``out`` (``shard`` may be ``out``'s own chunk). ``fill_own=False``:
    this rank's chunk of ``out`` is left as it is (the caller reads its own part from ``shard``: ZeRO-3's own views,
    :mod:`parallel.zero.own_views`); only the other ranks' chunks are received."""
    n = group.size
    if out.numel() != n * shard.numel():
        raise ValueError(f"ring_all_gather: out has {out.numel()} elements, expected {n} x {shard.numel()}")
    mine = out.chunk(n)[group.rank]
    if fill_own and mine.data_ptr() != shard.data_ptr():
        mine.copy_(shard)
    calls["all_gather"] += 1
    work = RingWork(_ag_steps(out, shard, group, _next_tag(group.pg)))
    if async_op:
        return work
    work.wait()
    return None
