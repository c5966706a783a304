"""The pipeline through the engine (config → split → executor), against one process (fp32, 1e-5).

* ``parallel.pp_schedule: zb_v`` / ``dualpipe_v`` (pp_virtual_stages=2): the engine splits the model
  into 2·pp stages in a V (stages r and 2p−1−r on rank r) and trains it — the single-process loss
  curve; the messages go over the mesh's two direction groups (NCCL-safe, p2p_streams);
* evaluation runs through the executor as a forward-only schedule over the training placement
  (loop and V): the single-process model's loss on the same batch after the same steps;
* composition holes of issue 19: ZB-H1 and ZB-V with tp > 1 (vocab-parallel cross entropy's
  backward runs once: I alone walks the activation path; under ZeRO-3, where W re-walks the graph,
  the loss stage's I is the full B), sequence parallel with pp > 1, interleaved (v = 2) with ZeRO-3
  units=module.
"""
import pytest
import torch
from engine_cases import config, layout
from harness import run_ranks
from reference import assert_close_curve, reference_losses

STEPS = ["train.steps=3"]


EVAL_STEP = 5                   # the eval batch: global batch 5 (dataset positions [40, 48))


def _dataset(cfg):
    from parallel.config import import_object
    return import_object(cfg.data.factory, "data.factory")(**cfg.data.kwargs)


def _train_and_eval(rank, world, model, overrides):
    from engine_cases import train

    from parallel.data import rank_batch
    losses, engine = train(rank, world, model, overrides)
    cfg = config(model, overrides, world)
    batch = rank_batch(_dataset(cfg), EVAL_STEP, cfg.data.global_batch_size, cfg.parallel.dp, engine.mesh.coord["dp"])
    ev = engine.eval_step(batch)
    ex = engine.executor
    return losses, ev, (ex.p2p_groups is not None, ex.schedule.placement, ex.schedule.name)


def _reference(model, overrides):
    from parallel.data import rank_batch
    from parallel.loss import resolve_loss
    cfg = config(model, overrides)
    want, ref = reference_losses(cfg, return_model=True)
    x, y = rank_batch(_dataset(cfg), EVAL_STEP, cfg.data.global_batch_size, 1, 0)
    ref.eval()
    with torch.no_grad():
        ev = resolve_loss(cfg.loss)(ref(x), y).item()
    return want, ev


def _check(res, want, want_eval, what):
    for rank, (losses, ev, _) in enumerate(res):
        assert_close_curve(losses, want, 1e-5, f"{what} rank {rank}")
        assert ev == pytest.approx(want_eval, rel=1e-5), f"{what} rank {rank}: eval {ev} vs {want_eval}"


def test_zb_v_from_config_matches_single_process():
    """pp2 zb_v: 4 stages in a V (rank 0: stages 0 and 3), direction groups, eval through the executor."""
    over = layout(1, 1, 2, 0, parallel__pp_schedule="zb_v", parallel__pp_virtual_stages=2) + STEPS
    want, want_eval = _reference("gpt", over)
    res = run_ranks(_train_and_eval, 2, "gpt", over)
    _check(res, want, want_eval, "pp2 zb_v")
    assert [r[2] for r in res] == [(True, "v", "zb_v")] * 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dualpipe_v", "interleaved", "1f1b"])
def test_v_and_loop_schedules_with_eval(name):
    v = 1 if name == "1f1b" else 2
    over = layout(1, 1, 2, 0, parallel__pp_schedule=name, parallel__pp_virtual_stages=v) + STEPS
    want, want_eval = _reference("gpt", over)
    _check(run_ranks(_train_and_eval, 2, "gpt", over), want, want_eval, f"pp2 {name}")


# ------------------------------------------------------------------------------ composition holes
@pytest.mark.slow
@pytest.mark.parametrize("what,lay", [
    ("zero_bubble pp2 tp2", layout(1, 2, 2, 0, parallel__pp_schedule="zero_bubble")),
    ("zb_v pp2 tp2", layout(1, 2, 2, 0, parallel__pp_schedule="zb_v", parallel__pp_virtual_stages=2)),
    ("zero_bubble pp2 tp2 ZeRO-3 (no I/W split: I = B on the loss stage)",
     layout(1, 2, 2, 3, parallel__pp_schedule="zero_bubble")),
    ("1f1b pp2 tp2 sequence parallel", layout(1, 2, 2, 0, parallel__sequence_parallel="true")),
    ("zero_bubble pp2 tp2 sequence parallel", layout(1, 2, 2, 0, parallel__sequence_parallel="true",
                                                     parallel__pp_schedule="zero_bubble")),
    ("interleaved pp2 dp2 ZeRO-3 units=module", layout(2, 1, 2, 3, parallel__pp_schedule="interleaved",
                                                       parallel__pp_virtual_stages=2)),
])
def test_composition_matches_single_process(what, lay):
    over = lay + STEPS
    want, want_eval = _reference("gpt", over)
    _check(run_ranks(_train_and_eval, 4, "gpt", over, timeout=400), want, want_eval, what)
