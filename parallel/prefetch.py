"""Batches loaded ahead of the step by a background thread, in exactly the order of the steps.

The training loop asks for global batch t; :class:`Prefetcher` has been loading batches t, t+1, …,
t+depth−1 in a background thread with the very function the loop would call itself
(``load(step) -> batch``, :func:`launch.train.load_batch`), one at a time and in increasing step
order. So the samples of every step are the ones the parity contract names (DESIGN.md) whatever the
timing, a stateful source read in order — a :class:`parallel.stream.StreamDataset`'s cursor — is read
by one thread only and in the same order as without prefetching, and a resumed run (which starts the
prefetcher at its checkpoint's step) reads exactly what the uninterrupted run read from that step on.

While the step computes (torch releases the GIL in its kernels, file and network reads release it too)
the thread reads the next batches, so the step waits only for what is not loaded yet: ``get(t)``
returns the batch with the seconds waited and whether the batch was not ready when asked for
(``data_wait_s`` and ``data_waited`` in the metrics). A load that raises re-raises in the loop at
the step it belongs to, so steps before it train as they would have; nothing after it is loaded.
``depth`` = 0 loads in the caller (no thread), the behaviour without prefetching.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

__all__ = ["Prefetcher"]


class Prefetcher:
    """``load(step)`` for steps ``start``, ``start+1``, … ``stop−1``, at most ``depth`` ahead of the loop."""

    def __init__(self, load: Callable[[int], object], start: int, stop: int, depth: int = 2):
        if depth < 0:
            raise ValueError(f"data.prefetch must be ≥ 0 (batches loaded ahead), got {depth}")
        self.load, self.next, self.stop, self.depth = load, start, stop, depth
        self.ready: dict = {}                       # step → ("ok", batch) | ("error", exception)
        self.cond = threading.Condition()
        self.closed = False
        self.thread = None
        if depth and start < stop:
            self.thread = threading.Thread(target=self._run, args=(start,), name="p3d-prefetch", daemon=True)
            self.thread.start()

    def _run(self, step: int) -> None:
        while step < self.stop:
            with self.cond:
                while not self.closed and step >= self.next + self.depth:
                    self.cond.wait()
                if self.closed:
                    return
            try:
                item = ("ok", self.load(step))
            except BaseException as e:             # delivered to the loop at its step
                item = ("error", e)
            with self.cond:
                self.ready[step] = item
                self.cond.notify_all()
            if item[0] == "error":
                return
            step += 1

    def get(self, step: int) -> tuple:
        """(batch of ``step``, seconds waited for it, whether it was not ready yet). Steps are asked
        for in order, each once."""
        if step != self.next:
            raise RuntimeError(f"Prefetcher: step {step} asked for, the next one is {self.next} (steps are read "
                               f"in order, each once)")
        t0 = time.perf_counter()
        if self.thread is None:
            batch = self.load(step)
            self.next += 1
            return batch, time.perf_counter() - t0, True
        with self.cond:
            waited = step not in self.ready
            while step not in self.ready:
                self.cond.wait()
            kind, value = self.ready.pop(step)
            self.next += 1
            self.cond.notify_all()
        if kind == "error":
            raise value
        return value, time.perf_counter() - t0, waited

    def close(self) -> None:
        """Stop loading (the thread ends after the load in progress, if any)."""
        with self.cond:
            self.closed = True
            self.ready.clear()
            self.cond.notify_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
