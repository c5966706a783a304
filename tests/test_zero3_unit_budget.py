"""ZeRO-3 unit budget (``zero.unit_mb``, parallel/zero/unit_plan.merge_units) and DeepSpeed's reuse rule for kept
units (``zero.max_reuse_distance``, parallel/zero/unit_life.py), issue 18.

* merging: consecutive units (module pre-order) join while their elements fit the budget; a unit over it stays alone;
* a GPT at dp = 2, block units: with a budget the losses and the final (gathered) parameters are bitwise those of
  the per-block units (same arithmetic: the forward reads the same values, a dp-2 reduce-scatter sums the same two
  numbers per element, AdamW is elementwise; only the shard boundaries move) — with m = 1 and m = 2 micro-batches,
  tied and untied embeddings, per-module units, parameter offload — and the one-process loop's within ``RTOL``
  (masters are not compared: their shard layout moves with the unit boundaries);
* counts per step: all-gathers and reduce-scatters on dp = the merged units' (one of each per step when the whole
  model fits, with every unit kept), and the wire bytes of the dp all-gathers are the units' padded bytes × gathers;
* the reuse rule keeps exactly the units whose 2·(elements freed after them) < D.
"""
import pytest
import torch
from harness import run_ranks
from test_zero import OPTS, RTOL, assert_curve, mean_over_ranks, reference_run
from test_zero import train as zero_train

from parallel.config import ZeroConfig

G, STEPS = 8, 4


def test_merge_units_greedy_by_budget():
    from parallel.zero.unit_plan import merge_units
    ps = [torch.nn.Parameter(torch.zeros(n)) for n in (4, 3, 5, 20, 2, 2)]
    owners = [(f"m{i}", [(f"p{i}", p)]) for i, p in enumerate(ps)]
    needs = {f"m{i}": [i] for i in range(6)} | {"head": [0, 5]}
    got, nd = merge_units(owners, needs, 8)
    assert [m for m, _ in got] == [("m0", "m1"), ("m2",), ("m3",), ("m4", "m5")]     # 4+3 ≤ 8, 7+5 > 8; 20 alone
    assert [sum(p.numel() for _, p in ps_) for _, ps_ in got] == [7, 5, 20, 4]
    assert nd == {"m0": [0], "m1": [0], "m2": [1], "m3": [2], "m4": [3], "m5": [3], "head": [0, 3]}
    same, nd0 = merge_units(owners, needs, 0)                                          # 0: unchanged
    assert [m for m, _ in same] == [(f"m{i}",) for i in range(6)] and nd0 == needs


def _gpt(tie):
    from examples.gpt import GPT
    torch.manual_seed(0)
    return GPT(vocab_size=64, seq_len=16, n_layer=3, n_head=4, n_embd=32, tie=tie)


def _reference(tie):
    return reference_run("gpt", "adamw", STEPS, G, model=_gpt(tie))[0]


def _run(rank, world, tie, m, unit_mb, keep, units="block", offload="none", reuse=None):
    from parallel.config import OffloadConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    mesh = Mesh(dp=world)
    g = mesh.group("dp")
    model = _gpt(tie)
    zc = ZeroConfig(stage=3, keep_after_forward=keep, unit_mb=unit_mb, max_reuse_distance=reuse,
                    offload=OffloadConfig(params=offload))
    zero = ZeroOptimizer(model, OPTS["adamw"], g, zc, unit_types=(type(model.blocks[0]),) if units == "block" else None)
    losses = zero_train(zero, model, g, G, 1, m)[0]             # the first step traces
    before = mesh.stats.snapshot()
    losses += zero_train(zero, model, g, G, STEPS - 1, m, start=1)[0]
    comm = mesh.stats.diff(mesh.stats.snapshot(), before).get("dp", {})
    with zero.gathered():
        params = [p.detach().clone() for p in model.parameters()]
    s3 = zero.stage3
    return dict(losses=losses, params=params,
                units=[(len(u.owners), u.numel, u.padded) for u in s3.units], kept=len(s3.kept_units()),
                ag=comm.get("all_gather", {}), rs=comm.get("reduce_scatter", {}), es=4)


@pytest.mark.parametrize("tie,m", [(True, 1), (False, 2), (True, 2)])
def test_budget_is_bitwise_the_per_block_units(tie, m):
    base = run_ranks(_run, 2, tie, m, 0, 2)
    big = run_ranks(_run, 2, tie, m, 64, 2)            # 64 MiB: the whole model is one unit
    mid = run_ranks(_run, 2, tie, m, 0.1, 2)           # 26214 elements: root (2624) + block (12704), 2 blocks
    assert len(base[0]["units"]) == 4 and len(big[0]["units"]) == 1 and big[0]["units"][0][0] == 4
    assert [u[0] for u in mid[0]["units"]] == [2, 2], mid[0]["units"]
    for got in (big, mid):
        for n, b in zip(got, base):
            assert n["losses"] == b["losses"]                                   # bitwise
            assert all(torch.equal(x, y) for x, y in zip(n["params"], b["params"]))
    assert_curve(mean_over_ranks(big, "losses"), _reference(tie), RTOL, f"unit_mb=64 tie={tie} m={m} vs one process")
    steps = STEPS - 1
    # per step: 4 per-block units, keep 2 → forward gathers 4, backward 2 more, per micro-batch; 4 reduce-scatters
    assert base[0]["ag"]["calls"] == steps * m * (4 + 2) and base[0]["rs"]["calls"] == steps * 4
    # one unit, kept: one gather per micro-batch, one reduce-scatter per step
    assert big[0]["ag"]["calls"] == steps * m and big[0]["rs"]["calls"] == steps
    (_, _, padded), = big[0]["units"]
    assert big[0]["ag"]["wire_bytes"] == steps * m * padded // 2 * 4        # (N−1)/N of the padded unit, fp32
    # two units of two, both kept (keep 2): one gather each per micro-batch
    assert mid[0]["ag"]["calls"] == steps * m * 2 and mid[0]["rs"]["calls"] == steps * 2


