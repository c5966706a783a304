"""Expert tensor parallelism (parallel/moe/tp.py): every expert's matrices split over tp, alone and with ep,
for our MoE layer and transformers MoE models, against one process (fp32, 1e-5 in losses and grad norms);
per-rank expert elements = 1/(ep·tp) of W1/W2 (gate/up/down) plus the whole b2 slice; tp all-reduce counts."""
import pytest
import torch
from harness import run_ranks
from moe_cases import build, dataset, hf_config, moe_config, reference_moe
from planner_match import assert_comm_equal, assert_states_equal

from parallel.config import ConfigError

RTOL = 1e-5


def _close(got, want, what):
    assert len(got) == len(want) and all(abs(g - w) <= RTOL * abs(w) for g, w in zip(got, want)), (what, got, want)


def _expert_elems(module, hf: bool) -> tuple[int, int]:
    """(split expert elements, unsplit expert elements (b2)) of a module's expert parameters."""
    split = whole = 0
    for n, p in module.named_parameters():
        if ".experts." not in n:
            continue
        if n.endswith("b2"):
            whole += p.numel()
        else:
            split += p.numel()
    return split, whole


def _body(rank, world, runs):
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    from parallel.parameters import param_info
    out = []
    for kind, dp, ep, tp, pp, stage, cf in runs:
        if kind == "gpt":
            cfg = moe_config(dp=dp, ep=ep, stage=stage, cf=cf, world=world, pp=pp, tp=tp)
        else:
            cfg = hf_config(kind, dp=dp, ep=ep, stage=stage, world=world, tp=tp)
            cfg.parallel.pp = pp
        ref = reference_moe(cfg) if rank == 0 else None
        model = build(cfg)
        full_split, full_whole = _expert_elems(model, kind != "gpt")
        eng = parallelize(model, cfg)
        mine_split, mine_whole = _expert_elems(eng.module, kind != "gpt") if stage < 3 else (None, None)
        tp_flag = all(param_info(p).tp_split for n, p in eng.module.named_parameters()
                      if ".experts." in n and not n.endswith("b2"))
        data = dataset(cfg)
        before = eng.mesh.stats.snapshot()
        losses, norms = [], []
        for t in range(cfg.train.steps):
            losses.append(eng.train_step(rank_batch(data, t, cfg.data.global_batch_size, dp, eng.mesh.coord["dp"])))
            norms.append(eng.last_result.grad_norm)
        comm = {a: o for a, o in eng.mesh.stats.diff(eng.mesh.stats.snapshot(), before).items()
                if not a.startswith("control:")}
        ex = [b for b in eng.zero._all if b.group is not None]
        out.append(dict(ref=ref, losses=losses, norms=norms, full=(full_split, full_whole),
                        mine=(mine_split, mine_whole), tp_flag=tp_flag, comm=comm, states=eng.model_state_bytes(),
                        expert_numel=sum(b.numel for b in ex), micro=cfg.micro_batches, steps=cfg.train.steps))
        eng.close()
    return out


def _check(res, runs):
    for i, (kind, dp, ep, tp, pp, stage, cf) in enumerate(runs):
        what = f"{kind} dp={dp} ep={ep} tp={tp} pp={pp} stage={stage} cf={cf}"
        ref, ref_norms = res[0][i]["ref"]
        for r in res:
            got = r[i]
            _close(got["losses"], ref, what)
            _close(got["norms"], ref_norms, what + " grad norm")
            assert got["tp_flag"], what
            full_split, full_whole = got["full"]
            if stage < 3:        # per-rank expert elements: W1/W2 (gate/up/down) 1/(ep·tp), b2 1/ep
                assert got["mine"][0] * ep * tp * pp == full_split, (what, got["mine"], got["full"])
                assert got["mine"][1] * ep * pp == full_whole, (what, got["mine"], got["full"])
            if ep > 1:           # the expert buckets hold exactly this rank's expert slices
                assert got["expert_numel"] * ep * pp * tp == full_split + full_whole * tp, what
            if kind == "gpt" and cf is not None:      # the planner: states and every axis's traffic, exactly
                pred = _predict(dict(dp=dp, ep=ep, tp=tp, pp=pp, stage=stage, cf=cf))
                rank = res.index(r)
                assert_states_equal(what, got["states"], pred.memory[rank])
                per_step = {a: {op: {k: v * got["steps"] for k, v in c.items()} for op, c in ops.items()}
                            for a, ops in pred.comm[rank].items()}
                assert_comm_equal(what, got["comm"], per_step)
                assert got["comm"]["tp"]["all_reduce"]["calls"] > 0


def _predict(kw):
    from launch.dry_run import _meta_model, planner_inputs
    from parallel.planning.planner import predict
    cfg = moe_config(**kw)
    return predict(*planner_inputs(cfg, _meta_model(cfg), device="cpu"))


# (kind, dp, ep, tp, pp, ZeRO stage, capacity factor)
FAST = [("gpt", 1, 1, 2, 1, 1, 1.0)]


def test_tp2_experts_reproduce_one_process():
    res = run_ranks(_body, 2, FAST)
    _check(res, FAST)
