"""NVMe tier of the tensor store (ZeRO-Infinity, Rajbhandari et al., arXiv 2104.07857, §5–6).

Layout: one file per store (created as ``<nvme_path>/<name>`` and unlinked at once, so the disk
gets the space back whenever the process ends, crashes included), an in-memory allocation table
``key → (offset, span)`` and a free list of extents. Every extent starts and ends on a 4096-byte
boundary (``span = align_up(nbytes)``) so the file can be opened with O_DIRECT.

Copy-on-write: ``put`` always writes into a *new* extent and commits the table entry only when
every chunk of the write has succeeded; the old extent is freed after the commit. A write that
fails (ENOSPC mid-run, an IO error) frees its new extent and leaves the committed copy untouched,
and its error surfaces from ``handle.wait()`` / ``flush()`` as :class:`StoreFullError`. The table
lives in memory: the store is scratch space for one run, not a checkpoint format.

Memory is bounded by a pool of ``buffer_count`` aligned host buffers of ``buffer_bytes`` each
(pinned when CUDA is present). A resident tensor (prefetched or got, not yet released) occupies one
buffer; a ``put`` of a non-resident tensor stages through buffers that return to the pool when its
write completes. When all buffers are in use the store waits for in-flight writes to free one; if
every buffer is held by a resident tensor it raises :class:`BuffersExhaustedError` instead of
deadlocking. Tensors larger than one buffer can be ``put`` and read with ``get(key, out=...)``
(both chunk through the pool) but cannot be made resident. (:mod:`.nvme_io`: the IO records, their
completion and the pool.)

Transactions (``begin`` … ``prepare`` → ``commit`` | ``abort``) make a set of puts all-or-nothing,
as an optimizer step over many sub-groups needs: inside one, a completed write does not replace the
committed copy; ``commit`` switches every key at once (and frees the old extents), ``abort`` drops
the new extents and every key keeps its value from before ``begin``. The price is disk space: old
and new copies of everything put coexist until the commit (reserve twice the state).
"""
from __future__ import annotations

import os
import time
import weakref
from concurrent.futures import Future

import torch

from parallel.offload.aio import IOEngine, align_up, check_dir, preallocate, probe_direct
from parallel.offload.alloc import ExtentAllocator
from parallel.offload.errors import StoreConfigError, StoreError, StoreFullError
from parallel.offload.nvme_io import CompletionMixin, Op, Slot
from parallel.offload.store import Handle, TensorMeta, TensorStore, _as_list
from parallel.offload.txn import TransactionsMixin

__all__ = ["NvmeStore"]


