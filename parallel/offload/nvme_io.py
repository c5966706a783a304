"""In-flight IO of the NVMe store (:class:`~parallel.offload.nvme.NvmeStore`): the records of reads and
writes, their completion — a write commits its new extent to the table (or, inside a transaction,
to the transaction's list) only when every chunk succeeded, else frees it and keeps the committed
copy — and the pool of ``buffer_count`` aligned host buffers (waiting for a write to return one,
:class:`BuffersExhaustedError` when resident tensors hold them all)."""
from __future__ import annotations

import time

import torch

from parallel.offload.aio import aligned_empty
from parallel.offload.errors import BuffersExhaustedError

__all__ = ["Slot", "Op", "CompletionMixin"]


class Slot:
    """A resident tensor: its buffer, the read filling it, and writes in flight from it."""
    __slots__ = ("key", "buf", "meta", "read", "writes", "released", "error")

    def __init__(self, key, buf, meta):
        self.key, self.buf, self.meta = key, buf, meta
        self.read, self.writes, self.released, self.error = None, 0, False, None

    def view(self) -> torch.Tensor:
        return self.buf[:self.meta.nbytes].view(self.meta.dtype).view(self.meta.shape)


class Op:
    """One in-flight read or write. kind: 'read' fills a slot; 'write' commits an extent on success;
    'part' is one staged chunk of a large write (frees its buffer; its parent commits)."""
    __slots__ = ("kind", "key", "futures", "bufs", "slot", "extent", "meta", "error", "finished", "reported")

    def __init__(self, kind, key, futures, bufs=(), slot=None, extent=None, meta=None):
        self.kind, self.key, self.futures, self.bufs, self.slot = kind, key, list(futures), list(bufs), slot
        self.extent, self.meta = extent, meta
        self.error, self.finished, self.reported = None, False, False

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def frees_buffer(self) -> bool:
        return bool(self.bufs) or (self.kind == "write" and self.slot is not None and self.slot.released)


class CompletionMixin:
    """Uses the store's ``_ops``, ``_slots``, ``_pending_write``, ``_unreported``, ``_table``, ``_meta``,
    ``_extents``, ``_txn``, ``_stats``, ``_free_bufs``, ``_n_bufs``, ``buffer_count``, ``buffer_bytes``
    and ``pin_memory``."""

    # --- completion -----------------------------------------------------------------------------
    def _reap(self) -> None:
        for op in list(self._ops):
            if not op.finished and op.done():
                self._finish(op)

    def _stall(self, op: Op) -> None:
        if not op.finished:
            t0 = time.perf_counter()
            self._finish(op)
            self._stats.stall_s += time.perf_counter() - t0

    def _finish(self, op: Op) -> None:
        """Wait for ``op``'s futures, then commit or roll back. Runs once per op, on a caller thread."""
        if op.finished:
            return
        for f in op.futures:
            try:
                f.result()
            except BaseException as e:                  # noqa: BLE001 - recorded and re-raised to the caller
                op.error = op.error or e
        op.finished = True
        self._ops.remove(op)
        for b in op.bufs:
            self._free_buf(b)
        if op.kind == "read":
            op.slot.read, op.slot.error = None, op.error
            self._stats.disk_bytes_read += op.extent[1]
            if op.slot.released:
                self._free_buf(op.slot.buf)
        elif op.kind == "write":
            if self._pending_write.get(op.key) is op:
                del self._pending_write[op.key]
            if op.error is None:
                self._stats.disk_bytes_written += op.extent[1]
                if self._txn is not None:
                    self._txn.append((op.key, op.extent, op.meta))
                else:
                    self._commit(op.key, op.extent, op.meta)
            else:
                self._extents.free(op.extent)
                self._unreported.append(op)
                if op.key in self._table:
                    self._meta[op.key] = self._table[op.key][1]
                elif self._meta.get(op.key) is op.meta and op.key not in self._pending_write:
                    del self._meta[op.key]
            if op.slot is not None:
                op.slot.writes -= 1
                if op.slot.released and op.slot.writes == 0:
                    self._free_buf(op.slot.buf)

    def _commit(self, key, extent, meta) -> None:
        old = self._table.get(key)
        self._table[key] = (extent, meta)
        if old is not None:
            self._extents.free(old[0])

    def _drop_slot(self, slot: Slot) -> None:
        if self._slots.get(slot.key) is slot:
            del self._slots[slot.key]
        slot.released = True
        if slot.read is not None:
            self._finish(slot.read)                    # frees the buffer (released) when done
        elif slot.writes == 0:
            self._free_buf(slot.buf)

    # --- buffers and extents --------------------------------------------------------------------
    def _acquire(self) -> torch.Tensor:
        while True:
            self._reap()
            if self._free_bufs:
                buf = self._free_bufs.pop()
            elif self._n_bufs < self.buffer_count:
                buf = aligned_empty(self.buffer_bytes, pin=self.pin_memory)
                self._n_bufs += 1
            else:
                op = next((o for o in self._ops if o.frees_buffer()), None)
                if op is None:
                    raise BuffersExhaustedError(
                        f"all {self.buffer_count} IO buffers are held by resident tensors {list(self._slots)!r}; "
                        f"release() tensors you are done with, or raise zero.offload.buffer_count")
                self._stall(op)
                continue
            self._stats.buffers_in_use += 1
            self._stats.peak_buffers = max(self._stats.peak_buffers, self._stats.buffers_in_use)
            return buf

    def _free_buf(self, buf) -> None:
        self._free_bufs.append(buf)
        self._stats.buffers_in_use -= 1
