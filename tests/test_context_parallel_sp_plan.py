"""The planner at context parallelism × tensor parallelism with sequence parallel (parallel/planning/context.py;
the cp shard of s/cp tokens split again over tp between the tp regions): model states, every collective and the
peak of live bytes against measured runs of the planner tests' GPT at cp2 × tp2 + SP (world 4, slow), and
``launch.simulate``'s meta step at pp2 × cp2 × tp2 + SP (world 8, slow). Default: no ranks — the activations
at cp2 × tp2 + SP are one process's at s/cp with tp2 + SP, and cp only divides the SP traffic's sequence.
Measured when this was written: states and every axis equal (ring, and Ulysses at ZeRO-1); peaks within
1.0–1.9 % (ring, Ulysses, ring with full recompute); tp's all-gathers of the learned position embedding's
output are (b, s/cp, h) under cp (its ids are per sequence), not (s, h)."""
import dataclasses
import os

import pytest
from harness import run_ranks
from planner_match import assert_comm_equal, assert_states_equal
from test_context_parallel_plan import LAYOUTS, G, _layout, _measured, _peak, _run

from parallel.planning.planner import ModelSpec, TrainSpec, predict

SP = LAYOUTS["sp"]


def test_planner_cp_sp_activations_are_one_process_at_the_shard():
    small = ModelSpec(n_layer=4, hidden=32, heads=4, vocab=64, seq=32)
    one = predict(small, _layout({"cp": 1, "tp": 2, "sp": True}), TrainSpec(G))
    for algorithm, extra in (("ring", 0), ("ulysses", 4 * (2 * 32 * 32 * 4 // 2 + 2 * 64 * 8))):
        lay = {"cp": 2, "tp": 2, "sp": True, "algorithm": algorithm}
        both = predict(dataclasses.replace(small, seq=64), _layout(lay), TrainSpec(G))
        assert both.memory[0]["activations"] == one.memory[0]["activations"] + extra, algorithm
        assert set(both.comm[0]) == {"cp", "dp_cp", "tp"}
        for op in ("all_gather", "reduce_scatter"):        # SP's collectives over the s/cp shard = s/cp alone's
            got, want = both.comm[0]["tp"][op], one.comm[0]["tp"][op]
            pos = (op == "all_gather") * 4 * (2 - 1) * 32 * 32 * 4       # m · the (b, s/cp, h) position output
            assert (got["calls"], got["payload_bytes"]) == (want["calls"], want["payload_bytes"] + pos), op


@pytest.mark.slow
def test_planner_cp_sp_states_and_bytes_equal_measured(tmp_path):
    run_ranks(_run, 4, str(tmp_path), "sp", timeout=400)
    for name, lay in SP:
        pred = predict(ModelSpec(n_layer=4, hidden=32, heads=4, vocab=64, seq=16), _layout(lay), TrainSpec(G))
        ranks = _measured(os.path.join(tmp_path, name.replace(" ", "_")))
        assert len(ranks) == 4
        for r in ranks:
            assert_states_equal(f"{name} rank {r['rank']}", r["model_state_bytes"], pred.memory[r["rank"]])
            assert {"cp", "dp_cp", "tp"} <= set(r["comm"]) and r["comm"]["tp"]["reduce_scatter"]["calls"] > 0
            assert_comm_equal(f"{name} rank {r['rank']}", r["comm"], pred.comm[r["rank"]])


def _peak_sp(rank, world, algorithm, policy):
    return _peak(rank, world, algorithm, ["parallel.tp=2", "parallel.sequence_parallel=true",
                                          f"activation_checkpointing.policy={policy}"], dict(cp=2, tp=2))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,policy", [("ring", "none"), ("ulysses", "none"), ("ring", "full")])
def test_planner_cp_sp_peak_within_10_percent(algorithm, policy):
    got = run_ranks(_peak_sp, 4, algorithm, policy, timeout=300)
    want = predict(ModelSpec(4, 32, 4, 64, 32), _layout({"cp": 2, "tp": 2, "sp": True, "algorithm": algorithm}),
                   TrainSpec(G, device="cpu", activation=policy)).memory
    for r, peak in enumerate(got):
        assert abs(want[r]["peak"] / peak - 1) <= 0.10, (algorithm, policy, r, want[r]["peak"], peak)


LLAMA = ["model.factory=examples.hf_causal_lm:llama_tiny", "model.kwargs={}", "data.kwargs.seq_len=64",
         "activation_checkpointing.policy=full", "precision=bf16"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "llama"])
@pytest.mark.parametrize("algorithm", ["ring", "ulysses"])
def test_simulate_pp2_cp2_tp2_sp_equals_the_planner(algorithm, model):
    """The quickstart at pp2 × cp2 × tp2 + SP (GPT: Megatron layout, ZeRO-1; a tiny transformers Llama: region
    layout, full recompute, bf16), ranks 0 and 7 (both ends of pp, cp and tp) on meta."""
    from launch.simulate import simulate_rank
    from parallel.config import load_config
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.yaml"),
                      ["parallel.cp=2", "parallel.dp=1", "parallel.sequence_parallel=true",
                       f"parallel.cp_algorithm={algorithm}", "zero.stage=1"] + (LLAMA if model == "llama" else []))
    for rank in (0, 7):
        r = simulate_rank(cfg, 8, rank)
        assert r["equal"] and r["comm_diff"] == [], (rank, r["comm_diff"])
        assert {"cp", "dp_cp", "tp", "pp"} <= set(r["comm"]), r["comm"]
