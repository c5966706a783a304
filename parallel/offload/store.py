"""The tiered tensor store: one interface over device memory, host memory and files on disk.

ZeRO-Offload (Ren et al., arXiv 2101.06840) keeps the fp32 master weights and Adam moments of a
rank's partition in host memory and runs the optimizer step there; ZeRO-Infinity (Rajbhandari et
al., arXiv 2104.07857) adds NVMe as a third tier and fetches parameters layer by layer ahead of use.
Both need the same thing from below: "give me tensor k (soon)", "keep this tensor", without the
caller knowing where it lives. That is :class:`TensorStore`:

    h = store.put(key, tensor)     # asynchronous write; h.wait() / store.flush() surface errors
    store.prefetch([k1, k2])       # start reads now, into bounded buffers
    t = store.get(k1)              # blocking; counts a hit if the read had finished, else waits
    ...                            # t stays valid until release(k1)
    store.release(k1)              # the in-memory copy may be dropped (its buffer is reused)
    store.flush()                  # every put committed; raises StoreFullError for failed ones

Contract (the same for every medium, so callers never branch on it):

* ``put`` snapshots the value: the caller may modify or free ``tensor`` once put returns, except
  when ``tensor`` *is* the resident copy returned by ``get`` for the same key, which the store
  writes from directly — then do not modify it until the handle is done.
* A resident tensor (the result of ``get``/``prefetch`` not yet released) always equals the last
  ``put`` of its key. In-place changes to it that are not ``put`` are undefined: on the CPU tier
  they persist, on the NVMe tier they vanish at release. To keep a change, ``put`` it.
* A failed write never damages the copy committed before it (copy-on-write on disk).
* ``stats`` counts logical traffic identically on every medium: ``bytes_written`` / ``writes``
  per put, ``bytes_read`` / ``reads`` per tensor brought into memory (a ``get`` of a tensor already
  resident is a hit and reads nothing). ``hits``/``misses`` split gets into served-without-waiting
  and waited; ``wait_s`` is time gets spent blocked, ``stall_s`` time put/prefetch/flush spent
  blocked on buffers or earlier IO. The NVMe tier adds ``disk_bytes_*`` (aligned, as issued to the
  disk) and ``peak_buffers``.
"""
from __future__ import annotations

import abc
import os
import threading
from dataclasses import asdict, dataclass

import torch

from parallel.offload.errors import StoreConfigError

__all__ = ["TensorStore", "DeviceStore", "CpuStore", "Handle", "StoreStats", "TensorMeta", "DONE"]


