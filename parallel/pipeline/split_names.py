"""Splitting models whose layers are not a stack of one block class (:mod:`.split` calls these).

* **User-named boundaries** (``parallel.pp_split: [features.4, head]``): each name is the module
  where a stage starts. The body is the ``nn.Sequential`` / ``nn.ModuleList`` holding the first
  named block (``features``); the others name later blocks of it (``features.9``), and the last
  may name a module that runs after the body (``head``, ``classifier``): the last stage then holds
  only the modules after the body. S = pp·v stages need S − 1 names (or S, the first being block 0).
* **A Sequential of different modules** (a CNN's ``features``, an MLP of mixed layers): when no
  container of one block class exists, the plain ``nn.Sequential`` (its forward chains its children,
  so its blocks run once each, in order) with the most children is the body.
* **Counted cost** (``balance="flops"``): per block, the FLOPs torch's FlopCounterMode counts while
  the probe forward runs it (the dispatcher's count of matmuls and convolutions: exact, unlike a
  clock, and unlike parameter counts right for convolutions, whose cost scales with the image);
  the contiguous split then minimises the largest stage's FLOPs.
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ["names_of", "body_from_names", "bounds_from_names", "mixed_sequential"]


def names_of(split) -> list | None:
    """``split`` as a list of module names, or None when it is 'auto' or block indices."""
    if isinstance(split, (list, tuple)) and split and all(isinstance(s, str) for s in split):
        return list(split)
    return None


def _containers(model):
    return [(n, c) for n, c in model.named_modules() if isinstance(c, (nn.ModuleList, nn.Sequential)) and len(c)]


def candidates(model) -> str:
    """The containers a split could use, for error messages."""
    return ", ".join(f"{n or '<model>'} ({len(c)} × {'/'.join(sorted({type(x).__name__ for x in c}))})"
                     for n, c in _containers(model)) or "none"


def body_from_names(model: nn.Module, names: list) -> tuple[str, nn.Module]:
    """The container holding the first named block that is a child of a ModuleList/Sequential."""
    for nm in names:
        parent, _, key = nm.rpartition(".")
        try:
            c = model.get_submodule(parent) if parent else model
        except AttributeError:
            continue
        if isinstance(c, (nn.ModuleList, nn.Sequential)) and key in c._modules:
            return parent, c
    raise ValueError(f"pipeline split: parallel.pp_split={names} names no child of an nn.ModuleList or nn.Sequential "
                     f"of {type(model).__name__}; its containers are: {candidates(model)}. Name the blocks where "
                     "stages start as <container>.<child> (e.g. features.4), optionally ending with a module after "
                     "the container (e.g. head)")


def bounds_from_names(names: list, body_path: str, body, post: list, S: int, where: str) -> list:
    """Per-stage (start, end) block ranges for the named boundaries (see the module docstring)."""
    keys = list(body._modules)
    n, prefix = len(keys), (body_path + "." if body_path else "")
    cuts = []
    for j, nm in enumerate(names):
        rel = nm[len(prefix):] if nm.startswith(prefix) else None
        if rel in keys:
            cuts.append(keys.index(rel))
        elif j == len(names) - 1 and any(p == nm or p.startswith(nm + ".") for p in post):
            cuts.append(n)                                   # the last stage: only the modules after the body
        else:
            after = f"; modules after it: {', '.join(post)}" if post else ""
            raise ValueError(f"pipeline split: parallel.pp_split name {nm!r} is not a block of {where} (blocks "
                             f"{prefix}0..{prefix}{keys[-1]}{after}); name blocks of one container, in order")
    if len(cuts) == S and cuts[0] == 0:
        cuts = cuts[1:]
    if len(cuts) != S - 1 or cuts != sorted(set(cuts)) or cuts[0] < 1:
        raise ValueError(f"pipeline split: parallel.pp_split={names} gives {len(cuts) + 1} stages over {where}, "
                         f"but parallel.pp × pp_virtual_stages = {S}: name {S - 1} modules where stages 1..{S - 1} "
                         "start, in forward order")
    cuts = [0] + cuts + [n]
    return [(cuts[k], cuts[k + 1]) for k in range(S)]


def mixed_sequential(model: nn.Module):
    """The plain nn.Sequential inside ``model`` (not the model itself) with the most children, or None."""
    seqs = [(len(c), sum(p.numel() for p in c.parameters()), n, c) for n, c in model.named_modules()
            if n and type(c) is nn.Sequential and len(c) > 1]
    return max(seqs, key=lambda t: t[:2])[2:] if seqs else None
