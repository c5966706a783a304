"""ZeRO-3's gradient reduce-scatter straight from ``p.grad``: no flat gradient buffer, no copy into one.

The reducer (:mod:`parallel.data_parallel.reducer`) of ZeRO-2/3 moves each gradient into its bucket's flat
buffer (``flat_grad[o:o+n].copy_(p.grad)``: read 4, write 4 bytes per element, Ψ·4 bytes per step and rank)
only so that the reduce-scatter has one contiguous vector to send. Over two ranks on the gloo ring the
vector is never needed (:mod:`parallel.comm.ring_parts`): the half owned by the peer is sent piece by piece
from the gradients themselves (neighbouring pieces under 64 KiB — norms, biases: a few KiB a block — packed
into one message) and this rank's half is received into the gradient shard and added to there,
``shard ← recv + own``, the same a + b per element as the flat ring, so the reduced shard, the division by N
after it and every later number are bitwise those of the flat path.

Where it applies (:func:`by_parts`): a :class:`PartsReducer` (ZeRO stage 3's reducer), one micro-batch
(``prepare_step(1)``: later micro-batches would accumulate into the flat buffer), not 1-bit Adam's local phase,
fp32 gradients, a bucket on the dp group itself (no expert group or divisor), not deferred, not a region's
``at_finish`` unit, and a reduce-scatter that runs on the ring at N = 2 (:func:`~parallel.comm.ring_parts.
parts_fit`). Anything else takes the flat buffer as before.

Memory: the gradients a bucket got stay in ``p.grad`` until its reduction completes (then ``p.grad = None``),
where the flat path held them in a flat buffer of the same size (and kept two such buffers, each the largest
bucket's size, from one step to the next: here none). As the flat path retires an older reduction before
taking a buffer, :meth:`PartsReducer._launch` retires all but the newest in-flight reduction before launching: at
most two buckets' gradients are held by reductions at once.
"""
from __future__ import annotations

import torch

from parallel.comm.collectives import reduce_scatter_parts_into
from parallel.comm.ring_parts import parts_fit
from parallel.data_parallel.reducer import GradReducer

__all__ = ["PartsReducer", "by_parts"]


class PartsReducer(GradReducer):
    """:class:`GradReducer` (stage 2/3 mode) that reduces a bucket straight from its parameters' gradients
    where :func:`by_parts` allows, and as its parent otherwise. ``from_grads = False`` turns it off (A/B)."""

    from_grads = True

    def _absorb(self, b, i, p) -> None:
        if not by_parts(self, b):                    # else p.grad stays where autograd put it until reduced
            super()._absorb(b, i, p)

    def _launch(self, b, where: str) -> None:
        if not by_parts(self, b):
            return super()._launch(b, where)
        while len(self._inflight) > 1:               # as GradReducer._flat_buffer: retire the older reduction
            self._finalize(*self._inflight.pop(0))
        dev = b.params[0].device
        parts = [torch.zeros(n, dtype=self.dtype, device=dev) if p.grad is None else p.grad.reshape(-1)
                 for p, n in zip(b.params, b.sizes)]     # (zeros: a parameter that got no gradient)
        if b.padded > b.numel:
            parts.append(torch.zeros(b.padded - b.numel, dtype=self.dtype, device=dev))
        out = b.shard_grad                           # last step's shard, as GradReducer._launch
        if out is None or out.shape != (b.shard,) or out.dtype != self.dtype or out.device != dev:
            out = torch.empty(b.shard, dtype=self.dtype, device=dev)
        b.parts = parts                              # alive until the reduction completes
        self._inflight.append((b, reduce_scatter_parts_into(out, parts, self.group, async_op=True), out))
        self.launches[where] += 1
        self._poll()

    def _finalize(self, b, work, out) -> None:
        if b.flat_grad is not None or getattr(b, "parts", None) is None:
            return super()._finalize(b, work, out)
        work.wait()
        out.div_(self.group.size)                    # fp32: the mean on the shard, as GradReducer._finalize
        b.shard_grad, b.parts = out, None
        for p in b.params:                           # reduced: the full gradients go
            p.grad = None
        if self.on_reduced is not None:
            self.on_reduced(b)


def by_parts(red, b) -> bool:
    """Whether reducer ``red`` reduces bucket ``b`` from the parameters' gradients this step (module docstring)."""
    return (red.from_grads and red.expected == 1 and not red.local and red.mode == "reduce_scatter"
            and not red.keep_full and red.dtype == torch.float32 and b.group is None and b.grad_div is None
            and not b.deferred and not getattr(b, "at_finish", False)
            and parts_fit(red.group, b.padded, red.dtype, b.params[0].device))
