"""The engine's phase callbacks (:meth:`Engine.add_callback`): forward and backward hooks on the stage
modules that call the registered functions at each phase boundary and may transform the first floating
tensor of a stage's output or of its incoming gradient (the watchdog and fault injection use them).
State (``_callbacks``, ``_hooks``, ``_transform``, ``step_count``, ``stages``) lives on the engine."""
from __future__ import annotations

import torch

__all__ = ["PhaseCallbacks"]


class PhaseCallbacks:
    def add_callback(self, fn):
        """Call ``fn(phase, step)`` at each phase boundary; returns a function that removes it.

        ``step`` is the 0-based index of the step the phase belongs to (``step_count`` while it runs;
        a checkpoint belongs to the step just finished). Callbacks run in the order they were added.

        forward             before each stage module's forward (per micro-batch and stage); ``fn`` may
                            return a function t -> t' applied to the first floating tensor of the output
        backward            when the gradient of a stage output arrives; a returned t -> t' maps it
        optimizer           before the update (ZeRO's step: gradient sync, norm, clip, update)
        checkpoint          :meth:`save` begins
        checkpoint_written  this rank's shards are in the ``.tmp-`` folder, before the commit
        """
        if not self._hooks:
            for st in self.stages:
                self._hooks += [st.register_forward_pre_hook(self._pre_forward),
                                st.register_forward_hook(self._post_forward)]
        self._callbacks.append(fn)

        def remove():
            if fn in self._callbacks:
                self._callbacks.remove(fn)
            if not self._callbacks:
                for h in self._hooks:
                    h.remove()
                self._hooks = []
        return remove

    def _emit(self, phase: str, step: int | None = None):
        """Run the callbacks; returns the composition of the tensor maps they returned (or None)."""
        out = None
        for fn in list(self._callbacks):
            t = fn(phase, self.step_count if step is None else step)
            if t is not None:
                out = t if out is None else (lambda x, f=out, g=t: g(f(x)))
        return out

    def _pre_forward(self, module, args):
        self._transform = self._emit("forward")

    def _post_forward(self, module, args, out):
        fn, self._transform = self._transform, None
        if fn is not None:
            out = _map_first_tensor(out, fn)
        if torch.is_grad_enabled():
            _map_first_tensor(out, self._watch_grad)
        return out

    def _watch_grad(self, t):
        if t.requires_grad:
            t.register_hook(self._on_grad)
        return t

    def _on_grad(self, g):
        fn = self._emit("backward")
        return fn(g) if fn is not None else None


def _map_first_tensor(out, fn):
    """Apply ``fn`` to the first floating tensor of a module output (tensor, tuple, dict/ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return fn(out) if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                items = list(out)
                items[i] = fn(v)
                return items if isinstance(out, list) else tuple(items)
        return out
    if isinstance(out, dict):
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                out[k] = fn(v)
                break
    return out
