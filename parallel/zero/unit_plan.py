"""ZeRO stage 3's units: which modules own which parameters, and which units each hooked module needs
(parallel/zero/stage3.py gathers a module's needs around its forward and backward)."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["plan_units"]


def plan_units(module: nn.Module, managed: dict, unit_types=None):
    """Split ``managed`` ({param: name}) into units. Returns (owners, needs): ``owners`` is a list of
    (module, [(name, param), …]) in module pre-order; ``needs`` maps each module with hooks to the
    indices (into owners) of the units it uses."""
    if unit_types is None:
        sel = [m for m in module.modules() if any(p in managed for p in m.parameters(recurse=False))]
    else:
        types = tuple(unit_types) if isinstance(unit_types, (tuple, list)) else (unit_types,)
        sel = [module] + [m for m in module.modules() if m is not module and isinstance(m, types)]
    selset = set(sel)

    def region(m):
        out = [p for p in m._parameters.values() if p is not None and p in managed]
        for c in m.children():
            if c not in selset:
                out += region(c)
        return out

    owner, regions = {}, {}
    for m in sel:
        regions[m] = region(m)
        for p in regions[m]:
            owner.setdefault(p, m)
    owners, index = [], {}
    for m in sel:
        seen, mine = set(), []
        for p in regions[m]:
            if owner[p] is m and p not in seen:
                seen.add(p)
                mine.append((managed[p], p))
        if mine:
            index[m] = len(owners)
            owners.append((m, mine))
    needs = {}
    for m in sel:
        idx = list(dict.fromkeys(index[owner[p]] for p in regions[m]))
        if idx:
            needs[m] = idx
    missing = set(managed) - set(owner)
    if missing:
        raise ValueError(f"stage 3: {len(missing)} parameter(s) are held by no unit module "
                         f"(e.g. {[managed[p] for p in list(missing)[:3]]}); check unit_types")
    return owners, needs
