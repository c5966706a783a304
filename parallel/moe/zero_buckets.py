"""ZeRO buckets and stage-3 units for expert parameters (those flagged ``param_info(p).ep_split``).

Expert parameters are never in a bucket with others: each of their buckets is partitioned over the
expert-data-parallel group edp (dp/ep ranks, the ranks holding the same experts), its summed gradient
is divided by the full dp size (an expert's gradient on one rank already sums the tokens of all ep
ranks: Σ_edp / dp is the global-batch mean; Megatron-Core's expert gradient scaling) and its
squared norm is summed over ep (each ep rank holds different experts). So ZeRO stage s keeps 1/edp of
the optimizer state (s ≥ 1), gradients (s ≥ 2) and parameters (s = 3) of this rank's E/ep experts:
per-rank expert state = (E/ep)/(dp/ep) = E/dp of the expert state for s = 3, E/ep of it for s = 0.
"""
from __future__ import annotations

from parallel.data_parallel.bucket import FlatBucket, make_buckets
from parallel.parameters import param_info

__all__ = ["split_expert_params", "expert_buckets", "expert_units"]


def split_expert_params(named: list, groups) -> tuple[list, list]:
    """(expert, other) (name, param) pairs; no expert ones without ``groups``."""
    if not groups:
        return [], named
    return ([(n, p) for n, p in named if param_info(p).ep_split],
            [(n, p) for n, p in named if not param_info(p).ep_split])


def _tag(buckets: list, groups, dp_size: int) -> list:
    ep, edp = groups
    if ep.size * edp.size != dp_size:
        raise ValueError(f"expert groups: ep {ep.size} × edp {edp.size} must equal the dp size {dp_size}")
    for b in buckets:
        b.group, b.grad_div, b.norm_group = edp, dp_size, ep
    return buckets


def expert_buckets(expert: list, groups, dp_size: int, bucket_bytes: float, element_size: int, pad: bool,
                   start_index: int) -> list:
    """Stages 0–2: buckets of the expert parameters, partitioned over edp."""
    edp = groups[1]
    return _tag(make_buckets(expert, bucket_bytes, element_size, edp.size, edp.rank, pad, start_index),
                groups, dp_size)


def expert_units(module, expert: list, groups, dp_size: int, units: list, needs: dict, plan_units) -> None:
    """Stage 3: every module holding expert parameters becomes a unit of its own (appended to ``units``,
    its hooks merged into ``needs``)."""
    edp, k = groups[1], len(units)
    owners, more = plan_units(module, {p: n for n, p in expert}, None)
    units += _tag([FlatBucket(k + i, ps, edp.size, edp.rank, pad=True) for i, (_, ps) in enumerate(owners)],
                  groups, dp_size)
    for m, idx in more.items():
        needs[m] = needs.get(m, []) + [k + i for i in idx]
