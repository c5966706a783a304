"""Asynchronous file IO for the NVMe tier: aligned host buffers, O_DIRECT probing, a worker pool.

The NVMe tier of ZeRO-Infinity (Rajbhandari et al., arXiv 2104.07857, §6.2, "DeepNVMe") gets
near-peak disk bandwidth from three things, all reproduced here:

* **large sequential requests** – a tensor is one contiguous extent of the store's file, moved in
  chunks of ``chunk_bytes`` (default 8 MiB) so several requests are queued on the device at once;
* **O_DIRECT** – IO bypasses the page cache, so a 100 GB optimizer state does not evict the
  training process's memory and the measured bandwidth is the disk's. O_DIRECT requires the
  buffer address, the file offset and the length to be multiples of the logical block size; we
  align all three to :data:`ALIGN` = 4096 bytes (a multiple of every common block size). Where the
  file system refuses O_DIRECT (tmpfs, some FUSE/overlay mounts) we fall back to buffered IO and
  record why (:func:`probe_direct`);
* **threads that release the GIL** – ``os.preadv`` / ``os.pwrite`` drop the GIL for the system call,
  so a :class:`ThreadPoolExecutor` of ``workers`` threads keeps that many requests in flight while
  Python computes (the optimizer step of the previous sub-group, the next layer's forward).

Pinned (page-locked) host memory only helps device↔host copies, so :func:`aligned_empty` pins
only when asked, and callers ask only when ``torch.cuda.is_available()``.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from parallel.offload.errors import StoreConfigError, StoreError, StoreFullError

ALIGN = 4096
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def align_up(n: int, a: int = ALIGN) -> int:
    """Smallest multiple of ``a`` that is ≥ ``n``."""
    return (n + a - 1) // a * a


def aligned_empty(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` whose first byte sits on an :data:`ALIGN` boundary.

    Allocates ``nbytes + ALIGN`` and slices at the first aligned address (the slice keeps the
    whole allocation alive). ``pin`` page-locks it (only meaningful when CUDA is present).
    """
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    off = (-raw.data_ptr()) % ALIGN
    out = raw[off:off + nbytes]
    assert out.data_ptr() % ALIGN == 0
    return out


def trim_host_memory() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); True if it ran.

    After a model has been written into a store tensor by tensor, the freed temporaries stay in the
    process (glibc raises its mmap threshold after large frees, so later ones come from the heap and
    are kept): up to about 1.5× the model's size in extra RSS (benchmarks/README.md). Elsewhere
    (no glibc) this does nothing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU tensor's bytes (no copy, no numpy needed)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise StoreError("internal: IO buffers must be contiguous CPU tensors")
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def check_dir(path: str) -> None:
    """Raise :class:`StoreConfigError` unless ``path`` is an existing, writable directory.

    Writability is tested by creating and removing a probe file (``os.access`` is wrong for root
    and for read-only mounts).
    """
    if not path:
        raise StoreConfigError("zero.offload.nvme_path is not set; set it to a directory on a local "
                               "disk (NVMe in production), e.g. zero.offload.nvme_path=/local_nvme/offload")
    if not os.path.exists(path):
        raise StoreConfigError(f"zero.offload.nvme_path {path!r} does not exist; create it "
                               f"(mkdir -p {path}) or point nvme_path at an existing directory on a local disk")
    if not os.path.isdir(path):
        raise StoreConfigError(f"zero.offload.nvme_path {path!r} is not a directory; point it at a directory")
    probe = os.path.join(path, f".p3d-write-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise StoreConfigError(f"zero.offload.nvme_path {path!r} is not writable ({e.strerror}); "
                               f"fix its permissions or choose a writable directory") from e


def probe_direct(path: str) -> tuple[bool, str]:
    """Whether O_DIRECT works in directory ``path``: (True, "") or (False, reason).

    Tries the real thing — open with O_DIRECT, write and read back one aligned block — since
    some file systems accept the flag at open and fail the first IO with EINVAL.
    """
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return False, "this platform has no os.O_DIRECT"
    probe = os.path.join(path, f".p3d-direct-probe-{os.getpid()}")
    buf = aligned_empty(ALIGN)
    buf.fill_(7)
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_TRUNC | flag, 0o600)
    except OSError as e:
        return False, f"open(O_DIRECT) failed in {path}: {e.strerror} (file system does not support it)"
    try:
        if os.pwrite(fd, byte_view(buf), 0) != ALIGN:
            return False, "short O_DIRECT write in probe"
        buf.zero_()
        if os.preadv(fd, [byte_view(buf)], 0) != ALIGN or int(buf[0]) != 7:
            return False, "O_DIRECT read-back mismatch in probe"
        return True, ""
    except OSError as e:
        return False, f"O_DIRECT IO failed in {path}: {e.strerror}"
    finally:
        os.close(fd)
        os.unlink(probe)


