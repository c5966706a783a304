"""Ties across tensor parallelism (plan time, for :mod:`.plan`).

A Parameter held by a converted module and by another module would become two (one shard, one full)
and drift apart in training. If every converted holder splits it the same way (dim, sections) and each
other holder has a style splitting it identically with its output unchanged — Embedding → ``vocab``
(rows), Linear split by output → ``colwise_gather``, by input → ``rowwise_split_input`` — that style is
added to the plan, and the shard stays one Parameter (one memo in the conversion). Otherwise the plan
refuses, naming both modules and the fix.
"""
from __future__ import annotations

import torch.nn as nn

from parallel.tensor_parallel.layers import _is_conv1d
from parallel.tensor_parallel.styles import COLWISE, ROWWISE

__all__ = ["tie_styles"]

CONVERTED = COLWISE + ROWWISE + ("vocab",)


def _split(m, style, pname, sections):
    """(dim, sections) along which a converted module splits its parameter ``pname``; None: kept whole."""
    conv = _is_conv1d(m)
    if style == "vocab":
        return (0, None)
    if style in COLWISE:
        return (1 if conv and pname == "weight" else 0, tuple(sections) if sections else None)
    return (0 if conv else 1, None) if pname == "weight" else None


def _tie_style(m, pname, split, sp, region):
    """A style that splits ``m``'s ``pname`` as ``split`` and leaves ``m``'s output unchanged, or None.
    (With Megatron-layout sequence parallel, vocab and colwise_gather would change the output's sequence length.)"""
    if pname != "weight" or split[1] is not None:
        return None
    megatron_sp = sp and not region
    if isinstance(m, nn.Embedding):
        return "vocab" if split[0] == 0 and not megatron_sp else None
    if isinstance(m, nn.Linear) or _is_conv1d(m):
        if split[0] == (1 if _is_conv1d(m) else 0):
            return None if megatron_sp else "colwise_gather"
        return None if sp else "rowwise_split_input"
    return None


def tie_styles(model: nn.Module, matches: list, sections: dict, sp: bool, region: bool, errors: list) -> list:
    """Matches to add so every Parameter shared between a converted module and another stays one Parameter
    (see the module docstring); errors for ties no style keeps. Repeated until nothing is added (an added
    module's other parameters may be tied too)."""
    holders: dict[int, dict] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None:
                holders.setdefault(id(p), {}).setdefault(id(mod), (name, mod, pname))
    planned = {id(m): (n, s) for n, s, m in matches}
    added: list = []
    while True:
        found, errs = [], []
        for group in holders.values():
            found += _keep_tied(group, planned, sections, sp, region, errs)
        if not found:
            errors += errs
            return added
        added += found


def _keep_tied(group: dict, planned: dict, sections: dict, sp: bool, region: bool, errors: list) -> list:
    """For the holders {id: (name, module, param name)} of one Parameter: the matches that keep it one."""
    conv = {k: h for k, h in group.items() if planned.get(k, ("", ""))[1] in CONVERTED}
    if len(group) < 2 or not conv:
        return []
    ways = {_split(m, planned[k][1], pn, sections.get(planned[k][0])) for k, (_, m, pn) in conv.items()}
    desc = " and ".join(f"{n}.{pn} ({planned[k][1]})" for k, (n, _, pn) in conv.items())
    if len(ways) > 1:
        errors.append(f"{desc} are one tied Parameter split two different ways {sorted(ways, key=str)}; "
                      f"give the tied modules matching styles")
        return []
    (way,) = ways
    found = []
    for k, (n, m, pn) in group.items():
        if way is None or k in conv:
            continue
        style = None if k in planned else _tie_style(m, pn, way, sp, region)
        if style is None:
            errors.append(f"{desc} is tied to {n}.{pn} ({type(m).__name__}, "
                          f"{'style ' + planned[k][1] if k in planned else 'not in the plan'}), which cannot "
                          f"be split the same way (dim {way[0]}) with its output unchanged: converting would "
                          f"untie them and they would drift apart in training; give {n} a matching style, "
                          f"leave {next(iter(conv.values()))[0]} out of the plan, or untie the weights")
            continue
        planned[k] = (n, style)
        found.append((n, style, m))
    return found
