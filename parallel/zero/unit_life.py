"""When a ZeRO-3 unit is freed in forward (:mod:`parallel.zero.stage3`): kept units and merged units.

Kept units. The units freed last in the traced forward stay gathered into backward. Their number is
``zero.keep_after_forward`` (k), or, with ``zero.max_reuse_distance`` = D (elements), DeepSpeed's rule: a unit
is kept iff its *reuse distance* is below D. DeepSpeed (``PartitionedParameterCoordinator.__params_to_release``,
deepspeed/runtime/zero/partitioned_param_coordinator.py; the config docs' ``stage3_max_reuse_distance``: "do not
release a parameter if it will be reused within this threshold of parameters") walks its trace of the step from
the module being released, summing the elements of every module it passes, and keeps the parameters it meets
again before the sum reaches D. A unit u freed in forward is next used at its backward; between the two run the
units freed after it in forward (their elements A(u)) and, in backward, the same units again (A(u) more), so
its reuse distance is 2·A(u), and u is kept iff 2·A(u) < D (DeepSpeed's ``>=`` test ends the walk: D = 0 keeps
none). A(u) grows toward the front of the forward, so the kept units are the k freed last, k counted after the
trace (:func:`reuse_keep`); unit elements are unpadded parameter elements.

Merged units (``zero.unit_mb``, :func:`parallel.zero.unit_plan.merge_units`). A unit holding several modules'
units (its ``owners``) is freed in forward only once every module that needs it and runs has finished its forward
(and no user is left), not after the first: one gather per forward, as one ``fully_shard`` over several blocks. The
modules waited for are those whose needs hold the unit (owners, a tied head borrowing the embedding, a region that
gathers it): all of them until the traced forward has run, then those that ran in it; modules inside a region (their
hooks are inert) are not waited for. A unit of one module is freed as before (at its last user's post-forward).
A region (:mod:`.regions`: modules called a data-dependent number of times) holding a merged unit is refused
(:func:`parallel.zero.regions.refuse_merged_regions`, on every dp rank at once): which of its parameters get a
gradient depends on the rank's data, so a merged unit's state in backward — and with it the gathers the ranks
issue — could differ (seen: a hang of a ModuleList of experts at dp 2).
"""
from __future__ import annotations

__all__ = ["last_frees", "reuse_keep", "init_owners", "trace_owners", "owner_done", "may_free"]


def last_frees(freed: list) -> dict:
    """``freed``: (unit, module) in the traced forward's free order → {(id(unit), id(module)) of each unit's last
    free: its rank from the end (0: freed last)}."""
    return {(id(u), id(m)): i for i, (u, m) in enumerate(_last_free_of(freed).items())}


def reuse_keep(freed: list, distance: float) -> int:
    """How many of the units freed last in forward DeepSpeed's reuse rule keeps: u (rank i from the end) is kept
    iff 2·Σ_{j<i} elements(u_j) < ``distance`` (module docstring)."""
    k, after = 0, 0
    for u in _last_free_of(freed):
        if 2 * after >= distance:
            break
        k += 1
        after += u.numel
    return k


def _last_free_of(freed: list) -> dict:
    """{unit: the module whose post-forward freed it last}, the unit freed last first."""
    last = {}
    for u, m in reversed(freed):
        last.setdefault(u, m)
    return last


def _needing(u, needs: dict, mods) -> list:
    return [m for m in mods if any(x is u for x in needs.get(m, ()))]


def init_owners(units: list, needs: dict) -> bool:
    """Give each merged unit the modules its free waits for (every module that needs it); whether any is merged."""
    merged = False
    for u in units:
        many = len(getattr(u, "owners", ())) > 1
        u.waits, u.done = (_needing(u, needs, needs), set()) if many else (None, None)
        merged |= many
    return merged


def trace_owners(units: list, needs: dict, traced: list) -> None:
    """After the traced forward: a merged unit waits only for the modules that need it and ran in it."""
    ran = list(dict.fromkeys(traced))
    for u in units:
        if u.waits is not None:
            u.waits = _needing(u, needs, ran)


def owner_done(u, m) -> None:
    """Module ``m`` (which needs ``u``) finished its forward."""
    if u.done is not None:
        u.done.add(m)


def may_free(u, inert) -> bool:
    """``u`` has no user left: may it be freed (a merged unit: once every owner it waits for is done)?"""
    return u.waits is None or all(o in u.done or o in inert for o in u.waits)

