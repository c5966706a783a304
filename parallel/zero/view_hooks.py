"""A gradient hook on a module's output that survives the caller modifying the output in place.

Stage 3 (:mod:`.stage3`) gathers a module's units again for backward from a hook on the gradient of each of
the module's outputs (the pre-backward hook). A hook registered on a tensor is kept by autograd across a later
in-place operation on that tensor (it then receives the gradient with respect to the value before the
in-place op). But most layer outputs are *views*: ``nn.Linear`` on a 3-D input computes ``addmm`` on the
flattened input and returns ``view(b, s, h)`` of it. An in-place operation on a view rebases the view's history
(its ``ViewBackward`` node leaves the graph; the base gets a ``CopySlices`` node that calls the base's old node
directly), and a hook registered on the view before the in-place op never fires. RoCBert's embeddings do
exactly this — ``embedding_in = self.map_inputs_layer(x); embedding_in += token_type_embeddings`` — so the
Linear's backward ran on its freed parameters (``The size of tensor a (0) must match …`` in AccumulateGrad).

So for an output ``t`` that is a view of a non-leaf base, the hook is registered on the base as well: the
base's own node (``addmm``'s) is still in the graph after any in-place op on ``t`` or on the base (the same
rule: hooks registered before the op see the gradient of the value before it), and it runs before the
layer's parameter gradients are computed. The callback runs once per forward (whichever hook fires first),
so a view that is not modified costs no second gather. A base that is a leaf (a module returning a view of
its parameter) gets no hook: a hook on a parameter would outlive the forward.
"""
from __future__ import annotations

import torch

__all__ = ["hook_output_grad"]


def hook_output_grad(t: torch.Tensor, fn) -> None:
    """Call ``fn()`` once, when the first gradient of ``t`` (or of the base ``t`` views) is computed in
    backward — also when ``t`` is modified in place after this call (see the module docstring)."""
    done = []

    def once(g):
        if not done:
            done.append(True)
            fn()

    t.register_hook(once)
    base = t._base if t._is_view() else None
    if base is not None and base.requires_grad and base.grad_fn is not None:
        base.register_hook(once)
