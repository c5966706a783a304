"""What a :class:`~parallel.zero.ZeroOptimizer` holds, counted: model-state bytes by walking the tensors
(each storage once; meta storages only for a simulated optimizer), stage 3's peak of gathered parameters, Ψ.
The planner's predictions (:mod:`parallel.planning`) are checked against these numbers."""
from __future__ import annotations

import contextlib

import torch

from parallel.zero.state import storage_bytes

__all__ = ["AccountingMixin"]


def _nested_tensors(x) -> list:
    """Tensors inside nested dicts / lists (1-bit Adam's error-feedback buffers)."""
    if isinstance(x, torch.Tensor):
        return [x]
    vals = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
    return [t for v in vals for t in _nested_tensors(v)]


class AccountingMixin:
    """Accounting methods of ZeroOptimizer (uses its module, _all buckets, optimizer, stage3, simulated)."""

    def model_state_bytes(self) -> dict:
        """Bytes this rank holds, by walking tensors (each storage once): params (incl. frozen ones
        and gathered stage-3 buffers), grads, master (fp32 copies not aliasing params), optimizer."""
        self.wait_param_gather()
        seen: set = set()
        params = storage_bytes([p for p in self.module.parameters()] +
                               [t for b in self._all for t in (b.flat_param, b.shard_param)], seen, self.simulated)
        grads = storage_bytes([p.grad for p in self.module.parameters()] +
                              [t for b in self._all for t in (b.flat_grad, b.shard_grad)], seen, self.simulated)
        master = storage_bytes([b.master for b in self._all] + [b.master.grad for b in self._all], seen, self.simulated)
        extra = _nested_tensors(getattr(self.optimizer, "comm_state", {}))        # 1-bit Adam's error buffers
        opt = storage_bytes([v for st in self.optimizer.state.values() for v in st.values()
                             if isinstance(v, torch.Tensor)] + extra, seen, self.simulated)
        return {"params": params, "grads": grads, "master": master, "optimizer": opt,
                "total": params + grads + master + opt}

    @property
    def peak_gathered_bytes(self) -> int:
        """Stage 3: the most bytes of gathered (full) parameters held at once since construction."""
        return self.stage3.peak_gathered_bytes if self.stage3 else 0

    def gathered(self):
        """Context manager: stage 3 parameters full inside (a no-op for stages 0–2)."""
        self.wait_param_gather()
        return self.stage3.gathered() if self.stage3 else contextlib.nullcontext()

    @property
    def num_params(self) -> int:
        """Ψ: elements this optimizer manages (unpadded)."""
        return sum(b.numel for b in self._all)