class NvmeStore(TransactionsMixin, CompletionMixin, TensorStore):
    """Tensors in a file under ``path``, moved by a thread pool with O_DIRECT where supported.

    Args: path (existing writable directory), buffer_count / buffer_bytes (the host buffer pool),
    workers (IO threads), chunk_bytes (size of one IO request), direct (try O_DIRECT; the outcome
    is ``self.direct`` and, when off, ``self.direct_reason``), pin_memory (default: CUDA present),
    name (file name; default unique per process and store), pwrite (fault-injection hook).
    """

    medium = "nvme"

    def __init__(self, path: str, *, buffer_count: int = 4, buffer_bytes: int = 64 << 20, workers: int = 4,
                 chunk_bytes: int = 8 << 20, direct: bool = True, pin_memory: bool | None = None,
                 name: str | None = None, pwrite=os.pwrite):
        super().__init__()
        check_dir(path)
        if buffer_count < 1:
            raise StoreConfigError(f"zero.offload.buffer_count must be ≥ 1, got {buffer_count}")
        if buffer_bytes < 1:
            raise StoreConfigError(f"zero.offload.buffer_mb must be > 0, got {buffer_bytes} bytes")
        self.path = path
        self.buffer_count, self.buffer_bytes = int(buffer_count), align_up(int(buffer_bytes))
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.direct, self.direct_reason = probe_direct(path) if direct else (False, "disabled (direct=False)")
        self.fallocate_reason = ""
        self.file = os.path.join(path, name or f"p3d-store-{os.getpid()}-{id(self):x}.bin")
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if self.direct else 0)
        self._fd = os.open(self.file, flags, 0o600)
        os.unlink(self.file)            # scratch space: the disk gets it back when the fd closes, even after a crash
        self._io = IOEngine(workers, chunk_bytes, pwrite)
        self._finalizer = weakref.finalize(self, _cleanup, self._fd, self.file, self._io)
        self._free_bufs: list[torch.Tensor] = []
        self._n_bufs = 0
        self._table: dict = {}                      # key -> (offset, span), committed
        self._extents = ExtentAllocator()
        self._slots: dict = {}
        self._ops: list[Op] = []
        self._pending_write: dict = {}
        self._unreported: list[Op] = []
        self._txn: list | None = None               # (key, extent, meta) written, not yet committed
        self._txn_keys: set = set()

    # --- interface ----------------------------------------------------------------------------
    def put(self, key, tensor):
        self._check_tensor(key, tensor)
        with self._lock:
            self._reap()
            if key in self._pending_write:                         # one write per key in flight
                self._stall(self._pending_write[key])
            meta = TensorMeta(tensor.shape, tensor.dtype)
            slot = self._slots.get(key)
            if slot is not None and slot.meta != meta:
                raise StoreError(f"put({key!r}) changes a resident tensor from {tuple(slot.meta.shape)} "
                                 f"{slot.meta.dtype} to {tuple(meta.shape)} {meta.dtype}; release({key!r}) first")
            if meta.nbytes == 0:
                self._count_write(0)
                self._meta[key] = meta
                if self._txn is not None:
                    self._txn_keys.add(key)
                    self._txn.append((key, (0, 0), meta))
                else:
                    self._commit(key, (0, 0), meta)
                return Handle()
            extent = self._extents.alloc(align_up(meta.nbytes))
            try:
                if slot is not None:
                    op = self._put_resident(key, tensor, slot, meta, extent)
                elif extent[1] <= self.buffer_bytes:
                    op = self._put_staged(key, tensor, meta, extent)
                else:
                    op = self._put_chunked(key, tensor, meta, extent)
            except BaseException:
                self._extents.free(extent)                         # nothing was committed
                raise
            self._count_write(meta.nbytes)
            self._meta[key] = meta                                 # visible now; rolled back on failure
            if self._txn is not None:
                self._txn_keys.add(key)
            self._ops.append(op)
            self._pending_write[key] = op
            return Handle(wait=lambda: self._wait_handle(op), done=op.done)

    def get(self, key, out=None):
        with self._lock:
            self._reap()
            meta = self._require(key)
            if out is not None:
                self._check_out(key, out)
            if meta.nbytes == 0:
                self._count_read(0)
                self._stats.hits += 1
                return out if out is not None else torch.empty(meta.shape, dtype=meta.dtype)
            slot = self._slots.get(key)
            if slot is None and out is not None:
                return self._read_into(key, out)
            issued = slot is None
            if issued:
                slot = self._start_read(key)
            if slot.read is not None:
                if slot.read.done() and not issued:
                    self._finish(slot.read)
                    self._stats.hits += 1
                else:
                    t0 = time.perf_counter()
                    self._finish(slot.read)
                    self._stats.wait_s += time.perf_counter() - t0
                    self._stats.misses += 1
            else:
                self._stats.hits += 1
            if slot.error is not None:
                err, slot.error = slot.error, None
                self._drop_slot(slot)
                raise StoreError(f"reading {key!r} from {self.file} failed: {err}") from err
            return out.copy_(slot.view()) if out is not None else slot.view()

    def prefetch(self, keys):
        with self._lock:
            self._reap()
            for k in _as_list(keys):
                if self._require(k).nbytes and k not in self._slots:
                    self._start_read(k)

    def release(self, key):
        with self._lock:
            self._require(key)
            slot = self._slots.get(key)
            if slot is not None:
                self._drop_slot(slot)
            self._reap()

    def delete(self, key):
        with self._lock:
            if self._txn is not None:
                raise StoreError(f"delete({key!r}) inside a transaction: commit() or abort() it first")
            self.release(key)
            if key in self._pending_write:
                self._stall(self._pending_write[key])
            entry = self._table.pop(key, None)
            if entry is not None:
                self._extents.free(entry[0])
            self._meta.pop(key, None)

    def flush(self):
        with self._lock:
            for op in list(self._ops):
                self._stall(op)
            if self._txn is not None:
                return                                 # failures of a transaction surface in prepare()
            failed, self._unreported = self._unreported, []
            for op in failed:
                op.reported = True
            if failed:
                keys = [op.key for op in failed]
                cls = StoreFullError if any(isinstance(op.error, StoreFullError) for op in failed) else StoreError
                raise cls(f"{len(failed)} put(s) failed, keys {keys!r}; their previous values are intact: "
                          f"{failed[0].error}") from failed[0].error

    def reserve(self, total_bytes: int) -> None:
        """Check free space for ``total_bytes`` of tensors plus copy-on-write slack (one pool's worth,
        ``buffer_count × buffer_bytes``), then preallocate the file so the run cannot hit ENOSPC there.
        A put of a tensor larger than one buffer needs its own size as extra slack."""
        with self._lock:
            slack = min(self.buffer_count * self.buffer_bytes, align_up(int(total_bytes)))   # ≤ all of it in flight
            self.fallocate_reason = preallocate(self._fd, self.path, align_up(int(total_bytes)) + slack,
                                                f"{total_bytes} bytes of state + {slack} of copy-on-write slack, "
                                                f"buffer_count × buffer_mb")

    @property
    def file_bytes(self) -> int:
        """Size of the store's (unlinked) file on disk."""
        return os.fstat(self._fd).st_size

    def close(self):
        if not self._finalizer.alive:
            return
        if self._txn is not None:
            self.abort()
        try:
            self.flush()
        finally:
            self._slots.clear()
            self._finalizer()

    # --- writes ---------------------------------------------------------------------------------
    def _put_resident(self, key, tensor, slot, meta, extent) -> Op:
        if slot.read is not None:
            self._stall(slot.read)
        view = slot.view()
        if not (view.data_ptr() == tensor.data_ptr() and tensor.is_contiguous()):
            view.copy_(tensor)                                 # keep the resident copy equal to the put
        slot.writes += 1
        return Op("write", key, self._io.write(self._fd, slot.buf, extent[0], extent[1]), slot=slot,
                   extent=extent, meta=meta)

    def _put_staged(self, key, tensor, meta, extent) -> Op:
        buf = self._acquire()
        before = None
        if tensor.device.type == "cuda" and self.pin_memory:
            buf[:meta.nbytes].view(meta.dtype).view(meta.shape).copy_(tensor, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            before = ev.synchronize
        else:
            buf[:meta.nbytes].view(meta.dtype).view(meta.shape).copy_(tensor)
        futures = self._io.write(self._fd, buf, extent[0], extent[1], before)
        return Op("write", key, futures, bufs=[buf], extent=extent, meta=meta)

    def _put_chunked(self, key, tensor, meta, extent) -> Op:
        src = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        futures: list[Future] = []
        parts: list[Op] = []
        try:
            for s in range(0, meta.nbytes, self.buffer_bytes):
                n = min(self.buffer_bytes, meta.nbytes - s)
                buf = self._acquire()                  # may wait for this put's earlier parts
                buf[:n].copy_(src[s:s + n])
                parts.append(Op("part", key, self._io.write(self._fd, buf, extent[0] + s, align_up(n)), bufs=[buf]))
                self._ops.append(parts[-1])
                futures += parts[-1].futures
        except BaseException:
            for part in parts:                         # let issued parts land before the extent is freed
                self._stall(part)
            raise
        return Op("write", key, futures, extent=extent, meta=meta)

    def _wait_handle(self, op: Op) -> None:
        with self._lock:
            self._stall(op)
            if op.error is not None:
                if not op.reported:
                    op.reported = True
                    self._unreported.remove(op)
                cls = StoreFullError if isinstance(op.error, StoreFullError) else StoreError
                raise cls(f"put({op.key!r}) failed; its previous value is intact: {op.error}") from op.error

    def _settle(self, key) -> None:
        """Wait for the in-flight put of ``key``, if any; raise its failure here (once) rather than
        silently serving the older value."""
        op = self._pending_write.get(key)
        if op is not None:
            self._stall(op)
            if op.error is not None and not op.reported:
                self._wait_handle(op)

    # --- reads ----------------------------------------------------------------------------------
    def _start_read(self, key) -> Slot:
        self._check_txn_read(key)
        self._settle(key)
        (offset, span), meta = self._table[key]
        if span > self.buffer_bytes:
            raise StoreConfigError(
                f"tensor {key!r} is {meta.nbytes} bytes, more than one IO buffer ({self.buffer_bytes}); read it with "
                f"get({key!r}, out=tensor), or raise zero.offload.buffer_mb to at least {span / 2**20:.1f}")
        slot = Slot(key, self._acquire(), meta)
        slot.read = Op("read", key, self._io.read(self._fd, slot.buf, offset, span), slot=slot, extent=(offset, span))
        self._slots[key] = slot
        self._ops.append(slot.read)
        self._count_read(meta.nbytes)
        return slot

    def _read_into(self, key, out: torch.Tensor) -> torch.Tensor:
        """Chunked read through the pool into ``out`` without making ``key`` resident."""
        self._check_txn_read(key)
        self._settle(key)
        (offset, span), meta = self._table[key]
        direct = out.device.type == "cpu" and out.is_contiguous()
        dst = out if direct else torch.empty(meta.shape, dtype=meta.dtype)
        dst_bytes = dst.reshape(-1).view(torch.uint8)
        t0 = time.perf_counter()
        for s in range(0, span, self.buffer_bytes):
            n = min(self.buffer_bytes, span - s)
            buf = self._acquire()
            try:
                for f in self._io.read(self._fd, buf, offset + s, n):
                    f.result()
                m = min(n, meta.nbytes - s)
                dst_bytes[s:s + m].copy_(buf[:m])
            finally:
                self._free_buf(buf)
        self._stats.wait_s += time.perf_counter() - t0
        self._stats.misses += 1
        self._stats.disk_bytes_read += span
        self._count_read(meta.nbytes)
        return out if direct else out.copy_(dst)

def _cleanup(fd: int, file: str, io: IOEngine) -> None:
    io.shutdown()
    try:
        os.close(fd)
    finally:
        if os.path.exists(file):
            os.unlink(file)
