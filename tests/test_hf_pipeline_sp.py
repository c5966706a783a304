"""A transformers model (tiny Llama: rotary positions, region sequence parallel) through the pipeline and the
recompute — three layouts that crashed before the fixes found by the simulated step (launch.simulate_step):
tp2 × pp2 with sequence parallel (later stages built stand-in ids of s/tp positions: rotary tables of s/tp next
to all-gathered q of s), tp2 with sequence parallel and full recompute (the recompute cut block 0's chunk again),
pp2 in bf16 (fp32 stand-in embeddings on the later stage: fp32 rotary tables, q and k fp32 next to a bf16 v).
Each equals the same model on one process: fp32 to 1e-5, bf16 to the bf16 one-process run's numbers."""
import pytest
from engine_cases import config, layout, train
from harness import run_ranks
from reference import assert_close_curve, reference_losses

STEPS = ["train.steps=3"]


def _losses(rank, world, ov):
    losses, eng = train(rank, world, "llama", ov)
    eng.close()
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("name,world,lay", [
    ("tp2 pp2 sp", 4, layout(1, 2, 2, 0, parallel__sequence_parallel="true")),
    ("tp2 sp full recompute", 2, layout(1, 2, 1, 0, parallel__sequence_parallel="true",
                                        activation_checkpointing__policy="full")),
    ("tp2 pp2 sp full recompute", 4, layout(1, 2, 2, 0, parallel__sequence_parallel="true",
                                            activation_checkpointing__policy="full")),
])
def test_region_sp_layouts_equal_one_process(name, world, lay):
    got = run_ranks(_losses, world, lay + STEPS, timeout=300)[-1]
    assert_close_curve(got, reference_losses(config("llama", STEPS)), 1e-5, name)


@pytest.mark.slow
def test_bf16_pipeline_equals_bf16_one_process():
    bf16 = STEPS + ["precision=bf16"]
    got = run_ranks(_losses, 2, layout(1, 1, 2, 0) + bf16, timeout=300)[-1]
    want = run_ranks(_losses, 1, layout(1, 1, 1, 0) + bf16, timeout=300)[0]
    assert_close_curve(got, want, 1e-5, "bf16 pp2")
