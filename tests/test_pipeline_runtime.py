"""Pipeline runtime on gloo CPU ranks: every schedule trains the small GPT, LlamaForCausalLM (GQA)
and GPT2LMHeadModel split over pp = 2 and 4 ranks, and must reproduce the one-process run.

Per (pp, model): 20 steps under gpipe, 1f1b, interleaved (v=2) and zero_bubble, m = pp
micro-batches, against the same seeded model trained on one process over the whole global batch
(mean loss), built inside the rank function; the data are two token batches, cycled, so the loss
falls (4.2 → 3.0–3.9). pp=2 uses SGD, pp=4 AdamW. Asserted, fp32:
* the loss curve to 1e-4 relative (measured: ≤ 7e-7);
* every parameter gradient of step 0 to 1e-5 relative, ‖g − g_ref‖ ≤ 1e-5‖g_ref‖ (≤ 4e-7);
* the actions each rank ran equal its schedule, every step;
* the activations a rank holds at once equal the schedule's bound (GPipe m, 1F1B p − rank,
  ZB-H1 ≤ min(p, m));
* each weight gradient is accumulated exactly once per micro-batch (ZB-H1's I/W split too);
* PP bytes per step: b·s·h·4 each way per micro-batch per stage boundary (× v interleaved), per
  rank and in total; the tied-embedding sync moves vocab·h·4 bytes on the two end ranks only;
* tied embeddings bit-identical on the first and last stage after 20 steps.
"""
import pytest
import torch
from harness import run_ranks

from parallel.parameters import param_info

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero_bubble")
BATCH, SEQ, STEPS = 8, 16, 20                 # m = pp micro-batches of BATCH/m sequences


def _batch(data, t):
    """Global batch t: the dataset holds two batches, cycled, so the loss visibly falls."""
    t %= len(data) // BATCH
    xs, ys = zip(*(data[i] for i in range(t * BATCH, (t + 1) * BATCH)))
    return torch.stack(xs), torch.stack(ys)


def _optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.3)
    return torch.optim.AdamW(params, lr=3e-3)


def _reference(family, n_layer, optim, data, steps=STEPS):
    """The one-process run: whole global batch, mean loss, same optimizer."""
    from test_pipeline_split import build

    from parallel.loss import cross_entropy
    torch.manual_seed(0)
    model = build(family, n_layer)
    opt = _optimizer(optim, list(model.parameters()))
    losses, grads = [], None
    for t in range(steps):
        x, y = _batch(data, t)
        opt.zero_grad()
        loss = cross_entropy(model(x), y)
        loss.backward()
        if t == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, grads


