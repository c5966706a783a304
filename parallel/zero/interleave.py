"""ZeRO stages 1–2: update one bucket, then start its parameter all-gather while the next bucket updates.

After the reduce-scatter each rank owns the reduced gradient of its shard of every bucket; the step is
"update the shard (the optimizer), then all-gather the updated shards" (Rajbhandari et al., arXiv
1910.02054, §5.1–5.2). Done as two whole passes — every update, then every gather — the gathers start only
when the optimizer has finished and the step waits for all of them: on 2 ranks at 50M parameters that is
Ψ·4/2 = 100 MB on the wire after the last update, the largest exposed communication of ZeRO-1/2 (torch DDP
hides its all-reduce under backward instead). Here the buckets go in forward order: bucket k's pieces get
their gradients and ``optimizer.step()`` updates just them (torch's optimizers skip a parameter whose
``grad`` is None), its owned shard is written back and its all-gather is posted; bucket k + 1's update then
runs while bucket k's gather is on the wire. The waiting part of every gather but the last hides under the
updates of the later buckets (the part the core itself spends copying through the socket does not).

Exactness: each parameter piece is updated exactly once per step with the same gradient, learning rate
and its own state (step count, moments), so the result equals the single ``optimizer.step()`` bit for bit —
for optimizers whose update of one tensor depends only on that tensor's gradient and state. That holds for
torch's elementwise optimizers listed in :data:`PER_TENSOR` (the classes themselves, not subclasses, which
may keep a per-call counter); anything else (LAMB/Muon with ``bind_partition``, 1-bit Adam, offloaded
Adam, user classes) keeps the two-pass step.
"""
from __future__ import annotations

import torch

from parallel.comm import all_gather_into

__all__ = ["PER_TENSOR", "ENABLED", "eligible", "can_interleave", "step_interleaved"]

PER_TENSOR = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop,
              torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta)


ENABLED = False
"""Off by default. Measured idle at 50M on 2 gloo ranks (``python benchmarks/proto_profile.py --size 50m --rows
zero1 zero2 --steps 10 --ab-interleave``, 2026-12-03 20:52): interleaved ÷ two-pass 1.040 [0.965, 1.101] (ZeRO-1)
and 1.033 [0.967, 1.079] (ZeRO-2) — slower: gloo's threads copy through the socket on the same core the update
runs on, so nothing hides, and nine ``optimizer.step()`` calls cost more than one. Kept (exact, tested) for
backends whose transfers run beside compute (NCCL on its own stream): set ``parallel.zero.interleave.ENABLED``."""


def eligible(z) -> bool:
    """Stage 1/2, more than one bucket, no optimizer offload, a torch elementwise optimizer (module docstring)."""
    return (z.stage in (1, 2) and len(z._all) > 1 and z._opt_off is None
            and type(z.optimizer) in PER_TENSOR and not hasattr(z.optimizer, "bind_partition"))


def can_interleave(z) -> bool:
    """Whether ``z`` takes the interleaved step: :data:`ENABLED` and :func:`eligible`."""
    return ENABLED and eligible(z)


@torch.no_grad()
def step_interleaved(z) -> None:
    """Per bucket in forward order: update its owned pieces, write them into the flat parameters, post the
    bucket's all-gather; then wait for the gathers (or leave them pending with ``overlap_param_gather``).
    ``b.master.grad`` holds the (unscaled, clipped) owned gradient of each bucket on entry; dropped on exit."""
    z.wait_param_gather()
    pieces: dict = {}
    for b, i, a, e, view in z._piece_list:        # no gradient on any rank (b.unused): skipped, as torch does
        if i not in getattr(b, "unused", ()):
            pieces.setdefault(id(b), []).append((a - b.lo, e - b.lo, view))
    works = []
    for b in reversed(z._all):                     # forward order: first needed, first sent
        mine = pieces.get(id(b), ())
        if mine:
            for a, e, view in mine:
                view.grad = b.master.grad[a:e]
            z.optimizer.step()
            for _, _, view in mine:
                view.grad = None
        b.master.grad = None
        own = b.flat_param[b.lo:b.hi]
        if own.data_ptr() != b.master.data_ptr():
            own.copy_(b.master)
        works.append((b, all_gather_into(b.flat_param, own, b.group or z.group, async_op=True)))
    z._settle_gathers(works)
