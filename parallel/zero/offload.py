"""ZeRO with its partition in a tensor store: optimizer offload and stage-3 parameter offload.

**Optimizer offload**: :class:`~parallel.zero.optimizer_offload.OptimizerOffload` streams the fp32
masters and Adam moments of the rank's partition through a tensor store, updates them with a CPU
kernel and commits the step atomically over the dp ranks (ZeRO-Offload, arXiv 2101.06840, §4;
ZeRO-Infinity, arXiv 2104.07857, §5.1); its module documents the sub-groups and the transaction.

**Parameter offload** (stage 3; ZeRO-Infinity §5.2). Each unit's parameter shard is a key of a
second store; :class:`~parallel.zero.stage3.Stage3Params` fetches it just before the unit's
all-gather, reads ``prefetch_depth`` units ahead along the traced module order, and releases the
buffer once the gather is done, so a rank holds a few units' shards at a time. With a meta-built
model (:func:`parallel.zero.deferred_init`) each unit is materialised, written and dropped in
turn: the model is never whole in memory.
"""
from __future__ import annotations

import contextlib

import torch

from parallel.offload import StoreConfigError
from parallel.optim.adam8bit import dequantize
from parallel.zero.optimizer_offload import OptimizerOffload, owned, store_file_name
from parallel.zero.param_offload import ParamOffload, placeholder

__all__ = ["OptimizerOffload", "ParamOffload", "OffloadMixin", "make_offload", "placeholder", "owned"]

_MEDIA = ("none", "cpu", "nvme")


def make_offload(cfg, buckets: list, stage: int, group, optimizer_factory):
    """(OptimizerOffload | None, ParamOffload | None) for an ``OffloadConfig`` (None: no offload)."""
    if cfg is None:
        return None, None
    for key in ("optimizer", "params", "nvme_path", "buffer_count", "buffer_mb", "prefetch_depth"):
        if not hasattr(cfg, key):
            raise TypeError(f"offload= needs a parallel.config.OffloadConfig (zero.offload), got "
                            f"{type(cfg).__name__} without {key!r}")
    for key in ("optimizer", "params"):
        if getattr(cfg, key) not in _MEDIA:
            raise StoreConfigError(f"zero.offload.{key}={getattr(cfg, key)!r} must be one of none, cpu, nvme")
    if cfg.params != "none" and stage != 3:
        raise StoreConfigError(f"zero.offload.params={cfg.params} needs zero.stage=3 (got {stage}): only stage 3 "
                               f"partitions the parameters; set zero.stage=3 or zero.offload.params=none")
    if cfg.params == "nvme" and cfg.optimizer != "nvme":
        raise StoreConfigError(f"zero.offload.params=nvme needs zero.offload.optimizer=nvme (got {cfg.optimizer}): the "
                               f"step writes masters and parameters together, all-or-nothing, and only a disk-backed "
                               f"optimizer state can be rolled back if the disk fills; "
                               f"use optimizer=nvme, or params=cpu")
    if cfg.buffer_count < 1 or not cfg.buffer_mb > 0 or cfg.prefetch_depth < 0:
        raise StoreConfigError(f"zero.offload: buffer_count={cfg.buffer_count} must be >= 1, buffer_mb="
                               f"{cfg.buffer_mb} > 0 and prefetch_depth={cfg.prefetch_depth} >= 0")
    if cfg.buffer_count < cfg.prefetch_depth + 1:
        raise StoreConfigError(f"zero.offload.prefetch_depth={cfg.prefetch_depth} needs buffer_count >= "
                               f"{cfg.prefetch_depth + 1} (the ones read ahead plus the one in use), got "
                               f"{cfg.buffer_count}; raise buffer_count or lower prefetch_depth")
    opt = OptimizerOffload(cfg, buckets, group, optimizer_factory) if cfg.optimizer != "none" else None
    units = [b for b in buckets if not b.deferred]
    par = None
    if cfg.params != "none":
        par = ParamOffload(cfg, units, transactional=opt is not None, name=store_file_name("params"))
    return opt, par


