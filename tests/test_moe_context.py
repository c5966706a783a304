"""Expert parallelism × context parallelism (parallel/moe/sequence.py; ep carved from dp×cp): the MoE GPT at
cp2×ep2 and dp2×cp2×ep2/ep4, ring and Ulysses, capacity dropping on and off, against one process over the
whole sequences (fp32, 1e-5): losses, gradient norms, and the exact per-expert loads and dropped counts."""
import moe_cases
import pytest
import torch
from harness import run_ranks
from moe_cases import MOE, build, dataset, moe_config, train_counted

from parallel.config import ConfigError
from parallel.moe import MoE, moe_counters, moe_layers
from parallel.moe.groups import ep_layout

RTOL = 1e-5


def cp_config(dp, cp, ep, stage, cf, algorithm, world=None, **kw):
    cfg = moe_config(dp=dp, ep=ep, stage=stage, cf=cf, **kw)
    cfg.parallel.cp, cfg.parallel.cp_algorithm = cp, algorithm
    return cfg.validate(world) if world else cfg


def reference(cfg):
    """moe_cases.reference_moe (one process, chunks cut as the engine cuts them, whole sequences) and the
    counters of its MoE layers over the run."""
    models, real = [], moe_cases.build
    moe_cases.build = lambda c: models.append(real(c)) or models[-1]
    try:
        losses, norms = moe_cases.reference_moe(cfg)
    finally:
        moe_cases.build = real
    return losses, norms, moe_counters(moe_layers(models[0]))


def _body(rank, world, runs, steps=4, pp=1):
    from parallel.engine import parallelize
    out = []
    for dp, cp, ep, stage, cf, algorithm in runs:
        cfg = cp_config(dp, cp, ep, stage, cf, algorithm, world=world, steps=steps, pp=pp)
        model = build(cfg)
        full_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        eng = parallelize(model, cfg)
        losses, norms, diff = train_counted(eng, cfg, dataset(cfg))
        ex = [b for b in eng.zero._all if b.group is not None]
        out.append(dict(ref=reference(cfg) if rank == 0 else None, losses=losses, norms=norms,
                        full_expert=full_expert, expert_numel=sum(b.numel for b in ex),
                        expert_master=sum(b.master.numel() for b in ex), edp=eng.mesh.size("edp"),
                        ep_ranks=eng.mesh.group("ep").ranks, a2a=diff.get("ep", {}).get("all_to_all"),
                        cp_calls=sum(o["calls"] for o in diff.get("cp", {}).values()),
                        moe=moe_counters(eng.moe, eng.dp_cp), micro=cfg.micro_batches, pp=pp))
        eng.close()
    return out


def _close(got, want, what):
    assert len(got) == len(want) and all(abs(g - w) <= RTOL * abs(w) for g, w in zip(got, want)), (what, got, want)


