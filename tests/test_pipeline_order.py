"""Pipeline runtime on gloo CPU ranks: the V schedules (ZB-V, DualPipeV), ZB-H1 with the real I/W
split, and order-matched messages (every tag 0, as NCCL ignores tags).

The small GPT (hidden 32, vocab 64) split into S stages; 2 steps of SGD per schedule with m
micro-batches of BATCH/m sequences, against the same seeded model on one process (mean loss over
the global batch). Asserted, fp32:
* step-0 gradients of every parameter to 1e-5 relative and both losses to 1e-5;
* with every tag forced to 0 (gloo then matches by order only) the numbers are bitwise those of
  the tagged run;
* the messages each rank issued (``comm_log``) are :func:`issue_order`'s, and per rank pair the
  j-th send is the j-th receive (checked across the ranks' logs);
* step 1 issues its messages in batch_isend_irecv groups (the executor's NCCL path);
* one 80-byte header per (send|recv, activation, src stage, dst stage) in step 0 (the micro-batches
  share one shape), none for a gradient (its activation's shape is known to both ends), none in step 1;
* ZB-H1 / ZB-V: the executor held captured δ's between I and W (bytes > 0) on every rank with an
  input gradient, none on a rank whose only stage is stage 0 (no input gradient: W = full B).
"""
import pytest
import torch
from harness import run_ranks
from test_pipeline_runtime import BATCH, SEQ, _batch
from test_pipeline_runtime import _reference as _runtime_reference


def _reference(n_layer, data, steps):
    """The one-process GPT run of tests/test_pipeline_runtime.py (SGD, whole batch, step-0 gradients)."""
    return _runtime_reference("gpt", n_layer, "sgd", data, steps)


def _train(rank, world, cases, steps=2):
    from test_pipeline_split import build

    from examples.gpt import random_tokens
    from parallel.comm import CommStats
    from parallel.mesh import Mesh
    from parallel.pipeline.p2p_order import issue_order
    from parallel.pipeline.runtime import PipelineExecutor, microbatches
    from parallel.pipeline.schedules import get_schedule
    from parallel.pipeline.schedules_v import split_model_v
    from parallel.pipeline.split import split_model, sync_tied_grads
    mesh = Mesh(pp=world)
    group = mesh.group("pp")
    data = random_tokens(n=2 * BATCH, seq_len=SEQ, vocab_size=64, seed=1)
    out = {}
    for name, m, tags in cases:
        sched = get_schedule(name, world, m, 2 if name == "interleaved" else None)
        n_layer = sched.n_stages
        ref_losses, ref_grads = _reference(n_layer, data, steps)
        torch.manual_seed(0)
        model = build("gpt", n_layer)
        if sched.placement == "v":
            stages = split_model_v(model, rank, world)
        else:
            stages = split_model(model, rank, world, sched.v)
        plan = stages[0].stage_info.plan
        tie_of = {post: pre for pre, post in plan.tied}
        named = [(n, p) for st in stages for n, p in st.named_parameters()]
        opt = torch.optim.SGD([p for _, p in named], lr=0.3)
        ex = PipelineExecutor(stages, sched, group, tags=tags is True,      # "dirs": tag 0 + p2p groups
                              p2p_groups=mesh.pp_p2p_groups() if tags == "dirs" else None)
        r = {"losses": [], "meta": []}
        for t in range(steps):
            x, y = _batch(data, t)
            opt.zero_grad()
            before = mesh.stats.snapshot()
            loss = ex.run(microbatches(x, y, m))
            pp = CommStats.diff(mesh.stats.snapshot(), before).get("pp", {})
            r["meta"].append(sum(pp.get(op, {}).get("meta_bytes", 0) for op in ("send", "recv")))
            sync_tied_grads(stages, group)
            if t == 0:
                r["grads"] = {n: p.grad.clone() for n, p in named}
                r["grad_err"] = max(((p.grad - ref_grads[tie_of.get(n, n)]).norm()
                                     / ref_grads[tie_of.get(n, n)].norm()).item() for n, p in named)
            opt.step()
            r["losses"].append(loss)
        r["ref"] = ref_losses
        r["log_ok"] = ex.comm_log == issue_order(sched, rank)
        r["log"] = ex.comm_log
        r["captured"] = ex.captured_bytes_peak
        r["batched"] = ex.batched
        r["stages"] = sched.stages_of(rank)
        out[(name, m, tags)] = r
    return out


