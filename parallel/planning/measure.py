"""Measured peak memory of a rank on any device, CPU included: the peak of live tensor bytes.

``torch.cuda.max_memory_allocated`` exists only on CUDA; :class:`LiveBytes` counts the same thing
from Python on every device, as torch's own ``MemTracker`` (torch.distributed._tools) does:

* a ``TorchDispatchMode`` sees every aten operator called on this thread (forward, autograd's
  backward — on CPU it runs on the calling thread, and the mode is in the thread-local state it
  propagates — the optimizer, the collectives' ``c10d`` ops, factory functions such as
  ``torch.empty``); the storage of every tensor an operator reads or writes is *tracked*;
* tensors alive before entry are tracked by :meth:`LiveBytes.track` (the engine's parameters,
  gradients, flat buckets, masters and optimizer state: :meth:`LiveBytes.track_engine`); a
  pre-existing tensor an operator touches is tracked then anyway;
* a tracked storage counts ``storage.nbytes()`` from when it is first seen until it is freed (a
  ``weakref`` callback on the storage object, which torch keeps alive exactly as long as the C++
  storage); ``UntypedStorage.resize_`` (ZeRO-3's gather / free of a unit, FSDP's technique) is
  not an operator and is wrapped while the mode is active; views share their base's storage and
  count once;
* ``current`` is the sum over tracked live storages; ``peak`` its maximum after any operator or
  resize; ``peak_phase`` the phase (``phase`` attribute, set by the caller, e.g. from the engine's
  callbacks) in which the peak was reached, and ``peak_by`` the bytes at the peak by the phase in
  which each storage was first seen ("state" for tensors tracked at entry).

* ``peak_late``: bytes of storages alive at the peak whose last reference was later dropped on
  another thread. gloo's worker thread holds the tensors of a collective (its ``Work``) and may drop
  them a moment after ``wait()`` has returned, so whether such a buffer is still alive when the
  calling thread allocates next is a race the program does not control (a 16 KB all-to-all buffer
  moved a world-4 MoE peak by 2.5 % in ~1 of 10 runs). ``peak − peak_late`` is the peak with those
  buffers freed when the calling thread let go of them; a comparison with an estimate may use it.

Not counted (what CUDA's figure would add): memory a kernel allocates and frees inside one
operator (workspaces, gloo's internal staging, oneDNN scratch), allocator rounding and caching,
tensors created on other threads, non-tensor memory. On CUDA, pair it with
``torch.cuda.max_memory_allocated`` for those.
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

__all__ = ["LiveBytes", "engine_tensors"]


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as m: ...`` → ``m.peak``, ``m.current``, ``m.peak_phase``, ``m.peak_by`` (see the
    module docstring). Only tensors on ``device`` (default: any) count."""

    def __init__(self, device: str | None = None):
        super().__init__()
        self.device = device
        self.current = self.peak = 0
        self.phase, self.peak_phase = "state", "state"
        self.by: dict = {}
        self.peak_by: dict = {}
        self._info: dict = {}                     # id(storage) -> [weakref, nbytes, phase, tick first seen]
        self._tick = self._peak_tick = 0          # operators seen so far; the tick of the current peak
        self.peak_late = 0                        # module docstring
        self._thread = threading.get_ident()
        self._orig_resize = None

    # --- tracking ---------------------------------------------------------------------------------
    def track(self, *tensors) -> None:
        """Count these (pre-existing) tensors' storages from now on."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._see(t)
        self._update()

    def track_engine(self, engine) -> None:
        """The engine's state (:func:`engine_tensors`)."""
        self.track(*engine_tensors(engine))

    def _see(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or (self.device is not None and t.device.type != self.device):
            return
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            return                                          # tensor subclasses: their inner tensors are ops'
        st = t.untyped_storage()
        key = id(st)
        if key in self._info:
            return
        n = st.nbytes()
        self._info[key] = [weakref.ref(st, lambda _, k=key: self._free(k)), n, self.phase, self._tick]
        self.current += n
        self.by[self.phase] = self.by.get(self.phase, 0) + n

    def _free(self, key) -> None:
        info = self._info.pop(key, None)
        if info is not None:
            if threading.get_ident() != self._thread and info[3] < self._peak_tick:
                self.peak_late += info[1]             # alive at the peak, released by another thread
            self.current -= info[1]
            self.by[info[2]] -= info[1]

    def _update(self) -> None:
        self._tick += 1
        if self.current > self.peak:
            self.reset_peak()

    def reset_peak(self) -> None:
        self.peak, self.peak_phase, self.peak_by = self.current, self.phase, dict(self.by)
        self._peak_tick, self.peak_late = self._tick, 0

    # --- the mode -------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_iter((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self._see(t)
        self._update()
        return out

    def __enter__(self):
        self._orig_resize = orig = torch.UntypedStorage.resize_
        tracker = self

        def resize_(st, size):
            out = orig(st, size)
            info = tracker._info.get(id(st))
            if info is not None and info[0]() is st:
                n = st.nbytes()
                tracker.current += n - info[1]
                tracker.by[info[2]] += n - info[1]
                info[1] = n
                tracker._update()
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._orig_resize
        return super().__exit__(*exc)


def engine_tensors(engine) -> list:
    """Every tensor an :class:`parallel.engine.Engine` keeps between steps: the stage modules' parameters,
    buffers and gradients, ZeRO's flat buckets (params, shards, grads, masters) and the optimizer's state."""
    out = []
    for st in engine.stages:
        out += list(st.parameters()) + list(st.buffers()) + [p.grad for p in st.parameters() if p.grad is not None]
    z = engine.zero
    for b in z._all:
        out += [t for t in (b.flat_param, b.shard_param, b.flat_grad, b.shard_grad, b.master) if t is not None]
        if b.master is not None and b.master.grad is not None:
            out.append(b.master.grad)
    out += [v for s in z.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    out += z.reducer.held_buffers                    # stage 2/3: full-gradient buffers kept between steps
    return out


def measure_step(engine, batch, device: str | None = None) -> dict:
    """Run ``engine.train_step(batch)`` under :class:`LiveBytes` (the engine's state tracked at entry; phases
    from the engine's callbacks: forward, backward, optimizer). Run a step before, so the optimizer's state
    exists. Returns {peak, peak_phase, peak_by, peak_late, start, end, loss}."""
    m = LiveBytes(device)

    def phase(name, step):
        m.phase = name
    remove = engine.add_callback(phase)
    try:
        with m:
            m.track_engine(engine)
            m.track(*batch)
            start = m.current
            m.phase = "step"
            loss = engine.train_step(batch)
    finally:
        remove()
    return {"peak": m.peak, "peak_phase": m.peak_phase, "peak_by": m.peak_by, "peak_late": m.peak_late,
            "start": start, "end": m.current,
            "loss": loss}