@dataclass
class StoreStats:
    bytes_written: int = 0
    bytes_read: int = 0
    disk_bytes_written: int = 0
    disk_bytes_read: int = 0
    writes: int = 0
    reads: int = 0
    hits: int = 0
    misses: int = 0
    wait_s: float = 0.0
    stall_s: float = 0.0
    buffers_in_use: int = 0
    peak_buffers: int = 0

    def snapshot(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TensorMeta:
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Handle:
    """Completion of an asynchronous put. ``wait()`` blocks and raises the write's error, if any."""

    def __init__(self, wait=None, done=None):
        self._wait, self._done = wait, done

    def done(self) -> bool:
        return True if self._done is None else self._done()

    def wait(self) -> None:
        if self._wait is not None:
            self._wait()


DONE = Handle()


class TensorStore(abc.ABC):
    """Where tensors live, behind put / get / prefetch / release / flush (see the module doc)."""

    medium = "abstract"

    def __init__(self):
        self._stats = StoreStats()
        self._meta: dict = {}
        self._lock = threading.RLock()

    # --- the interface -------------------------------------------------------------------------
    @abc.abstractmethod
    def put(self, key, tensor: torch.Tensor) -> Handle:
        """Store ``tensor`` under ``key`` (replacing any previous value), asynchronously."""

    @abc.abstractmethod
    def get(self, key, out: torch.Tensor | None = None) -> torch.Tensor:
        """The value of ``key``: into ``out`` if given (any device, same shape and dtype), else a
        resident tensor valid until ``release(key)``. Blocks until the data is in memory."""

    def prefetch(self, keys) -> None:
        """Start bringing ``keys`` into memory; a later ``get`` then need not wait."""
        for k in _as_list(keys):
            self._require(k)

    def release(self, key) -> None:
        """The caller is done with ``get(key)``'s tensor; its memory may be reused."""
        self._require(key)

    @abc.abstractmethod
    def delete(self, key) -> None:
        """Forget ``key`` and free its space."""

    def flush(self) -> None:  # noqa: B027 - deliberate no-op default, overridden where needed
        """Block until every put is durable on this medium; raise the first unreported failure."""

    def reserve(self, total_bytes: int) -> None:  # noqa: B027 - deliberate no-op default, overridden where needed
        """Check, before writing state, that ``total_bytes`` of tensors will fit; raise if not."""

    def close(self) -> None:
        self.flush()

    # Transactions (see txn.py): all-or-nothing groups of puts. Host and device memory commit each
    # put at once and cannot fail half-way, so here they are no-ops; the NVMe tier implements them.
    in_transaction = False

    def begin(self) -> None:  # noqa: B027 - deliberate no-op default, overridden where needed
        """Start a group of puts that :meth:`commit` makes visible together (NVMe; else a no-op)."""

    def prepare(self) -> None:
        """Wait for the group's writes; raise if any failed (nothing is switched yet)."""
        self.flush()

    def commit(self) -> None:
        """Make every put since :meth:`begin` the committed value."""
        self.prepare()

    def abort(self) -> None:  # noqa: B027 - deliberate no-op default, overridden where needed
        """Drop every put since :meth:`begin` (NVMe: each key keeps its earlier value)."""

    # --- common ---------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        return self._stats.snapshot()

    def keys(self):
        return list(self._meta)

    def __contains__(self, key) -> bool:
        return key in self._meta

    def __len__(self) -> int:
        return len(self._meta)

    def meta(self, key) -> TensorMeta:
        self._require(key)
        return self._meta[key]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _require(self, key) -> TensorMeta:
        try:
            return self._meta[key]
        except KeyError:
            raise KeyError(f"{type(self).__name__}: no tensor stored under key {key!r}; put() it first") from None

    @staticmethod
    def _check_tensor(key, tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"put({key!r}, ...) needs a torch.Tensor, got {type(tensor).__name__}")
        if tensor.is_sparse or tensor.device.type == "meta":
            raise TypeError(f"put({key!r}, ...) needs a dense tensor with data, got layout "
                            f"{tensor.layout} on {tensor.device}; materialise it first")

    def _check_out(self, key, out: torch.Tensor) -> None:
        m = self._meta[key]
        if tuple(out.shape) != tuple(m.shape) or out.dtype != m.dtype:
            raise ValueError(f"get({key!r}, out=...): out is {tuple(out.shape)} {out.dtype} but the stored "
                             f"tensor is {tuple(m.shape)} {m.dtype}; pass a matching out or none")

    def _count_write(self, nbytes: int) -> None:
        self._stats.writes += 1
        self._stats.bytes_written += nbytes

    def _count_read(self, nbytes: int) -> None:
        self._stats.reads += 1
        self._stats.bytes_read += nbytes


def _as_list(keys) -> list:
    return [keys] if isinstance(keys, (str, bytes)) else list(keys)


class DeviceStore(TensorStore):
    """The identity tier: ``put`` keeps a reference to the tensor itself, ``get`` returns it.

    Used when offload is "none", so ZeRO code has one code path. Because nothing is copied, a
    later in-place change to the tensor passed to ``put`` is visible to ``get`` (the one exception
    to "put snapshots"; callers that need a snapshot pass a clone).
    """

    medium = "device"

    def __init__(self):
        super().__init__()
        self._t: dict = {}

    def put(self, key, tensor):
        self._check_tensor(key, tensor)
        with self._lock:
            self._t[key] = tensor
            self._meta[key] = TensorMeta(tensor.shape, tensor.dtype)
            self._count_write(tensor.numel() * tensor.element_size())
        return DONE

    def get(self, key, out=None):
        with self._lock:
            m = self._require(key)
            self._count_read(m.nbytes)
            self._stats.hits += 1
            if out is not None:
                self._check_out(key, out)
                return out.copy_(self._t[key])
            return self._t[key]

    def delete(self, key):
        with self._lock:
            self._require(key)
            del self._t[key], self._meta[key]


class CpuStore(TensorStore):
    """Host-memory tier (ZeRO-Offload). Tensors are copied into store-owned CPU tensors — pinned when
    CUDA is present so device↔host copies are asynchronous — and ``get`` returns those (no copy).

    ``put`` of a CUDA tensor copies with ``non_blocking=True`` and its handle waits on a CUDA event.
    """

    medium = "cpu"

    def __init__(self, pin_memory: bool | None = None):
        super().__init__()
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._t: dict = {}
        self._events: dict = {}

    def put(self, key, tensor):
        self._check_tensor(key, tensor)
        with self._lock:
            dst = self._t.get(key)
            if dst is None or dst.shape != tensor.shape or dst.dtype != tensor.dtype:
                dst = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.pin_memory)
                self._t[key] = dst
                self._meta[key] = TensorMeta(tensor.shape, tensor.dtype)
            self._count_write(tensor.numel() * tensor.element_size())
            if dst.data_ptr() == tensor.data_ptr() and dst.is_contiguous() and tensor.is_contiguous():
                return DONE                                   # writing back the resident copy itself
            if tensor.device.type == "cuda" and self.pin_memory:
                dst.copy_(tensor, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                self._events[key] = ev
                return Handle(wait=ev.synchronize, done=ev.query)
            dst.copy_(tensor)
            return DONE

    def get(self, key, out=None):
        with self._lock:
            m = self._require(key)
            self._sync(key)
            self._count_read(m.nbytes)
            self._stats.hits += 1
            if out is not None:
                self._check_out(key, out)
                return out.copy_(self._t[key])
            return self._t[key]

    def delete(self, key):
        with self._lock:
            self._require(key)
            self._sync(key)
            del self._t[key], self._meta[key]

    def flush(self):
        with self._lock:
            for key in list(self._events):
                self._sync(key)

    def reserve(self, total_bytes: int) -> None:
        """Compare with the host's available physical memory (Linux ``sysconf``), where known."""
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return
        have = sum(m.nbytes for m in self._meta.values())
        need = int(total_bytes) - have
        if need > free:
            raise StoreConfigError(f"CPU offload needs {need} more bytes of host memory but only {free} are "
                                   f"available; offload to nvme (zero.offload.*=nvme) or add memory")

    def _sync(self, key) -> None:
        ev = self._events.pop(key, None)
        if ev is not None:
            ev.synchronize()
