"""Fewer blocking control collectives per step (issue 18): the step's global loss rides in ZeRO's gradient-norm
all-reduce (parallel/zero/norm_carry.py, pp = 1, stages ≥ 1), and the scored-token count's all-reduce runs under
the first forward (parallel/batch.py GlobalCount), waited where the first loss reads its weight.

Per step on padded (x, y) batches (−100 targets: the token count matters), counted on each rank by wrapping
torch.distributed's all_reduce / broadcast: blocking calls (``async_op`` False) and control-channel calls
(mesh stats). The losses are bitwise those of the separate blocking calls (the path before: ``zero.fold_loss``
off, the count settled at once), at dp2 ZeRO-0/1/2, cp2 and pp2; a user's own loop (engine(x) / backward / step)
still steps.
"""
import pytest
import torch
from harness import run_ranks
from test_token_weighting import MODEL, PaddedTuples, _cfg

STEPS = 3


def _blocking_calls():
    """Wrap dist.all_reduce / broadcast: a list of (op, numel, async_op) per call, and the undo."""
    import torch.distributed as dist
    calls, keep = [], (dist.all_reduce, dist.broadcast)

    def wrap(name, fn):
        def inner(t, *a, async_op=False, **kw):
            calls.append((name, t.numel(), async_op))
            return fn(t, *a, async_op=async_op, **kw)
        return inner
    dist.all_reduce, dist.broadcast = wrap("all_reduce", keep[0]), wrap("broadcast", keep[1])

    def undo():
        dist.all_reduce, dist.broadcast = keep
    return calls, undo


def _steps(rank, world, layout, stage, before, fp16=False, optimizer=None):
    """Train STEPS steps; per step: (loss as float.hex, blocking calls, control calls, skipped). ``before``: the
    path before the fold (no carry, the token count waited at once). ``fp16``: a loss scale of 2^40, so every
    step's gradient overflows and the update is skipped (the loss is still reported)."""
    from parallel import batch as batches
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    cfg = _cfg(layout, world, zero={"stage": stage}, **({"optimizer": optimizer} if optimizer else {}))
    if fp16:
        cfg.precision, cfg.loss_scale.initial = "fp16", 2.0 ** 40
    p = cfg.parallel
    mesh = Mesh(pp=p.pp, dp=p.dp, tp=1, cp=p.cp)
    torch.manual_seed(0)
    from examples.gpt import build
    engine = parallelize(build(**MODEL["kwargs"]), cfg, mesh)
    if before:                                        # as benchmarks/proto_pair.py's ':sepctl' rows
        engine.zero.fold_loss, micro = False, engine._micro

        def waited(b):
            out = micro(b)
            batches.settle(out)
            return out
        engine._micro = waited
    data, out = PaddedTuples(), []
    try:
        for s in range(STEPS):
            batch = rank_batch(data, s, 8, p.dp, mesh.group("dp").rank)
            if p.cp > 1:                                  # cp refuses ignored targets: the same tokens, all scored
                batch = (batch[0], batch[1].clamp(min=0))
            c0 = mesh.stats.snapshot()
            calls, undo = _blocking_calls()
            try:
                loss = engine.train_step(batch)
            finally:
                undo()
            d = mesh.stats.diff(mesh.stats.snapshot(), c0)
            control = sum(c["calls"] for a, ops in d.items() if a.startswith("control:") for c in ops.values())
            out.append((float(loss).hex(), sum(not a for _, _, a in calls), control, engine.last_result.skipped))
    finally:
        engine.close()
    return out



def _both(rank, world, layout, stage, fp16=False, optimizer=None):
    return _steps(rank, world, layout, stage, True, fp16, optimizer), _steps(rank, world, layout, stage, False, fp16,
                                                                             optimizer)


