"""ZeRO stage 3's units: which modules own which parameters, and which units each hooked module needs
(parallel/zero/stage3.py gathers a module's needs around its forward and backward)."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["greedy_groups", "merge_units", "plan_units"]


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


def merge_units(owners: list, needs: dict, budget: float):
    """Coalesce consecutive units into one while their elements fit ``budget`` (elements; ≤ 0: unchanged):
    ``zero.unit_mb`` × 2**20 / bytes per element. A merged unit is one FlatBucket, so one all-gather and one
    reduce-scatter where its parts made one each (the fixed cost of a collective paid once), as FSDP2 users wrap
    several blocks in one ``fully_shard`` and DeepSpeed ZeRO-3 fetches up to ``stage3_prefetch_bucket_size``
    elements at once. Greedy in unit order (module pre-order: the forward order of the layer stacks this targets;
    a model that runs its modules in another order stays exact, its merged units only stay gathered longer): a
    unit joins the current one if the sum stays ≤ ``budget``, else starts the next; a unit larger than the
    budget stays alone. Returns (owners, needs) in :func:`plan_units`' form, each owner's module now the tuple of
    the modules whose units were merged (one module: a 1-tuple)."""
    groups = greedy_groups([sum(p.numel() for _, p in params) for _, params in owners], budget)
    where = {i: g for g, idx in enumerate(groups) for i in idx}
    merged = [(tuple(owners[i][0] for i in idx), [np for i in idx for np in owners[i][1]]) for idx in groups]
    return merged, {m: list(dict.fromkeys(where[i] for i in idx)) for m, idx in needs.items()}


def greedy_groups(sizes: list, budget: float) -> list:
    """Indices of ``sizes`` in consecutive groups: an item joins the current group while the group's sum stays
    ≤ ``budget``, else starts the next (an item over the budget stands alone; ``budget`` ≤ 0: one item a group).
    The grouping of :func:`merge_units`, and of the planner's priced units (parallel/planning/planner.py)."""
    groups, size = [], 0
    for i, n in enumerate(sizes):
        if groups and budget > 0 and size + n <= budget:
            groups[-1].append(i)
            size += n
        else:
            groups.append([i])
            size = n
    return groups