def _check(res, world, cases):
    for case in cases:
        name = case[0]
        last = next(r for r in range(world) if 2 * world - 1 in res[r][case]["stages"]
                    or (world - 1) in res[r][case]["stages"] and case[0] not in ("zb_v", "dualpipe_v"))
        got, want = res[last][case]["losses"], res[last][case]["ref"]
        assert got == pytest.approx(want, rel=1e-5), f"{case}: {got} vs {want}"
        for rank in range(world):
            r = res[rank][case]
            assert r["grad_err"] <= 1e-5, f"{case} rank {rank}: grad rel err {r['grad_err']}"
            assert r["log_ok"], f"{case} rank {rank}: messages issued out of issue_order"
            assert r["batched"] > 0                # step 1 went through batch_isend_irecv groups
            kinds = {(op, k[0], k[2], k[3]) for op, _, k in r["log"] if k[0] == "act"}   # one each, step 0 only
            assert r["meta"] == [80 * len(kinds), 0], (case, rank, r["meta"])
            if name in ("zero_bubble", "zb_v"):
                assert (r["captured"] > 0) == (r["stages"] != [0]), (case, rank, r["captured"])
            for peer in range(world):          # the j-th send a -> b is the j-th receive of b from a
                sent = [k for op, q, k in r["log"] if op == "send" and q == peer]
                got = [k for op, q, k in res[peer][case]["log"] if op == "recv" and q == rank]
                assert sent == got, (case, rank, peer)
        if case[2] is not True:                 # tag 0 (and the p2p groups): bitwise the tagged run
            tagged = (case[0], case[1], True)
            if tagged in res[0]:
                for rank in range(world):
                    a, b = res[rank][case], res[rank][tagged]
                    assert a["losses"] == b["losses"]
                    assert all(torch.equal(a["grads"][n], b["grads"][n]) for n in a["grads"])


def test_pp2_zb_v_and_tag_zero():
    cases = [("zb_v", 4, True), ("zb_v", 4, False), ("zb_v", 4, "dirs")]
    _check(run_ranks(_train, 2, cases, timeout=300), 2, cases)


@pytest.mark.slow
def test_pp2_dualpipe_v_and_tag_zero():
    cases = [("dualpipe_v", 4, "dirs"), ("zero_bubble", 2, "dirs"), ("interleaved", 2, "dirs"), ("1f1b", 2, False)]
    _check(run_ranks(_train, 2, cases, timeout=300), 2, cases)


@pytest.mark.slow
def test_pp4_zero_bubble_real_split_and_zb_v():
    cases = [("zero_bubble", 4, True), ("zb_v", 8, "dirs"), ("interleaved", 4, "dirs")]
    _check(run_ranks(_train, 4, cases, timeout=300), 4, cases)


def _engine_losses(rank, world, model, overrides):
    from engine_cases import train
    losses, _ = train(rank, world, model, overrides)
    return (losses,)


@pytest.mark.slow
def test_zero_bubble_real_split_with_zero3_matches_single_process():
    """ZB-H1 at pp2 × dp2 with ZeRO-3 through the engine: the single-process curve. Under ZeRO-3 the
    engine turns the captured split off (split_backward=False: a unit freed after one micro-batch's W
    is not gathered again for the next W, which starts below the module outputs' hooks)."""
    from engine_cases import config, layout
    from reference import assert_close_curve, reference_losses
    steps = ["train.steps=4"]
    want = reference_losses(config("gpt", steps))
    res = run_ranks(_engine_losses, 4, "gpt", layout(2, 1, 2, 3, parallel__pp_schedule="zero_bubble") + steps)
    assert_close_curve(res[0][0], want, 1e-5, "zero_bubble pp2 x dp2 ZeRO-3")