def _train(rank, world, family, optim):
    from test_pipeline_split import build

    from examples.gpt import random_tokens
    from parallel.comm import CommStats
    from parallel.mesh import Mesh
    from parallel.pipeline.runtime import PipelineExecutor, microbatches
    from parallel.pipeline.schedules import get_schedule, max_in_flight
    from parallel.pipeline.split import split_model, sync_tied_grads
    mesh = Mesh(pp=world)
    group = mesh.group("pp")
    n_layer = 2 * world                                # pp·v stages need pp·v blocks (v = 2)
    data = random_tokens(n=2 * BATCH, seq_len=SEQ, vocab_size=64, seed=1)
    # Every rank needs step 0's gradients; only the last (it has the loss) the whole curve.
    ref_losses, ref_grads = _reference(family, n_layer, optim, data, STEPS if rank == world - 1 else 1)
    out = {"ref": ref_losses, "ref_names": sorted(ref_grads)}
    M = world
    for name in SCHEDULES:
        v = 2 if name == "interleaved" else 1
        torch.manual_seed(0)
        model = build(family, n_layer)
        stages = split_model(model, rank, world, v)
        plan = stages[0].stage_info.plan
        del model
        tie_of = {post: pre for pre, post in plan.tied}
        named = [(n, p) for st in stages for n, p in st.named_parameters()]
        params = [p for _, p in named]
        accum = {id(p): 0 for p in params}
        for p in params:
            p.register_post_accumulate_grad_hook(lambda q, accum=accum: accum.__setitem__(id(q), accum[id(q)] + 1))
        opt = _optimizer(optim, params)
        sched = get_schedule(name, world, M, v)
        ex = PipelineExecutor(stages, sched, group)
        r = {"losses": [], "executed_ok": [], "pp": [], "accum": set(), "peak": [],
             "bound": max_in_flight(sched, rank), "names": sorted(n for n, _ in named),
             "n_params": sum(p.numel() for p in params),
             "plan_params": sum(plan.stage_params[s] for s in plan.stages_of(rank))}
        for t in range(STEPS):
            x, y = _batch(data, t)
            for p in params:
                p.grad = None
            accum.update({k: 0 for k in accum})
            before = mesh.stats.snapshot()
            loss = ex.run(microbatches(x, y, M))
            r["pp"].append(CommStats.diff(mesh.stats.snapshot(), before).get("pp", {}))
            before = mesh.stats.snapshot()
            sync_tied_grads(stages, group)
            r["tied_bytes"] = CommStats.diff(mesh.stats.snapshot(), before).get("pp_tied", {})
            r["executed_ok"].append(ex.executed == sched.actions[rank])
            r["peak"].append(ex.peak_held)
            r["accum"] |= set(accum.values())
            if t == 0:
                r["grad_err"] = max(((p.grad - ref_grads[tie_of.get(n, n)]).norm()
                                     / ref_grads[tie_of.get(n, n)].norm()).item() for n, p in named)
            opt.step()
            r["losses"].append(loss)
        r["tied"] = {n: p.detach().clone() for n, p in named if param_info(p).tie is not None}
        r["tie_of"] = tie_of
        out[name] = r
    return out


SLOW = pytest.mark.slow                      # llama / gpt2: the slow suite (budget)


@pytest.mark.parametrize("world,family", [(2, "gpt"), (4, "gpt"),
                                          pytest.param(2, "llama", marks=SLOW), pytest.param(4, "llama", marks=SLOW),
                                          pytest.param(2, "gpt2", marks=SLOW), pytest.param(4, "gpt2", marks=SLOW)])
def test_pipeline_matches_single_process(world, family):
    res = run_ranks(_train, world, family, "sgd" if world == 2 else "adamw", timeout=300)
    p = M = world
    act = BATCH // M * SEQ * 32 * 4                         # b·s·h fp32 bytes per micro-batch
    ref = res[p - 1]["ref"]
    for name in SCHEDULES:
        v = 2 if name == "interleaved" else 1
        S = p * v
        last = res[p - 1][name]
        for t, (got, want) in enumerate(zip(last["losses"], ref)):
            assert abs(got - want) <= 1e-4 * abs(want), f"{name} step {t}: {got} vs {want}"
        assert all(res[r][name]["losses"] == [None] * STEPS for r in range(p - 1))
        names = set()
        total = 0
        for rank in range(p):
            r = res[rank][name]
            assert r["grad_err"] <= 1e-5, f"{name} rank {rank}: grad rel err {r['grad_err']}"
            assert all(r["executed_ok"]), f"{name} rank {rank}: actions differ from the schedule"
            assert set(r["peak"]) == {r["bound"]}
            if name == "gpipe":
                assert r["bound"] == M
            if name == "1f1b":
                assert r["bound"] == min(p - rank, M)
            if name == "zero_bubble":
                assert r["bound"] <= min(p, M)
            assert r["accum"] == {M}, f"{name} rank {rank}: grads accumulated {r['accum']} times, want {M}"
            assert r["n_params"] == r["plan_params"]
            names |= {r["tie_of"].get(n, n) for n in r["names"]}
            own = range(rank, S, p)
            sends = M * act * sum((s < S - 1) + (s > 0) for s in own)
            for step in r["pp"]:
                assert step["send"]["payload_bytes"] == step["send"]["wire_bytes"] == sends
                assert step["recv"]["payload_bytes"] == sends
            total += r["pp"][0]["send"]["wire_bytes"]
        assert total == 2 * M * (S - 1) * act                  # each way, per micro-batch, per boundary
        assert names == set(res[0]["ref_names"])               # the stages hold every parameter
        tied = 64 * 32 * 4 if family != "llama" else 0          # vocab·h fp32: the embedding's grad
        for rank in range(p):
            sent = res[rank][name]["tied_bytes"].get("send", {}).get("wire_bytes", 0)
            assert sent == (tied if rank in (0, p - 1) else 0)
        t0, tl = res[0][name]["tied"], res[p - 1][name]["tied"]
        for post, pre in res[p - 1][name]["tie_of"].items():
            assert torch.equal(t0[pre], tl[post]), f"{name}: tied {pre} and {post} diverged"