@pytest.mark.parametrize("units,offload", [("leaf", "none"), ("block", "cpu")])
def test_budget_per_module_units_and_param_offload_bitwise(units, offload):
    base = run_ranks(_run, 2, True, 1, 0, 2, units, offload)
    big = run_ranks(_run, 2, True, 1, 64, 2, units, offload)
    assert len(base[0]["units"]) >= 4 and len(big[0]["units"]) == 1 and big[0]["units"][0][0] == len(base[0]["units"])
    for n, b in zip(big, base):
        assert n["losses"] == b["losses"]
        assert all(torch.equal(x, y) for x, y in zip(n["params"], b["params"]))
    assert big[0]["ag"]["calls"] == STEPS - 1 and big[0]["rs"]["calls"] == STEPS - 1      # tied head: same unit


class _U:
    def __init__(self, n):
        self.numel = n


def test_reuse_rule_counts_the_units_freed_after():
    from parallel.zero.unit_life import reuse_keep
    root, b0, b1, b2 = _U(2624), _U(12704), _U(12704), _U(12704)
    freed = [(b0, "b0"), (b1, "b1"), (b2, "b2"), (root, "root")]         # traced forward's free order
    # rank from the end: root A=0, b2 A=2624, b1 A=15328, b0 A=28032; kept iff 2·A < D
    assert [reuse_keep(freed, d) for d in (0, 1, 5248, 5249, 30656, 30657, 56064, 56065, 1e9)] == \
        [0, 1, 1, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize("reuse,kept", [(5249, 2), (1e9, 4), (0, 0)])
def test_reuse_distance_decides_the_kept_units(reuse, kept):
    res = run_ranks(_run, 2, True, 1, 0, 2, "block", "none", reuse)
    base = run_ranks(_run, 2, True, 1, 0, 2)
    for n, b in zip(res, base):
        assert n["kept"] == kept and n["losses"] == b["losses"]
        assert n["ag"]["calls"] == (STEPS - 1) * (4 + 4 - kept)             # forward 4, backward the freed ones
    # the planner (dry-run / simulate) applies the same rule: its per-step dp all-gathers are the run's
    from parallel.planning.planner import Layout, ModelSpec, TrainSpec, predict
    pred = predict(ModelSpec(n_layer=3, hidden=32, heads=4, vocab=64, seq=16), Layout(2, 1, 1, 3, 1, units="block"),
                   TrainSpec(G, reuse=reuse)).comm[0]["dp"]["all_gather"]
    assert pred["calls"] == 4 + 4 - kept
    assert pred["wire_bytes"] * (STEPS - 1) == res[0]["ag"]["wire_bytes"]


def test_a_count_set_later_replaces_the_reuse_rule():
    from parallel.zero.stage3 import Stage3Params
    s3 = Stage3Params.__new__(Stage3Params)
    s3._keep, s3.reuse = 2, 1e9
    s3.keep = 0                                                             # the engine under pp
    assert s3.keep == 0 and s3.reuse is None


def test_bad_budget_and_reuse_values_raise():
    import os

    from parallel.config import ConfigError, load_config
    from parallel.zero.args import check_args
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = os.path.join(root, "configs/gpt_dp2.yaml")
    for over, msg in ((["zero.stage=3", "zero.unit_mb=-1"], "zero.unit_mb=-1.0 must be a finite number >= 0"),
                      (["zero.stage=3", "zero.unit_mb=abc"], "zero.unit_mb"),
                      (["zero.stage=3", "zero.max_reuse_distance=-5"], "zero.max_reuse_distance=-5.0 must be"),
                      (["zero.stage=2", "zero.unit_mb=8"], "only apply to stage-3 units")):
        with pytest.raises(ConfigError, match=msg):
            load_config(cfg, over).validate(2)
    with pytest.raises(ValueError, match="zero.unit_mb=-2 must be a finite number"):
        check_args(torch.nn.Linear(2, 2), lambda ps: None, _solo(), ZeroConfig(stage=3, unit_mb=-2), None, "stop", ())


def _solo():
    from test_zero import _solo_group
    return _solo_group()


def _units(engine) -> int:
    return len(engine.zero.stage3.units)


@pytest.mark.parametrize("before,after", [(0, 64), (64, 0)])
def test_resume_under_another_budget_is_exact(tmp_path, before, after):
    """Engine checkpoints hold each parameter's elements by name (parallel/checkpoint), not the shard layout: a run
    saved with one unit budget resumes bit for bit under another (the shard boundaries move with the units)."""
    from test_optim_checkpoint import resume
    over = ["zero.stage=3", "zero.units=block"]
    for ref, got, n_before, n_after in run_ranks(resume, 2, str(tmp_path / "ck"), over + [f"zero.unit_mb={before}"],
                                                 over + [f"zero.unit_mb={after}"], _units):
        assert got == ref and len(ref) == 3, (got, ref)
        assert (n_before, n_after) == ((3, 1) if before == 0 else (1, 3))      # the layouts really differ
