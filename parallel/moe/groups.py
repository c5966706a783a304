"""Expert-parallel groups: the ``ep`` axis carved out of ``dp`` (Megatron-LM / DeepSpeed-MoE).

With the mesh (pp, dp, tp) and ``ep`` dividing ``dp``, the dp coordinate splits as

    dp = edp · ep + e,     e ∈ [0, ep), edp ∈ [0, dp/ep)

so the ep peers of a rank are its ``ep`` neighbouring dp ranks (same pp, tp): they hold different
experts and exchange tokens by all-to-all. The *expert-data-parallel* group (axis "edp", size
dp/ep) is the ranks holding the same experts: expert gradients are reduced over it, everything else
over dp (DeepSpeed-MoE, Rajbhandari et al., arXiv 2201.05596; Megatron-Core's expert data parallel).
Every rank must create every group in the same order (``dist.new_group`` is collective); the groups
are cached per (world group, shape) like the mesh's own (:func:`parallel.mesh.release_meshes`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.comm import CommStats, Group

__all__ = ["expert_groups", "release_expert_groups", "ep_layout"]

_CACHE: dict = {}


def ep_layout(pp: int, dp: int, tp: int, ep: int) -> tuple[list, list]:
    """(ep groups, edp groups) as lists of global-rank tuples, for every rank of the mesh."""
    if ep < 1 or dp % ep:
        raise ValueError(f"parallel.ep={ep} must divide parallel.dp={dp}: expert parallelism is carved out of "
                         f"data parallelism (dp = ep × expert-data-parallel); choose ep among the divisors of {dp}")
    grid = torch.arange(pp * dp * tp).reshape(pp, dp // ep, ep, tp)
    eps = [tuple(int(r) for r in grid[a, b, :, c]) for a in range(pp) for b in range(dp // ep) for c in range(tp)]
    edps = [tuple(int(r) for r in grid[a, :, e, c]) for a in range(pp) for e in range(ep) for c in range(tp)]
    return eps, edps


def expert_groups(pp: int, dp: int, tp: int, ep: int, dp_group: Group, stats: CommStats) -> tuple[Group, Group]:
    """This rank's (ep, edp) counted groups. ep = 1: a one-rank ep group and the dp group as edp."""
    rank = dist.get_rank()
    if ep == 1:
        return Group(None, "ep", (rank,), 0, stats), dp_group
    eps, edps = ep_layout(pp, dp, tp, ep)
    world = dist.group.WORLD
    for key in [k for k in _CACHE if k[0] is not world]:
        del _CACHE[key]
    key = (world, pp, dp, tp, ep)
    if key not in _CACHE:
        _CACHE[key] = {ranks: (dist.new_group(list(ranks)) if len(ranks) > 1 else None) for ranks in eps + edps}
    pgs = _CACHE[key]
    mine_ep = next(r for r in eps if rank in r)
    mine_edp = next(r for r in edps if rank in r)
    return (Group(pgs[mine_ep], "ep", mine_ep, mine_ep.index(rank), stats),
            Group(pgs[mine_edp], "edp", mine_edp, mine_edp.index(rank), stats))


def release_expert_groups(destroy: bool = False) -> None:
    """Forget (and with ``destroy`` destroy) the cached ep / edp process groups."""
    groups = [pg for d in _CACHE.values() for pg in d.values() if pg is not None]
    _CACHE.clear()
    if destroy and dist.is_initialized():
        for pg in groups:
            dist.destroy_process_group(pg)
