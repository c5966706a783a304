"""Iterable (streaming) sources read under the parity contract, with exact resume.

:class:`StreamDataset` turns an iterable of samples — a generator function, a torch
``IterableDataset``, a transformers ``datasets`` streaming dataset, anything re-iterable from a
factory — into the positions the contract of :mod:`parallel.data` names: position p is the p-th
sample the stream yields (after an optional seeded shuffle buffer). Global batch t is positions
[t·G, (t+1)·G) and dp rank r keeps its slice, as for a map-style dataset; every rank iterates the
stream in order and keeps only the samples it is asked for (reads never go back: a request before
the cursor restarts the stream from its factory and skips forward — the next epoch, or a resume).

So the data position is the step (which the checkpoint holds): resuming at step s skips s·G samples
and continues exactly where the run stopped; a resume with another global batch size is checked by
:func:`parallel.checkpoint.integrity.check_data` (exact in samples, or refused naming the fix).
Shuffling is a buffer of ``shuffle_buffer`` samples drawn by a generator seeded with ``seed``: the
same order on every rank, every layout and every pass. ``data.shuffle`` (a permutation of
the whole dataset) needs a known length, so it is refused for streams: use ``shuffle_buffer``.
``length``: the number of samples one pass yields, when known (epochs wrap at it); else the stream
is read once and a request past its end raises an IndexError naming the position.
"""
from __future__ import annotations

import torch

__all__ = ["StreamDataset", "UNKNOWN_LENGTH"]

UNKNOWN_LENGTH = 2 ** 62


class StreamDataset(torch.utils.data.Dataset):
    """Positions of an iterable stream (module docstring). ``source``: a callable returning a fresh
    iterator/iterable, or an iterable that can be iterated again (IterableDataset, list, ...)."""

    streaming = True

    def __init__(self, source, length: int | None = None, shuffle_buffer: int = 0, seed: int = 0):
        if shuffle_buffer < 0:
            raise ValueError(f"StreamDataset: shuffle_buffer must be ≥ 0, got {shuffle_buffer}")
        self.source, self.length, self.buffer, self.seed = source, length, shuffle_buffer, seed
        self._it, self._pos, self.restarts = None, 0, 0

    def __len__(self) -> int:
        return self.length if self.length is not None else UNKNOWN_LENGTH

    def _open(self):
        self.restarts += 1
        it = iter(self.source() if callable(self.source) else self.source)
        self._it, self._pos = (self._shuffled(it) if self.buffer else it), 0

    def _shuffled(self, it):
        g = torch.Generator().manual_seed(self.seed)
        buf = []
        for x in it:
            buf.append(x)
            if len(buf) >= self.buffer:
                yield buf.pop(int(torch.randint(len(buf), (1,), generator=g)))
        while buf:
            yield buf.pop(int(torch.randint(len(buf), (1,), generator=g)))

    def __getitem__(self, i: int):
        if i < 0:
            raise IndexError(f"StreamDataset: negative position {i}")
        if self._it is None or i < self._pos:
            self._open()
        while True:
            try:
                x = next(self._it)
            except StopIteration:
                raise IndexError(f"StreamDataset: the stream ended after {self._pos} samples, before position {i}; "
                                 f"pass length= (samples per pass) to wrap into epochs, or train fewer steps") from None
            self._pos += 1
            if self._pos - 1 == i:
                return x