# after the first step (which also checks buffers, gathers at stage 3, ...): blocking calls and control calls per
# step. dp2 ZeRO-1/2: the norm's all-reduce only (was 3: the token count, the norm, the loss; control 2);
# ZeRO-0: the loss (its norm is local, nothing to ride in; was 2); cp2: the norm (the loss rides in it over dp·cp;
# was 2, no token count: tuples are not weighted under cp); pp2 (dp 1): the pp broadcast of the loss (now before
# the step) and the norm's sum over pp, as before; dp2 × pp2: the broadcast, the norm over dp and over pp (was 4:
# the loss's dp all-reduce after the step; control 3 → 2).
CASES = {"dp2-zero0": ({"dp": 2}, 0, 2, (1, 2)), "dp2-zero1": ({"dp": 2}, 1, 2, (1, 1)),
         "dp2-zero2": ({"dp": 2}, 2, 2, (1, 1)), "cp2-zero1": ({"cp": 2}, 1, 2, (1, 0)),
         "pp2-zero1": ({"pp": 2}, 1, 2, (2, 1)), "dp2pp2-zero1": ({"dp": 2, "pp": 2}, 1, 4, (3, 2))}


@pytest.mark.parametrize("case", list(CASES))
def test_blocking_calls_per_step_and_bitwise_losses(case):
    layout, stage, world, want = CASES[case]
    for before, after in run_ranks(_both, world, layout, stage, timeout=300):
        assert [s[0] for s in after] == [s[0] for s in before], f"{case}: losses differ from the separate calls"
        assert not any(s[3] for s in after)
        for s in after[1:]:
            assert s[1:3] == want, f"{case}: (blocking, control) calls per step {s[1:3]}, expected {want}"


def test_fp16_overflow_skip_reports_the_same_loss():
    """Every step overflows (scale 2^40) and is skipped; the loss, carried in the norm's all-reduce that decided
    the skip, is the one the separate call gave."""
    for before, after in run_ranks(_both, 2, {"dp": 2}, 2, True, timeout=300):
        assert all(s[3] for s in after) and all(s[3] for s in before)
        assert [s[0] for s in after] == [s[0] for s in before]
        assert all(float.fromhex(s[0]) < 10 for s in after)


def test_onebit_compressed_phase_reports_each_steps_loss():
    """1-bit Adam after its warm-up (freeze_step 1) steps without the norm's all-reduce: nothing is carried, the
    engine's own control call reports each step's loss (not the one carried at the warm-up step)."""
    opt = {"name": "onebit_adam", "freeze_step": 1}
    for before, after in run_ranks(_both, 2, {"dp": 2}, 1, False, opt, timeout=300):
        assert [s[0] for s in after] == [s[0] for s in before]
        assert len({s[0] for s in after}) == STEPS
        assert [s[1:3] for s in after[1:]] == [(2, 2)] * (STEPS - 1)     # its local-norm check and the loss


def _own_loop(rank, world):
    """The user's loop (engine(x) / loss / backward / step) at dp2 ZeRO-1: no loss to carry, the step runs."""
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    cfg = _cfg({"dp": 2}, world, zero={"stage": 1})
    torch.manual_seed(0)
    from examples.gpt import build
    engine = parallelize(build(**MODEL["kwargs"]), cfg, Mesh(dp=2))
    x, y = rank_batch(PaddedTuples(), 0, 8, 2, rank)
    engine.zero_grad(1)
    loss = engine.loss(engine(x), y)
    engine.backward(loss)
    res = engine.step()
    before = next(engine.module.parameters()).detach().clone()
    engine.zero_grad(1)
    engine.backward(engine.loss(engine(x), y))
    engine.step()
    moved = not torch.equal(before, next(engine.module.parameters()))
    engine.close()
    return res.skipped, engine.zero.carried_loss, moved


def test_own_loop_steps_without_a_carried_loss():
    for skipped, carried, moved in run_ranks(_own_loop, 2, timeout=300):
        assert not skipped and carried is None and moved