def _check(res, runs):
    for i, (dp, cp, ep, stage, cf, algorithm) in enumerate(runs):
        what = f"dp={dp} cp={cp} ep={ep} stage={stage} cf={cf} {algorithm}"
        ref, ref_norms, ref_moe = res[0][i]["ref"]
        for got in (r[i] for r in res):
            _close(got["losses"], ref, what)
            _close(got["norms"], ref_norms, what + " grad norm")
            assert got["cp_calls"] > 0, what                                 # the attention did run over cp
            if ep == 1:                                 # experts are ordinary parameters, no token exchange
                assert got["a2a"] is None and got["expert_numel"] == 0, what
                continue
            assert got["expert_numel"] * ep * got["pp"] == got["full_expert"], what    # E/ep experts per rank
            assert got["edp"] == dp * cp // ep, what
            if stage > 0:
                assert got["expert_master"] == -(-got["expert_numel"] // got["edp"]), what
            a = got["a2a"]                              # dispatch + combine, forward + backward, per layer and micro
            assert a["calls"] == 4 * MOE["n_layer"] // got["pp"] * got["micro"] * len(ref), what
            assert a["wire_bytes"] == a["payload_bytes"] * (ep - 1) / ep, what
        m = res[0][i]["moe"]                         # the run's counters, summed over dp×cp = one process's
        if res[0][i]["pp"] > 1:                      # rank 0 holds the first stage's layer: its load only
            assert m["expert_load"] == ref_moe["expert_load"][:1], what
            continue
        assert m["expert_load"] == ref_moe["expert_load"], what
        assert m["dropped_tokens"] == ref_moe["dropped_tokens"] and (m["dropped_tokens"] > 0) == (cf is not None), what
        assert abs(m["aux_loss"] - ref_moe["aux_loss"]) <= RTOL * ref_moe["aux_loss"], what


# (dp, cp, ep, ZeRO stage, capacity factor (None: dropless), cp algorithm)
FAST = [(1, 2, 2, 0, 1.0, "ring"), (1, 2, 2, 3, None, "ulysses")]
SLOW2 = [(1, 2, 2, 2, 1.0, "ulysses"), (1, 2, 2, 1, None, "ring"), (1, 2, 1, 0, 0.75, "ring")]
SLOW4 = [(2, 2, 2, 0, 1.0, "ring"), (2, 2, 2, 1, None, "ulysses"), (2, 2, 2, 3, 1.0, "ulysses"),
         (2, 2, 2, 2, None, "ring"), (2, 2, 4, 2, 1.0, "ring"), (2, 2, 4, 3, None, "ulysses"),
         (1, 4, 2, 1, 1.0, "ring"), (1, 4, 4, 0, 1.0, "ulysses")]


def test_cp2_ep2_reproduces_one_process():
    _check(run_ranks(_body, 2, FAST, steps=2), FAST)


@pytest.mark.slow
def test_cp2_ep_more_cases_reproduce_one_process():
    """Also cp2 with ep=1: the MoE layer's drops and aux loss over the whole sequence without expert parallelism."""
    _check(run_ranks(_body, 2, SLOW2), SLOW2)


@pytest.mark.slow
def test_dp2_cp2_ep2_ep4_and_cp4_reproduce_one_process():
    _check(run_ranks(_body, 4, SLOW4, timeout=900), SLOW4)


def test_groups_layout_and_errors():
    eps, edps = ep_layout(pp=1, dp=2 * 2, tp=1, ep=2)                   # dp2×cp2: index dp·2 + cp
    assert eps == [(0, 1), (2, 3)] and edps == [(0, 2), (1, 3)]           # ep = the cp pairs, edp = dp pairs
    with pytest.raises(ConfigError, match=r"divisor of parallel.dp·cp=4"):
        cp_config(2, 2, 3, 0, 1.0, "ring", world=4)
    assert cp_config(1, 2, 2, 0, 1.0, "ring", world=2).parallel.ep == 2
    from launch.dry_run import describe
    text = describe(cp_config(2, 2, 2, 0, 1.0, "ring"))
    assert "ep groups:  [[0, 1], [2, 3]]" in text and "edp groups: [[0, 2], [1, 3]]" in text, text


def test_layer_refuses_inputs_without_a_sequence_dim_and_is_local_outside_a_cp_step():
    from parallel.comm import Group
    from parallel.context_parallel import ContextParallel
    layer = MoE(8, 16, 4, 2)
    layer.seq_group = Group(None, "cp", (0, 1), 0)           # no process group: a collective would fail
    x = torch.randn(2, 6, 8)
    want = MoE(8, 16, 4, 2)
    want.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x), want(x))                     # outside a cp step: whole sequences, alone
    with ContextParallel(layer.seq_group).active(), pytest.raises(ValueError, match="needs \\(batch, sequence"):
        layer(torch.randn(6, 8))


PP2 = [(1, 2, 2, 1, None, "ring"), (1, 2, 2, 0, 1.0, "ulysses")]


