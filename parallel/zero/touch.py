"""ZeRO-3 parameters used outside their own module's forward, found on the traced first forward.

A stage-3 unit is gathered by the forward pre-hook of a module that needs it (:mod:`.stage3`). Some
models read a child's weight in the *parent's* code without calling the child — transformers' Mamba
mixers (Bamba, BailingHybrid, …) run ``causal_conv1d_fn(x, self.conv1d.weight.squeeze(1),
self.conv1d.bias)``; GPTs written by hand compute the tied head as ``h @ self.wte.weight.T``. The
child's hook never fires, so the parent's code sees the freed shard (an empty tensor:
``IndexError: Dimension out of range``, or worse, a size-0 result). DeepSpeed calls these *external
parameters* and asks the user to register them (``deepspeed.zero.register_external_parameter``).

Here they are found: while the first forward is traced, a :class:`~torch.overrides.TorchFunctionMode`
looks at the tensor arguments of every torch function and tensor method. A managed parameter whose
unit is not gathered is gathered on the spot and becomes a *need* of the innermost running module that
has stage-3 hooks (the module whose code touched it, or its nearest hooked ancestor; the root always
has hooks). From then on that module's pre-hook gathers the unit before its code runs, its post-hook
frees it, and its outputs' gradient hooks gather it again for backward — exactly as for the module's
own parameters. Reading only a parameter's dtype or device (the same on the empty shard) gathers
nothing.

Limit: only the traced (first) forward is watched; a later forward that takes a branch the trace did
not see and touches another module's parameter there still sees the shard.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["TouchMode", "METADATA"]

# Functions whose answer is the same on the freed (empty) shard as on the full parameter.
METADATA = frozenset(getattr(torch.Tensor, n).__get__ for n in ("dtype", "device", "requires_grad", "is_leaf",
                                                                 "grad_fn", "is_cuda", "is_meta", "layout"))


class TouchMode(TorchFunctionMode):
    """Active while stage 3 traces its first forward; ``adopt(unit)`` is
    :meth:`parallel.zero.stage3.Stage3Params._adopt`, ``unit_of`` maps parameters to units, ``quiet()``
    says the stage-3 hooks themselves are running (their own reads of parameters are not uses)."""

    def __init__(self, unit_of: dict, gathered, adopt, quiet):
        super().__init__()
        self.unit_of, self.gathered, self.adopt, self.quiet = unit_of, gathered, adopt, quiet

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in METADATA and not self.quiet():
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, nn.Parameter):
                    u = self.unit_of.get(t)
                    if u is not None and not self.gathered(u):
                        self.adopt(u)
        return func(*args, **kwargs)