def _dequantized(st: dict, B: int, n: int) -> dict:
    """An Adam8bit piece state (codes + block scales) as fp32 ``exp_avg`` / ``exp_avg_sq``."""
    for k in ("exp_avg", "exp_avg_sq"):
        if st[k + "_q"].numel() != n or st[k + "_scale"].numel() != -(-n // B):
            raise ValueError(f"a checkpoint's 8-bit {k} of {st[k + '_q'].numel()} codes / {st[k + '_scale'].numel()} "
                             f"scales does not fit a piece of {n} elements in blocks of {B}: load it with the "
                             f"optimizer.state_dtype and block size it was saved with")
    return {"step": st["step"], "exp_avg": dequantize(st["exp_avg_q"], st["exp_avg_scale"], True, B),
            "exp_avg_sq": dequantize(st["exp_avg_sq_q"], st["exp_avg_sq_scale"], False, B)}


class OffloadMixin:
    """Offload-aware parts of :class:`~parallel.zero.optimizer.ZeroOptimizer` (uses ``_opt_off``,
    ``_par_off``, ``_all``, ``_piece_list``, ``optimizer``, ``wait_param_gather``)."""

    @property
    def _pieces(self) -> list:
        if self._opt_off is not None and not self._opt_off.materialized:
            raise RuntimeError("the optimizer state is offloaded (zero.offload.optimizer): wrap code that reads "
                               "zero._pieces / zero.optimizer.state in `with zero.materialized():`")
        return self._piece_list

    @contextlib.contextmanager
    def materialized(self, write_back: bool = False, dequantize: bool = True):
        """Offloaded optimizer state in memory for the duration (checkpoints): real masters behind
        ``_pieces`` and per-piece ``optimizer.state`` (step, exp_avg, exp_avg_sq), as without
        offload. ``write_back=True`` (after loading into them) stores them again on exit. Needs the
        whole partition's 12 bytes/element in host memory. Without optimizer offload: 8-bit moments
        (:class:`parallel.optim.adam8bit.Adam8bit`) are fp32 inside when ``dequantize``, else a no-op."""
        off = self._opt_off
        if off is None or off.materialized:
            deq = getattr(self.optimizer, "dequantized", None)       # 8-bit moments: fp32 while inside
            with deq(write_back) if deq is not None and dequantize else contextlib.nullcontext():
                yield
            return
        self.wait_param_gather()
        state = off.read_all(self._all)
        saved = [b.master for b in self._all]
        group = self.optimizer.param_groups[0]
        self._set_masters(self._all, [state[b][0] for b in self._all])
        if off.t > 0:
            for b, i, a, e, view in self._piece_list:
                self.optimizer.state[view] = {"step": torch.tensor(float(off.piece_step(b, i))),
                                              "exp_avg": state[b][1][a - b.lo:e - b.lo],
                                              "exp_avg_sq": state[b][2][a - b.lo:e - b.lo]}
        off.materialized = True
        try:
            yield
            if write_back:
                t, steps = off.t, {}
                for b, i, a, e, view in self._piece_list:
                    st = self.optimizer.state.get(view) or {}
                    if "exp_avg_q" in st:          # 8-bit moments saved without offload: fp32 here
                        st = _dequantized(st, group.get("block_size", 256), e - a)
                    if "exp_avg" in st:
                        state[b][1][a - b.lo:e - b.lo].copy_(st["exp_avg"].reshape(-1))
                        state[b][2][a - b.lo:e - b.lo].copy_(st["exp_avg_sq"].reshape(-1))
                    if "step" in st:
                        steps[(b.index, i)] = int(float(st["step"]))
                t = max(steps.values(), default=t)
                off.write_all(state, t, steps)
        finally:
            off.materialized = False
            self.optimizer.state.clear()
            self._set_masters(self._all, saved)
            del group

    def _set_masters(self, buckets, masters) -> None:
        """Swap the master tensors (and the optimizer's views of them) — materialized() only."""
        for b, m in zip(buckets, masters):
            b.master = m
        self._piece_list = [(b, i, a, e, b.master[a - b.lo:e - b.lo]) for b, i, a, e, _ in self._piece_list]
        self.optimizer.param_groups[0]["params"] = [pc[4] for pc in self._piece_list]

    def state_dict(self) -> dict:
        with self.materialized(dequantize=False):              # partitioned: 8-bit moments stay 8-bit
            return super().state_dict()

    def load_state_dict(self, sd: dict) -> None:
        with self.materialized(write_back=True, dequantize=False):
            super().load_state_dict(sd)

    def full_state_dict(self) -> dict:
        with self.materialized():
            return super().full_state_dict()

    def load_full_state_dict(self, sd: dict) -> None:
        with self.materialized(write_back=True):
            super().load_full_state_dict(sd)

    def offload_stats(self) -> dict:
        """Per store ("optimizer", "params"): its medium and cumulative StoreStats; for the optimizer
        also the kernel and the last step's figures (per-store deltas, seconds, sub-groups)."""
        out = {}
        if self._opt_off is not None:
            out["optimizer"] = {"medium": self._opt_off.medium, "stats": self._opt_off.store.stats,
                                "state_bytes": self._opt_off.state_bytes,
                                "moment_bytes": self._opt_off.moment_bytes, "kernel": self._opt_off.kernel.name,
                                "last_step": self._opt_off.last}
        if self._par_off is not None:
            out["params"] = {"medium": self._par_off.store.medium, "stats": self._par_off.store.stats}
        return out

    def close(self) -> None:
        """Close the offload stores (their files are deleted). The optimizer is unusable afterwards."""
        for off in (self._opt_off, self._par_off):
            if off is not None:
                off.close()