def preallocate(fd: int, path: str, need: int, detail: str) -> str:
    """Check that the disk under ``path`` can grow ``fd``'s file to ``need`` bytes, then preallocate
    them (``posix_fallocate``) so a long run cannot hit ENOSPC inside them. Returns "" or, where the
    file system cannot preallocate, why the space is only checked."""
    have = os.fstat(fd).st_size
    free = shutil.disk_usage(path).free
    if need - have > free:
        raise StoreConfigError(
            f"zero.offload.nvme_path {path!r} has {free} bytes ({free / 2**30:.2f} GiB) free but the store needs "
            f"{need - have} more ({need / 2**30:.2f} GiB in all: {detail}); free space, or point nvme_path at a "
            f"larger disk")
    try:
        os.posix_fallocate(fd, 0, need)
    except AttributeError:
        return "no posix_fallocate on this platform; space is checked, not held"
    except OSError as e:
        if e.errno in _FULL_ERRNOS:
            raise StoreFullError(f"could not preallocate {need} bytes in {path!r}: disk full; free space or point "
                                 f"zero.offload.nvme_path at a larger disk") from e
        return f"posix_fallocate unsupported here ({e.strerror}); space is checked, not held"
    return ""


class IOEngine:
    """A pool of threads doing chunked positional reads and writes on file descriptors.

    ``read``/``write`` return one :class:`Future` per chunk; a chunk's future raises
    :class:`StoreFullError` when the disk is full and :class:`StoreError` on any other OS error.
    ``pwrite`` is injectable (a fault-injection hook for tests: a function with os.pwrite's
    signature that raises ``OSError(ENOSPC)`` simulates a full disk).
    """

    def __init__(self, workers: int = 4, chunk_bytes: int = 8 << 20, pwrite=os.pwrite):
        if workers < 1:
            raise ValueError(f"IO workers must be ≥ 1, got {workers}")
        if chunk_bytes < ALIGN or chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGN}, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self.pwrite = pwrite
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="p3d-aio")

    def _chunks(self, nbytes: int):
        for start in range(0, nbytes, self.chunk_bytes):
            yield start, min(self.chunk_bytes, nbytes - start)

    def read(self, fd: int, buf: torch.Tensor, offset: int, nbytes: int) -> list[Future]:
        """Read ``nbytes`` at file ``offset`` into the start of ``buf`` (uint8, contiguous CPU)."""
        mv = byte_view(buf)
        return [self._pool.submit(_pread_full, fd, mv[s:s + n], offset + s) for s, n in self._chunks(nbytes)]

    def write(self, fd: int, buf: torch.Tensor, offset: int, nbytes: int, before=None) -> list[Future]:
        """Write the first ``nbytes`` of ``buf`` at file ``offset``. ``before()``, if given, runs in the
        worker first (e.g. a CUDA event's ``synchronize`` for a device→host copy into ``buf``)."""
        mv = byte_view(buf)
        return [self._pool.submit(_pwrite_full, self.pwrite, fd, mv[s:s + n], offset + s, before)
                for s, n in self._chunks(nbytes)]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def _pread_full(fd: int, mv: memoryview, offset: int) -> int:
    done = 0
    while done < len(mv):
        try:
            n = os.preadv(fd, [mv[done:]], offset + done)
        except OSError as e:
            raise StoreError(f"read of {len(mv)} bytes at offset {offset} failed: {e.strerror}") from e
        if n == 0:
            raise StoreError(f"read past the end of the store file at offset {offset + done}")
        done += n
    return done


def _pwrite_full(pwrite, fd: int, mv: memoryview, offset: int, before) -> int:
    if before is not None:
        before()
    done = 0
    while done < len(mv):
        try:
            n = pwrite(fd, mv[done:], offset + done)
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                raise StoreFullError(f"the disk holding the store is full (writing {len(mv)} bytes at "
                                     f"offset {offset}: {e.strerror}); previously stored tensors are "
                                     f"intact. Free space or point zero.offload.nvme_path at a larger disk") from e
            raise StoreError(f"write of {len(mv)} bytes at offset {offset} failed: {e.strerror}") from e
        if n <= 0:
            raise StoreFullError(f"the disk holding the store accepted no bytes at offset {offset + done}; "
                                 f"previously stored tensors are intact. Free space on zero.offload.nvme_path")
        done += n
    return done