# ---------------------------------------------------------------------------- one process, p = 1
def _fake_group(p=1):
    from parallel.comm import Group
    return Group(None, "pp", tuple(range(p)), 0)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zero_bubble"])
def test_single_stage_accumulates_the_global_batch_gradient(name):
    """p = 1: the executor's micro-batch accumulation (loss · scale / m, I/W split) reproduces one
    whole-batch backward — values to 1e-5, the loss scale exactly linear — with no messages."""
    from test_pipeline_split import build

    from examples.gpt import random_tokens
    from parallel.pipeline.runtime import PipelineExecutor, microbatches
    from parallel.pipeline.schedules import get_schedule
    from parallel.pipeline.split import split_model
    data = random_tokens(n=BATCH, seq_len=SEQ, vocab_size=64, seed=1)
    _, want = _reference("gpt", 2, "sgd", data, 1)
    x, y = _batch(data, 0)
    torch.manual_seed(0)
    stage, = split_model(build("gpt", 2), 0, 1)
    ex = PipelineExecutor([stage], get_schedule(name, 1, 4), _fake_group(), loss_scale=8.0)
    loss = ex.run(microbatches(x, y, 4))
    assert [a.kind for a in ex.executed] == [a.kind for a in get_schedule(name, 1, 4).actions[0]]
    for n, q in stage.named_parameters():
        assert ((q.grad / 8.0 - want[n]).norm() <= 1e-5 * want[n].norm()), n
    assert loss == pytest.approx(_reference("gpt", 2, "sgd", data, 1)[0][0], rel=1e-6)
    assert all(r.wait_s >= 0 and r.compute_s > 0 for r in ex.records)


def test_executor_errors():
    from test_pipeline_split import build

    from parallel.pipeline.runtime import PipelineExecutor, microbatches
    from parallel.pipeline.schedules import get_schedule
    from parallel.pipeline.split import split_model
    torch.manual_seed(0)
    stage, = split_model(build("gpt", 2), 0, 1)
    with pytest.raises(ValueError, match=r"schedule is for p=2 ranks but the pp group has 1"):
        PipelineExecutor([stage], get_schedule("1f1b", 2, 4), _fake_group())
    with pytest.raises(ValueError, match=r"got 1 stage modules but the schedule runs v=2"):
        PipelineExecutor([stage], get_schedule("interleaved", 2, 4, 2), _fake_group(2))
    ex = PipelineExecutor([stage], get_schedule("1f1b", 1, 4), _fake_group())
    x = torch.zeros(8, SEQ, dtype=torch.long)
    with pytest.raises(ValueError, match=r"built for m=4 micro-batches, run\(\) got 2"):
        ex.run(microbatches(x, x, 2))
    with pytest.raises(ValueError, match=r"3 micro-batches do not divide the batch of 8.*data.micro_batch_size"):
        microbatches(x, x, 3)
