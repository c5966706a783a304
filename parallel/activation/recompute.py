"""A non-reentrant activation checkpoint whose one recompute serves every backward pass over the
block's forward — the zero-bubble split's ``I`` and ``W`` (Qi et al., arXiv 2401.10241) included.

torch.utils.checkpoint (``use_reentrant=False``) keys what it recomputes by autograd graph task:
each backward call over a block recomputes it, and a tensor one call recomputed but did not use
stays until the graph dies. Under the I/W split (:mod:`parallel.pipeline.backward_split`) ``I`` is
one call (``autograd.grad(y, x, retain_graph=True)``) and ``W`` another (a backward from the captured
δ_N into the weights): a checkpointed block was recomputed twice, and the tensors of I's recompute
that I does not use (the weight side's) were held from I to W next to W's own recompute — measured
peaks above no checkpointing (pp2 ZB-H1: 2.39 MB under full vs 1.48 MB without; issue 20).

Here each tensor the block's forward saves is a :class:`_Holder` in the graph (saved-tensor hooks,
as torch's). The first unpack of an empty holder, in any backward, re-runs the block once —
from its inputs, kept at the forward, with the CPU/device RNG states and autocast state of the
forward replayed (dropout draws the same mask) — and fills every empty holder, in pack order
(a different count is an error naming the block). An unpack hands out the tensor and empties its
holder, except when the autograd node unpacking it is one ``W`` will run again
(:func:`parallel.pipeline.backward_split.kept_for_weights`: during ``I``, the nodes where weights
enter, at which I captures δ_N): that tensor stays. Holders of nodes ``I`` does not run (the
weight side) stay filled too, until ``W`` unpacks them. So from I to W a block keeps what W
needs — the saved inputs of its weight consumers (a linear's input, a norm's input and statistics)
besides their δ_N — and W does not recompute. A plain backward (1F1B, GPipe, data/tensor
parallel) unpacks every holder once: one recompute, each tensor freed once used, as torch's.
A further backward over a retained graph finds empty holders and recomputes again.

``context_fn() -> (forward_ctx, recompute_ctx)`` as torch's (selective checkpointing's caching
modes); ``guard`` wraps each recompute (:class:`parallel.activation.checkpointing._RecomputeGuard`:
counts it, lets the block's own checkpoint hooks stand aside, restores BatchNorm statistics).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

from parallel.pipeline.backward_split import kept_for_weights

__all__ = ["Frame"]


class _Holder:
    """One saved tensor of the checkpointed forward: empty until a recompute fills it."""
    __slots__ = ("value", "__weakref__")

    def __init__(self):
        self.value = None


def _device_type(args) -> str:
    return next((a.device.type for a in args if isinstance(a, torch.Tensor) and a.device.type != "cpu"), "cpu")


def _autocast_state(dev: str) -> dict:
    return {d: dict(enabled=torch.is_autocast_enabled(d), dtype=torch.get_autocast_dtype(d),
                    cache_enabled=torch.is_autocast_cache_enabled())
            for d in {dev, "cpu"} if torch.amp.is_autocast_available(d)}


class Frame:
    """One checkpointed forward of ``fn(*args, **kwargs)``: ``with frame.forward(): fn(...)``
    replaces saving by holders; backward unpacks recompute (see the module docstring)."""

    def __init__(self, fn, name: str, args: tuple, kwargs: dict, context_fn, guard):
        self.fn, self.name, self.args, self.kwargs = fn, name, args, kwargs
        self.context_fn, self.guard = context_fn, guard
        self.holders: list = []                        # weakrefs, pack order
        dev = _device_type(args)
        self.dev, self.autocast = dev, _autocast_state(dev)
        self.cpu_rng = torch.get_rng_state()
        mod = getattr(torch, dev, None)
        self.dev_rng = get_device_states(*args) if dev != "cpu" and getattr(mod, "_initialized", False) else None
        self.fwd_ctx, self.rec_ctx = context_fn()

    def forward(self):
        """Context of the block's forward: every saved tensor becomes a holder."""
        def pack(t):
            h = _Holder()
            self.holders.append(weakref.ref(h))
            return h

        stack = contextlib.ExitStack()
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, self._unpack))
        stack.enter_context(self.fwd_ctx)
        return stack

    def _unpack(self, h: _Holder) -> torch.Tensor:
        if h.value is None:
            self._recompute()
        t = h.value
        if not kept_for_weights(torch._C._current_autograd_node()):
            h.value = None
        return t

    def _recompute(self) -> None:
        i = 0

        def fill(t):
            nonlocal i
            if i >= len(self.holders):
                raise RuntimeError(f"activation checkpointing of {self.name}: the recompute saved more tensors "
                                   f"than the forward ({len(self.holders)}); the block's forward must not depend "
                                   "on state that changes between forward and backward")
            h = self.holders[i]()
            i += 1
            t = t.detach() if t.requires_grad else t
            if h is not None and h.value is None:
                h.value = t
            return t

        # devices=[] forks the CPU generator only; device_type is named only for a device (torch < 2.13 rejects None)
        fork = (dict(devices=[]) if self.dev_rng is None or self.dev == "cpu" else
                dict(devices=self.dev_rng[0], device_type=self.dev))
        with torch.random.fork_rng(**fork), contextlib.ExitStack() as stack:
            torch.set_rng_state(self.cpu_rng)
            if self.dev_rng is not None:
                set_device_states(*self.dev_rng, device_type=self.dev)
            for d, kw in self.autocast.items():
                stack.enter_context(torch.amp.autocast(d, **kw))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(fill, lambda t: t))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(self.guard)
            stack.enter_context(self.rec_ctx)
            self.fn(*self.args, **self.kwargs)
        if i != len(self.holders):
            raise RuntimeError(f"activation checkpointing of {self.name}: the recompute saved {i} tensors, the "
                               f"forward {len(self.holders)}; the block's forward must not depend on state that "
                               "changes between forward and backward")
