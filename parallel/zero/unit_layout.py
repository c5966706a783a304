"""The flat buckets of a :class:`~parallel.zero.optimizer.ZeroOptimizer`: stages 0–2 fill reduction buckets of
``zero.bucket_mb``; stage 3 makes its units (:func:`~parallel.zero.unit_plan.plan_units`), coalesced up to
``zero.unit_mb`` (:func:`~parallel.zero.unit_plan.merge_units`), then the expert units and the deferred bucket
of tied pipeline copies."""
from __future__ import annotations

from parallel.data_parallel.bucket import FlatBucket
from parallel.data_parallel.bucket import make_buckets as fill
from parallel.moe.zero_buckets import expert_buckets, expert_units, split_expert_params
from parallel.parameters import param_info
from parallel.zero.unit_plan import merge_units, plan_units

__all__ = ["make_buckets"]


def make_buckets(opt, module, named, zero, unit_types):
    """Sets ``opt.buckets`` (reduction order), ``opt.deferred`` (tied, pp-reduced) and ``opt._all``; for stage 3
    returns its (units, needs) plan, else (None, None). Each stage-3 unit gets ``owners``: the modules whose units
    it holds (more than one when merged: :class:`~parallel.zero.stage3.Stage3Params` frees it after the last)."""
    N, r, stage, bpe = opt.group.size, opt.group.rank, opt.stage, opt.prec.bytes_per_element
    deferred = [(n, p) for n, p in named if param_info(p).defer_reduce]
    normal = [(n, p) for n, p in named if not param_info(p).defer_reduce]
    units = needs = None
    expert, normal = split_expert_params(normal, opt.expert_groups)     # parallel.moe: own group
    if stage < 3:
        opt.buckets = fill(normal, zero.bucket_mb * 2 ** 20, bpe, N, r, pad=stage > 0)
        if expert:
            opt.buckets += expert_buckets(expert, opt.expert_groups, N, zero.bucket_mb * 2 ** 20, bpe, stage > 0,
                                          len(opt.buckets))
    else:
        owners, needs = merge_units(*plan_units(module, {p: n for n, p in normal}, unit_types),
                                    zero.unit_mb * 2 ** 20 / bpe)
        units = [FlatBucket(i, params, N, r, pad=True) for i, (_, params) in enumerate(owners)]
        for u, (mods, _) in zip(units, owners):
            u.owners = mods
        if expert:
            expert_units(module, expert, opt.expert_groups, N, units, needs, plan_units)
        opt.buckets = units[::-1]                     # reduction order ≈ backward order
    opt.deferred = None
    if deferred:
        opt.deferred = FlatBucket(len(opt.buckets), deferred, N, r, pad=stage > 0)
        opt.deferred.deferred = True
    opt._all = opt.buckets + ([opt.deferred] if opt.deferred else [])
    return units, needs
