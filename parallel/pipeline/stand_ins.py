"""What a pipeline stage's stand-ins (modules another stage owns) show of the module they replace.

A stage copy replaces the blocks other stages own, the embeddings on later stages and the final norm / head
on earlier stages by small modules (:mod:`.stage`). Model code often reads the replaced module's attributes
outside its call — Llama 4's ``self.embed_tokens(input_ids.to(self.embed_tokens.weight.device))``, Mamba 2's
``self.lm_head(h.to(self.lm_head.weight.dtype))`` — only for their *metadata*. A stand-in therefore carries

* the replaced module's plain attributes (ints, floats, strings, bools: ``out_features``, ``padding_idx``, …);
* for each of its direct parameters and buffers a :class:`Described` tensor: same shape, dtype, device and
  strides, no storage; reading ``.device``/``.dtype``/``.shape`` works, any computation with it raises,
  naming the attribute and the stage that owns it (a value this stage does not hold can never enter a result).

Any other attribute raises an AttributeError that names the module, the attribute and the owning stage.
The split's plan-time check (:mod:`.split_check`) runs every stage once, so such a read is refused before
any rank trains.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

__all__ = ["Described", "StandIn"]

_PLAIN = (int, float, str, bool, type(None))


class Described(torch.Tensor):
    """A tensor with a parameter's metadata (shape, dtype, device, strides) and no data: every operation on it
    raises, naming ``what`` (``lm_head.weight``) and ``owner`` (the stage that holds the values)."""

    @staticmethod
    def __new__(cls, like: torch.Tensor, what: str, owner: str):
        t = torch.Tensor._make_wrapper_subclass(cls, like.shape, strides=like.stride(), dtype=like.dtype,
                                                device=like.device, requires_grad=False)
        t.what, t.owner = what, owner
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        t = next(a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, Described))
        raise RuntimeError(
            f"pipeline stage: the model's code computes with `{t.what}` ({func.__name__}), whose values live on "
            f"{t.owner}, outside the module's own call; a stage only holds the metadata (shape, dtype, device) of "
            "what other stages own. Set parallel.pp=1 for this model, or move that computation into the module")

    def __repr__(self):
        return f"Described({self.what}: {tuple(self.shape)}, {self.dtype}, on {self.owner})"

    def __deepcopy__(self, memo):
        return self


class StandIn(nn.Module):
    """Base of the stage stand-ins: :meth:`adopt` copies what the replaced module shows (see the module doc)."""

    def adopt(self, mod: nn.Module | None, what: str, owner: str) -> "StandIn":
        self.__dict__["_stand_in_of"] = (what, owner)
        if mod is None:
            return self
        own = set(self.__dict__)
        for k, v in vars(mod).items():
            if k not in own and not k.startswith("_") and isinstance(v, _PLAIN):
                self.__dict__[k] = v
        for kind in ("_parameters", "_buffers"):
            for k, t in getattr(mod, kind).items():
                if t is not None and k not in own:
                    self.__dict__[k] = Described(t, f"{what}.{k}", owner)
        return self

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        what, owner = self.__dict__.get("_stand_in_of", ("a module", "another stage"))
        raise AttributeError(
            f"pipeline stage: the model's code reads `{what}.{name}`, but {what} lives on {owner} and this stage "
            f"holds a stand-in for it ({type(self).__name__}), which has no `{name}`. Set parallel.pp=1 for this "
            "model, or read that value inside the module's own forward")
