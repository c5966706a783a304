"""The planner at cp × ep (parallel/planning/moe.py with ep carved from dp×cp; planning/context.py) against measured
runs of the MoE GPT: per rank, model-state bytes and every collective (dp_cp, edp, ep's norm, cp's ring /
all-to-all) equal to the prediction in calls and bytes; the ep all-to-all's calls equal, its payload — whose
slot count is decided at run time under cp (parallel/moe/sequence.py) — at most the planner's bound."""
import copy

import pytest
from harness import run_ranks
from moe_cases import build, dataset
from planner_match import assert_comm_equal, assert_states_equal, measure_second_step, predict_config
from test_moe_context import cp_config


def _measure(rank, world, runs):
    return [measure_second_step(cp_config(*run, world=world, steps=2), build, dataset) for run in runs]


def _check(results, runs):
    for i, run in enumerate(runs):
        pred, ep = predict_config(cp_config(*run, steps=2)), run[2]
        for rank, res in enumerate(results):
            got, want, tag = copy.deepcopy(res[i]), copy.deepcopy(pred.comm[rank]), f"{run} rank {rank}"
            assert_states_equal(tag, got["states"], pred.memory[rank])
            assert abs(got["peak"] / pred.memory[rank]["peak"] - 1) <= 0.15, (tag, got["peak"], pred.memory[rank])
            a, p = got["comm"]["ep"].pop("all_to_all"), want["ep"].pop("all_to_all")
            assert a["calls"] == p["calls"] and 0 < a["payload_bytes"] <= p["payload_bytes"], (tag, a, p)
            assert a["wire_bytes"] == a["payload_bytes"] * (ep - 1) / ep, tag
            assert_comm_equal(tag, got["comm"], want)
            assert got["comm"]["cp"] and ("edp" in got["comm"]) == (run[0] * run[1] > ep), tag


FAST = [(1, 2, 2, 1, 1.0, "ring")]
SLOW = [(1, 2, 2, 3, None, "ulysses"), (2, 2, 2, 2, 1.0, "ulysses"), (2, 2, 4, 0, None, "ring"),
        (1, 4, 2, 1, 1.0, "ring")]


def test_planner_cp_ep_equals_measured():
    _check(run_ranks(_measure, 2, FAST[:1]), FAST[:1])


@pytest.mark.slow
def test_planner_cp_ep_equals_measured_more():
    two, four = [r for r in SLOW if r[0] * r[1] == 2], [r for r in SLOW if r[0] * r[1] == 4]
    _check(run_ranks(_measure, 2, two), two)
    _check(run_ranks(_measure, 4, four), four)
