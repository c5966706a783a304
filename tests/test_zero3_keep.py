"""ZeRO-3 kept units (zero.keep_after_forward, parallel/zero/stage3.py): the k units freed last in forward stay
gathered into backward. Counted on 2 gloo ranks against keep=0: k all-gathers and (N−1)/N·Σ|kept|·4 wire bytes
fewer per micro-batch, the same gathered peak, and the same losses as one process (1e-5)."""
import os

import pytest
from harness import run_ranks
from test_zero import assert_curve, mean_over_ranks, reference_losses, train, zero_run

from parallel.config import ConfigError, ZeroConfig, load_config
from parallel.zero.stage3 import Stage3Params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G, STEPS = 8, 2          # the first step traces; kept from the second on; the third is counted
CASES = [("block", 0, 1), ("block", 2, 2), ("leaf", 0, 1), ("leaf", 2, 1)]     # (units, keep, micro-batches)


def _run(rank, world):
    from parallel.mesh import Mesh
    mesh = Mesh(dp=world)
    g = mesh.group("dp")
    out = {}
    for units, keep, m in CASES:
        losses, _, zero, model = zero_run(g, "gpt", "adamw", STEPS, G, 3, m=m, units=units, keep=keep)
        before = mesh.stats.snapshot()            # one step after the traced ones, counted
        more, _ = train(zero, model, g, G, 1, m=m, start=STEPS)
        ag = mesh.stats.diff(mesh.stats.snapshot(), before)["dp"]["all_gather"]
        s3 = zero.stage3
        kept = sorted(u.index for u in s3.kept_units())
        out[(units, keep, m)] = dict(losses=losses + more, calls=ag["calls"], wire=ag["wire_bytes"], kept=kept,
                                     sizes={u.index: u.padded * 4 for u in s3.units}, n=len(s3.units),
                                     peak=s3.peak_gathered_bytes, left=sum(u.kept for u in s3.units))
    return out


def test_kept_units_save_their_backward_gathers_exactly():
    res = run_ranks(_run, 2)
    ref = reference_losses("gpt", "adamw", STEPS + 1, G)
    N = 2
    for case in CASES:
        units, keep, m = case
        assert_curve(mean_over_ranks([{0: r[case]["losses"]} for r in res], key=0), ref, 1e-5, str(case))
        base, got = res[0][(units, 0, 1)], res[0][case]
        assert len(got["kept"]) == keep and got["left"] == 0, got        # all freed by the end of the step
        # block units: the root's (embeddings, ln_f, tied head: index 0) and the last block's; module units: the
        # tied wte (index 0, freed last after the head) and ln_f (the last unit)
        assert got["kept"] == sorted([0, got["n"] - 1][:keep]), got["kept"]
        saved = (N - 1) / N * sum(got["sizes"][i] for i in got["kept"])
        assert base["calls"] * m - got["calls"] == keep * m, (case, got["calls"])
        assert base["wire"] * m - got["wire"] == pytest.approx(saved * m), (case, got["wire"])
        assert got["peak"] == base["peak"], (case, got["peak"], base["peak"])   # k ≤ 2 adds no peak
        for r in res:
            assert r[case]["calls"] == got["calls"]


def test_keep_rejects_a_negative_count():
    with pytest.raises(ConfigError, match="zero.keep_after_forward=-1 must be >= 0"):
        load_config(os.path.join(ROOT, "configs/gpt_dp2.yaml"),
                    ["zero.stage=3", "zero.keep_after_forward=-1"]).validate(2)
    with pytest.raises(ValueError, match="keep=-1 must be >= 0"):
        Stage3Params(None, [], {}, None, keep=-1)
    assert ZeroConfig().keep_after_forward == 2
