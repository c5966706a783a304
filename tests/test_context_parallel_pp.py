"""Context parallelism across pipeline stages (issue 23): each stage's activations on the pp wire are the
sequence shard (b, s/cp, h), each stage's attention runs ring or Ulysses on its cp group, and training
reproduces one process to 1e-5 (fp32).

Default (world 4 = pp2 × cp2, GPT, 1F1B): ring (Ulysses: slow, suite budget); the cp bytes = the per-call theory × the
stage's layers × micro-batches × steps, and the pp bytes = one (b, s/cp, h) fp32 tensor per micro-batch
each way. Slow: zero-bubble (ZB-H1: the ring's backward runs in I, and in W on stage 0), full activation
checkpointing (the recompute inside a backward needs the right micro-batch's documents), the HF Llama, and
cp2 × tp2 with sequence parallel.
"""
import pytest
from engine_cases import config, train
from harness import run_ranks
from reference import assert_close_curve, reference_losses

from parallel.context_parallel import ring_wire_bytes, ulysses_wire_bytes

SMALL = ["train.steps=2", "data.micro_batch_size=2"]
B, S, H, HEADS = 2, 16, 32, 4                          # micro-batch, sequence, hidden, heads (engine_cases GPT)


def _train_cp_pp(rank, world, model, overrides):
    losses, engine = train(rank, world, model, overrides)
    st = getattr(engine.stages[0], "stage_info", None)
    stats = engine.mesh.stats
    return losses, st and st.blocks, stats.total("cp"), stats.total("pp", "send"), stats.total("tp", "all_gather")


def _run(model, algorithm, extra=(), steps=SMALL, timeout=300):
    lay = ["parallel.pp=2", "parallel.cp=2", f"parallel.cp_algorithm={algorithm}"] + list(extra)
    res = run_ranks(_train_cp_pp, 4, model, lay + steps, timeout=timeout)
    want = reference_losses(config(model, steps))
    for losses, *_ in res:
        assert_close_curve(losses, want, 1e-5, f"{model} pp2×cp2 {algorithm} {extra}")
    return res


@pytest.mark.parametrize("algorithm", ["ring", pytest.param("ulysses", marks=pytest.mark.slow)])
def test_gpt_pp2_cp2_1f1b_trains_like_one_process(algorithm):
    res = _run("gpt", algorithm, ["parallel.pp_schedule=1f1b"])
    per_call = (ring_wire_bytes(B, S, HEADS, H // HEADS, 2) if algorithm == "ring" else
                ulysses_wire_bytes(B, S, HEADS, HEADS, H // HEADS, 2))
    m, steps = 8 // B, 2
    layers = []
    for _losses, (a, b), cp_bytes, pp_bytes, _ in res:
        layers.append(b - a)
        assert cp_bytes == steps * m * (b - a) * (per_call["forward"] + per_call["backward"])
        assert pp_bytes == steps * m * B * (S // 2) * H * 4        # the sequence shard, one way per micro-batch
    assert sum(layers) == 2 * 4 and min(layers) > 0              # 4 blocks over 2 stages, seen by both cp ranks


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ring", "ulysses"])
@pytest.mark.parametrize("extra", [("parallel.pp_schedule=zero_bubble",),
                                   ("parallel.pp_schedule=1f1b", "activation_checkpointing.policy=full"),
                                   ("parallel.pp_schedule=zero_bubble", "zero.stage=1"),
                                   ("parallel.pp_schedule=interleaved", "parallel.pp_virtual_stages=2")])
def test_gpt_pp2_cp2_more_schedules(algorithm, extra):
    _run("gpt", algorithm, extra)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ring", "ulysses"])
def test_llama_pp2_cp2_trains_like_one_process(algorithm):
    _run("llama", algorithm, ["parallel.pp_schedule=1f1b"], ["train.steps=3"], timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "llama"])
@pytest.mark.parametrize("algorithm", ["ring", "ulysses"])
def test_cp2_tp2_sequence_parallel(model, algorithm):
    """cp × SP: the cp shard (b, s/cp, h) is split again over tp between the tp regions; attention sees the
    whole shard (SP's all-gather) with h/tp heads and runs the cp algorithm on its cp group."""
    lay = ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true", f"parallel.cp_algorithm={algorithm}"]
    res = run_ranks(_train_cp_pp, 4, model, lay + ["train.steps=3"], timeout=300)
    want = reference_losses(config(model, ["train.steps=3"]))
    for losses, _blocks, cp_bytes, _pp, sp_gathers in res:
        assert_close_curve(losses, want, 1e-5, f"{model} cp2×tp2 SP {algorithm}")
        assert cp_bytes > 0 and sp_gathers > 0             # both really ran


@pytest.mark.slow
def test_gpt_pp2_cp2_tp2_sequence_parallel():
    """pp2 × cp2 × tp2 with sequence parallel (world 8): stage 1's stand-in ids span the cp shard (its position
    ids are (b, s/cp), the received activation s/(cp·tp) positions; before, stage 1 crashed in the stand-in
    embedding, (b, s/(cp·tp), h) + (b, s/cp, h), on these ranks and in launch.simulate) and training reproduces
    one process."""
    lay = ["parallel.pp=2", "parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
           "parallel.pp_schedule=1f1b"]
    res = run_ranks(_train_cp_pp, 8, "gpt", lay + SMALL, timeout=600)
    want = reference_losses(config("gpt", SMALL))
    for losses, _blocks, cp_bytes, pp_bytes, sp_gathers in res:
        assert_close_curve(losses, want, 1e-5, "gpt pp2×cp2×tp2 SP ring")
        assert cp_bytes > 0 and pp_bytes > 0 and sp_gathers > 0
