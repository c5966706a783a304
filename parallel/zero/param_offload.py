"""Stage-3 parameter shards in a tensor store (ZeRO-Infinity, Rajbhandari et al., arXiv 2104.07857, §5.2).

With ``zero.offload.params`` = cpu | nvme, each stage-3 unit's parameter shard (this rank's 1/N of
the unit, in the compute dtype) is one key of a :class:`~parallel.offload.store.TensorStore` instead of a tensor in
memory. :class:`~parallel.zero.stage3.Stage3Params` calls :meth:`ParamOffload.fetch` just before the
unit's all-gather and :meth:`ParamOffload.release` once the gather has completed (the IO buffer goes
back to the pool), and :meth:`ParamOffload.prefetch` for the units of the next ``prefetch_depth``
modules in the traced order, so the disk reads overlap compute and a rank holds a few units at a
time. After the optimizer step the new shard is assembled in a staging tensor and written back
(:meth:`stage` / :meth:`put_staged`). Reads per training step: every unit once for the forward and
once for the backward gather, ``2 · Σ_u shard_u · b`` bytes; writes: ``Σ_u shard_u · b`` (units whose
shard holds parameters).
"""
from __future__ import annotations

import torch

from parallel.offload import make_store
from parallel.offload.aio import align_up

__all__ = ["ParamOffload", "placeholder"]


def placeholder(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A 1-D tensor of ``n`` elements backed by one element of storage (zero stride): stands in for a
    buffer that lives in a store, so shapes, ``.grad`` and views keep working at no memory cost."""
    return torch.zeros((), dtype=dtype, device=device).expand(n)


class ParamOffload:
    """Stage-3 parameter shards in a store, fetched for the all-gather and released after it."""

    def __init__(self, cfg, units: list, transactional: bool, name: str | None = None):
        self.store = make_store(cfg.params, cfg, name=name)
        self.depth = cfg.prefetch_depth
        self.cap = getattr(self.store, "buffer_count", None)
        self.buf = getattr(self.store, "buffer_bytes", None)
        self.keys = {u: f"param/{u.index}" for u in units}
        self.dtype: dict = {}
        self.held: dict = {}                                      # key -> "fetched" | "prefetched"
        self._staging: dict = {}
        if cfg.params == "nvme":
            esize = 4                                             # an upper bound until the dtype is known
            need = sum(align_up(u.shard * esize) for u in units)
            try:
                self.store.reserve(need * (2 if transactional else 1))
            except BaseException:
                self.store.close()
                raise

    def has(self, b) -> bool:
        return b in self.keys

    def _fits(self, u) -> bool:
        return self.buf is None or align_up(u.shard * torch.empty((), dtype=self.dtype[u]).element_size()) <= self.buf

    def add(self, u) -> None:
        """Write ``u.shard_param`` to the store; it becomes a placeholder."""
        self.dtype[u] = u.shard_param.dtype
        self.store.put(self.keys[u], u.shard_param)
        u.shard_param = placeholder(u.shard, u.shard_param.dtype, u.shard_param.device)

    def fetch(self, u) -> torch.Tensor:
        """The unit's shard, resident until :meth:`release` (on a GPU: a device copy)."""
        key = self.keys[u]
        dev = u.flat_param.device
        if not self._fits(u):                                     # bigger than a buffer: chunked read
            self.held.pop(key, None)
            return self.store.get(key, out=torch.empty(u.shard, dtype=self.dtype[u], device=dev))
        t = self.store.get(key)
        if dev.type != "cpu":
            t = t.to(dev)
            self.store.release(key)
            self.held.pop(key, None)
            return t
        self.held[key] = "fetched"
        return t

    def release(self, u) -> None:
        key = self.keys.get(u)
        if key is not None and self.held.get(key) == "fetched":
            del self.held[key]
            self.store.release(key)

    def prefetch(self, units) -> None:
        """Start reading these units' shards, keeping one buffer free for a blocking fetch."""
        for u in units:
            key = self.keys.get(u)
            if key is None or key in self.held or not self._fits(u):
                continue
            if self.cap is not None and len(self.held) + 2 > self.cap:
                break
            self.store.prefetch([key])
            self.held[key] = "prefetched"

    def drop_stale(self) -> None:
        """Release read-ahead that no gather used (a forward that left the traced order)."""
        for key, how in list(self.held.items()):
            if how == "prefetched":
                del self.held[key]
                self.store.release(key)

    # --- writes after the optimizer step ------------------------------------------------------------
    def stage(self, u) -> torch.Tensor:
        if u not in self._staging:
            self._staging[u] = torch.zeros(u.shard, dtype=self.dtype[u])
        return self._staging[u]

    def put_staged(self, u) -> None:
        self.store.put(self.keys[u], self._staging.pop(u))

    def drop_staging(self) -> None:
        self._staging.clear()

    def update(self, u, master: torch.Tensor) -> None:
        """Write-back without optimizer offload: the new shard is the (cast) in-memory master."""
        self.store.put(self.keys[u], master.detach().to(device="cpu", dtype=self.dtype[u]))

    def close(self) -> None:
        self.store.close()
