"""Mesh coordinates and groups for the layouts the foundation issue names."""
import itertools

import pytest
from harness import run_ranks


def _mesh_facts(rank, world, pp, dp, tp):
    from parallel.mesh import Mesh
    m = Mesh(pp=pp, dp=dp, tp=tp)
    facts = {"coord": m.coord, "sizes": {a: m.size(a) for a in ("pp", "dp", "tp")},
             "local": {a: m.local_rank(a) for a in ("pp", "dp", "tp")},
             "ranks": {a: m.group(a).ranks for a in ("pp", "dp", "tp")},
             "prev": m.pp_prev, "next": m.pp_next,
             "at": {(i, j, k): m.rank_at(pp=i, dp=j, tp=k)
                    for i, j, k in itertools.product(range(pp), range(dp), range(tp))}}
    # The groups really connect the ranks listed: an all-reduce of the global rank sums them.
    import torch

    from parallel import comm
    for a in ("pp", "dp", "tp"):
        t = torch.tensor([float(rank)])
        comm.all_reduce(t, m.group(a))
        facts.setdefault("sum", {})[a] = t.item()
    return facts


@pytest.mark.parametrize("pp,dp,tp", [(1, 1, 1), (1, 2, 1), (1, 1, 2), (2, 1, 1), (2, 2, 2)])
def test_mesh_coordinates_and_groups(pp, dp, tp):
    world = pp * dp * tp
    facts = run_ranks(_mesh_facts, world, pp, dp, tp)
    for r, f in enumerate(facts):
        # tp innermost, pp outermost: r = (pp*DP + dp)*TP + tp
        c = f["coord"]
        assert (c["pp"] * dp + c["dp"]) * tp + c["tp"] == r
        assert f["sizes"] == {"pp": pp, "dp": dp, "tp": tp}
        assert f["local"] == {a: c[a] for a in ("pp", "dp", "tp")} and c["cp"] == 0
        tp_ranks = tuple((c["pp"] * dp + c["dp"]) * tp + k for k in range(tp))
        dp_ranks = tuple((c["pp"] * dp + j) * tp + c["tp"] for j in range(dp))
        pp_ranks = tuple((i * dp + c["dp"]) * tp + c["tp"] for i in range(pp))
        assert f["ranks"] == {"pp": pp_ranks, "dp": dp_ranks, "tp": tp_ranks}
        assert f["sum"] == {"pp": float(sum(pp_ranks)), "dp": float(sum(dp_ranks)), "tp": float(sum(tp_ranks))}
        assert f["prev"] == (pp_ranks[c["pp"] - 1] if c["pp"] > 0 else None)
        assert f["next"] == (pp_ranks[c["pp"] + 1] if c["pp"] < pp - 1 else None)
        assert f["at"] == {(i, j, k): (i * dp + j) * tp + k for (i, j, k) in f["at"]}


def _bad_mesh(rank, world):
    from parallel.mesh import Mesh
    try:
        Mesh(pp=1, dp=3, tp=1)
    except ValueError as e:
        return str(e)


def test_mesh_rejects_wrong_world_size():
    msgs = run_ranks(_bad_mesh, 2)
    assert all("must equal the world size 2" in m for m in msgs)
