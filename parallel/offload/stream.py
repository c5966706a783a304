"""Stream sub-groups of tensors through a bounded number of buffers (ZeRO-Offload / ZeRO-Infinity).

The optimizer step of ZeRO-Offload (Ren et al., arXiv 2101.06840, §4) runs on the CPU over the
rank's partition; with the partition on NVMe (ZeRO-Infinity, arXiv 2104.07857, §5.1) it is split
into sub-groups that are swapped in, updated and swapped out one after another, so host memory holds
a fixed number of them regardless of model size. For sub-groups 0 … n−1, prefetch depth d and k
buffers, step i does

    prefetch(i+1 … i+d)   (only while fewer than k sub-groups are in memory)
    get(i) → fn(i, tensors) → put(i) (asynchronous) → release(i)

so the read of i+d and the write of i−1 overlap fn on i. A sub-group counts as "in memory" from
its prefetch until its write-back has completed; before another is read, the oldest write-back is
waited for. Hence at most k sub-groups are ever in memory, and k ≥ d + 1 is required (d ahead plus
the one being updated); k ≥ d + 2 lets a write-back overlap the next read.

Elementwise updates (Adam, AdamW, SGD with per-element state) give bit-identical results whether
the partition is updated whole or in sub-groups: the tests check this with zero tolerance.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from parallel.offload.errors import StoreConfigError

__all__ = ["stream_update", "stream_read", "StreamStats"]


@dataclass
class StreamStats:
    subgroups: int = 0
    peak_resident: int = 0          # most sub-groups in memory at once (≤ buffers)
    prefetched: int = 0             # sub-groups whose read was issued during an earlier step
    write_waits: int = 0            # times a new read had to wait for an older write-back


def stream_update(store, groups, fn, *, buffers: int = 2, prefetch_depth: int = 1,
                  wait_writes: bool = True) -> StreamStats:
    """Apply ``fn(i, tensors)`` to every sub-group ``groups[i]`` of ``store``, in order, in place.

    ``groups`` is a list whose items are a key or a tuple/list of keys (one sub-group, e.g. the
    fp32 master weights, exp_avg and exp_avg_sq of one slice of the partition). ``fn`` receives the
    resident tensors in the same order and updates them in place (return None), or returns a list
    of tensors to store instead. Everything is written back to the store. Returns :class:`StreamStats`.
    ``wait_writes=False`` returns with the last write-backs still in flight (the store's ``flush`` /
    ``prepare`` waits for them and reports their errors), so the caller computes while the disk writes.
    """
    if buffers < 1 or prefetch_depth < 0:
        raise StoreConfigError(f"stream_update needs buffers ≥ 1 and prefetch_depth ≥ 0, "
                               f"got {buffers}, {prefetch_depth}")
    if buffers < prefetch_depth + 1:
        raise StoreConfigError(f"prefetch_depth={prefetch_depth} needs buffers ≥ {prefetch_depth + 1} "
                               f"(the sub-groups read ahead plus the one being updated), got {buffers}; "
                               f"raise zero.offload.buffer_count or lower zero.offload.prefetch_depth")
    subs = [tuple(g) if isinstance(g, (tuple, list)) else (g,) for g in groups]
    width = max((len(s) for s in subs), default=0)
    pool = getattr(store, "buffer_count", None)
    if pool is not None and pool < buffers * width:
        raise StoreConfigError(f"streaming {buffers} sub-groups of {width} tensors needs {buffers * width} "
                               f"store buffers, the store has {pool}; "
                               f"raise zero.offload.buffer_count or lower the stream's buffers")
    stats = StreamStats(subgroups=len(subs))
    writing: deque = deque()                     # write-back handles, oldest first
    resident = issued = 0

    def make_room() -> bool:
        nonlocal resident
        while resident >= buffers:
            if not writing:
                return False
            for h in writing.popleft():
                h.wait()
            resident -= 1
            stats.write_waits += 1
        return True

    held: set = set()                            # keys read (prefetched or got) and not yet released
    try:
        for i, keys in enumerate(subs):
            stats.prefetched += int(i < issued)      # read issued during an earlier step: overlapped
            while issued <= min(i + prefetch_depth, len(subs) - 1):
                if not make_room():
                    break
                store.prefetch(subs[issued])
                held.update(subs[issued])
                resident += 1
                issued += 1
                stats.peak_resident = max(stats.peak_resident, resident)
            if issued <= i:                          # cannot happen with buffers ≥ d + 1; kept as a guard
                raise AssertionError("stream_update: no buffer free for the current sub-group")
            tensors = [store.get(k) for k in keys]
            new = fn(i, tensors)
            if new is not None:
                if len(new) != len(keys):
                    raise ValueError(f"fn returned {len(new)} tensors for sub-group {i} of {len(keys)} keys {keys!r}")
                tensors = list(new)
            writing.append([store.put(k, t) for k, t in zip(keys, tensors)])
            for k in keys:
                store.release(k)
                held.discard(k)
        while writing and wait_writes:
            for h in writing.popleft():
                h.wait()
    except BaseException:
        _settle_after_error(store, held, writing)
        raise
    return stats


def _settle_after_error(store, held, writing) -> None:
    """After a failure mid-stream: let in-flight writes land and give back every buffer we hold, so
    the store is usable (and a transaction can be aborted). The first error is the one raised."""
    for hs in writing:
        for h in hs:
            try:
                h.wait()
            except Exception:                    # noqa: BLE001 - already failing; the caller sees the first error
                pass
    for k in held:
        try:
            store.release(k)
        except Exception:                        # noqa: BLE001
            pass


def stream_read(store, keys, fn, *, prefetch_depth: int = 1) -> int:
    """Read-only streaming: ``fn(i, tensor)`` for every key in order, reading ``prefetch_depth`` keys
    ahead (needs ``prefetch_depth + 1`` store buffers). Nothing is written back. Returns the count."""
    keys = list(keys)
    ahead = 0
    try:
        for i, k in enumerate(keys):
            while ahead <= min(i + prefetch_depth, len(keys) - 1):
                store.prefetch([keys[ahead]])
                ahead += 1
            fn(i, store.get(k))
            store.release(k)
    except BaseException:
        for k in keys[:ahead]:
            try:
                store.release(k)
            except Exception:                    # noqa: BLE001
                pass
        raise
    return len(keys)