@pytest.mark.slow
def test_pp2_cp2_ep2_reproduces_one_process():
    """pp2 × cp2 with ep2 drawn from the cp pair of each stage, dropless and with capacity dropping."""
    _check(run_ranks(_body, 4, PP2, pp=2, timeout=900), PP2)


def _hf_body(rank, world, model_type, router_logits):
    from moe_cases import hf_config

    from parallel.data import rank_batch
    from parallel.engine import parallelize
    cfg = hf_config(model_type, dp=1, ep=2, stage=1, steps=3)
    cfg.parallel.cp, cfg.loss = 2, "cross_entropy"
    cfg.model.kwargs["output_router_logits"] = router_logits
    cfg = cfg.validate(world)
    try:
        eng = parallelize(build(cfg), cfg)
    except ConfigError as e:
        return str(e)
    data = dataset(cfg)
    losses = [eng.train_step(rank_batch(data, t, cfg.data.global_batch_size, 1, 0)) for t in range(3)]
    eng.close()
    return losses, (moe_cases.reference_moe(cfg)[0] if rank == 0 else None)


@pytest.mark.slow
def test_hf_moe_cp2_ep2_dropless_and_router_loss_refused():
    """A transformers Mixtral's experts split over ep2 = the cp pair: dropless routing is per token, exact;
    its own load-balancing loss (output_router_logits) over a shard is not the sequence's: refused."""
    pytest.importorskip("transformers")
    res = run_ranks(_hf_body, 2, "mixtral", False)
    for losses, _ in res:
        _close(losses, res[0][1], "mixtral cp2 ep2")
    msgs = run_ranks(_hf_body, 2, "mixtral", True)
    assert all("output_router_logits=True" in m and "parallel.cp=1" in m for m in msgs), msgs


def _chain(rank, world, root, legs):
    """Each leg (dp, cp, ep, ZeRO stage, algorithm) resumes from the newest checkpoint under ``root``, trains one
    step and saves; returns (losses, norms) per leg and, on rank 0, the one-process reference."""
    from parallel.checkpoint import latest, step_dir
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    losses, norms = [], []
    for dp, cp, ep, stage, algorithm in legs:
        cfg = cp_config(dp, cp, ep, stage, 1.0, algorithm, world=world)
        eng = parallelize(build(cfg), cfg)
        if latest(root):
            eng.load(latest(root))
        t = eng.step_count
        losses.append(eng.train_step(rank_batch(dataset(cfg), t, cfg.data.global_batch_size, dp, eng.mesh.coord["dp"])))
        norms.append(eng.last_result.grad_norm)
        eng.save(step_dir(root, eng.step_count))
        eng.close()
    return losses, norms, (moe_cases.reference_moe(moe_config(steps=len(legs))) if rank == 0 else None)


@pytest.mark.slow
def test_checkpoint_cp2_ep2_resumes_at_dp2_ep2_and_cp2_ep1(tmp_path):
    """Saved at cp2×ep2 ZeRO-1, resumed at dp2×ep2 ZeRO-2, then cp2 ep1 ZeRO-3 (Ulysses): the one-process curve."""
    legs = [(1, 2, 2, 1, "ring"), (2, 1, 2, 2, "ring"), (1, 2, 1, 3, "ulysses")]
    res = run_ranks(_chain, 2, str(tmp_path / "ck"), legs)
    ref_losses, ref_norms = res[0][2]
    for losses, norms, _ in res:
        _close(losses, ref_losses, "cp×ep checkpoint chain")
        _close(norms, ref_norms, "cp×ep checkpoint chain grad norm")


def test_sequence_parallel_with_cp_refused():
    from parallel.comm import Group
    from parallel.moe import apply_expert_parallel
    model = build(moe_config())
    with pytest.raises(ValueError, match="sequence_parallel=false"):
        apply_expert_parallel(model, Group(None, "ep", (0,), 0), Group(None, "cp", (0, 1), 0), True)
