"""Decode streamed units on a background thread, overlapped with the forward.

For a quantized unit the stream's work per forward is: read the payload (IO threads), decode its
group-form parameters into an fp32 workspace (CPU: about one memory copy of their fp32 size), compute.
Kernel-form Linear weights (:mod:`parallel.quant.codec`) are not decoded: the forward multiplies by
views of the payload, which then stays held until the unit is released. Done in the forward's thread,
decoding adds to every step; here the read-ahead of unit i+1 hands the payload to one worker thread,
which waits for the read, decodes into a workspace taken from a small pool and (when no kernel needs
the payload) gives the IO buffer back at once, while the forward computes on unit i. ``take`` then
returns the workspace and the payload (waiting only if the worker is still busy). Workspaces are
recycled, so the memory held is (units in use + units read ahead) × the largest workspace, plus the
payload buffers in flight or held by kernels.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

__all__ = ["Dequantizer"]


class Dequantizer:
    def __init__(self, codecs: dict, store, key_of):
        self.codecs, self.store, self.key_of = codecs, store, key_of
        self.ws_numel = max((c.ws_numel for c in codecs.values()), default=0)
        self.free: list[torch.Tensor] = []
        self.pending: dict = {}                      # unit -> Future[(workspace, payload or None)]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="p3d-dequant")
        self.overlapped = self.inline = 0            # decodes done ahead by the worker / in the forward

    def _workspace(self) -> torch.Tensor:
        return self.free.pop() if self.free else torch.empty(self.ws_numel)

    def _decode(self, u, ws: torch.Tensor):
        key, codec = self.key_of(u), self.codecs[u]
        keep = False
        try:
            payload = self.store.get(key)
            codec.decode(payload, ws)
            keep = codec.keeps_payload
        finally:
            if not keep:
                self.store.release(key)
        return ws, (payload if keep else None)

    def start(self, u) -> None:
        """Read-ahead of ``u`` (its payload read already issued): decode it on the worker."""
        if u not in self.pending:
            self.store.prefetch([self.key_of(u)])
            self.pending[u] = self.pool.submit(self._decode, u, self._workspace())

    def take(self, u):
        """(fp32 workspace holding ``u``'s decoded parameters, its payload if a kernel reads it, else None);
        a returned payload stays held in the store until the caller releases its key."""
        fut: Future | None = self.pending.pop(u, None)
        if fut is not None:
            self.overlapped += 1
            return fut.result()
        self.inline += 1
        return self._decode(u, self._workspace())

    def give_back(self, ws: torch.Tensor) -> None:
        self.free.append(ws)

    def drain(self) -> None:
        """End of a forward: read-ahead it did not use is finished, its workspaces recycled and held payloads
        released."""
        for u in list(self.pending):
            ws, payload = self.pending.pop(u).result()
            self.give_back(ws)
            if payload is not None:
                self.store.release(self.key_of(u))

    def close(self) -> None:
        for fut in self.pending.values():
            fut.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)
