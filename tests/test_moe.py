"""Mixture of Experts (parallel/moe/): the layer against a per-token loop, expert parallelism against
one process (fp32, 1e-5), per-rank expert state, all-to-all bytes, the ep groups and the errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks
from moe_cases import MOE, build, dataset, hf_config, moe_config, reference_moe

from parallel.comm import Group
from parallel.config import ConfigError
from parallel.moe import MoE, apply_expert_parallel, load_balancing_loss, router_z_loss
from parallel.moe.groups import ep_layout

RTOL = 1e-5


def assert_close(got, want, what):
    assert len(got) == len(want) and all(abs(g - w) <= RTOL * abs(w) for g, w in zip(got, want)), (what, got, want)


# --- the layer alone ------------------------------------------------------------------------------

def _loop_reference(layer: MoE, x: torch.Tensor):
    """y_t = Σ_j w_tj · expert_{e_tj}(x_t) token by token, with the capacity rule spelled out
    (first choices of all tokens in token order, then second choices, …)."""
    xt = x.reshape(-1, layer.hidden)
    T, E, k = xt.shape[0], layer.num_experts, layer.top_k
    logits = xt @ layer.router.weight.t()
    probs = logits.softmax(-1)
    w, idx = probs.topk(k, -1)
    w = w / w.sum(-1, keepdim=True)
    C = math.ceil(layer.capacity_factor * T * k / E) if layer.capacity_factor else T * k
    ex = layer.experts
    count, y, dropped = [0] * E, torch.zeros_like(xt), 0
    for j in range(k):
        for t in range(T):
            e = int(idx[t, j])
            if count[e] >= C:
                dropped += 1
                continue
            count[e] += 1
            h = F.gelu(xt[t] @ ex.w1[e] + ex.b1[e])
            y[t] = y[t] + w[t, j] * (h @ ex.w2[e] + ex.b2[e])
    aux = layer.aux_loss_coef * load_balancing_loss(probs, idx, E) + layer.z_loss_coef * router_z_loss(logits)
    return y.view_as(x), aux, dropped


@pytest.mark.parametrize("cf", [0.75, None])
def test_layer_matches_token_loop_and_adds_aux_gradient(cf):
    torch.manual_seed(0)
    layer = MoE(16, 32, num_experts=4, top_k=2, capacity_factor=cf, aux_loss_coef=0.1, z_loss_coef=0.01)
    x = torch.randn(2, 8, 16)
    y = layer(x)
    y.sum().backward()                                   # aux_scale 1: d/d(aux) = 1
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    c = layer.pop_counters()
    layer.zero_grad()
    want, aux, dropped = _loop_reference(layer, x)
    (want.sum() + aux).backward()
    assert torch.allclose(y, want, atol=1e-6)
    assert c["dropped"] == dropped and (dropped > 0) == (cf is not None)
    assert c["assignments"] == 32 and int(c["load"].sum()) == 32
    for n, p in layer.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n


def test_aux_loss_values():
    probs = torch.full((6, 4), 0.25)
    idx = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3], [0, 1], [2, 3]])
    assert load_balancing_loss(probs, idx, 4).item() == pytest.approx(1.0)       # uniform: 1
    skew = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 6)                              # f = P = (.5, .5, 0, 0)
    assert load_balancing_loss(skew, torch.tensor([[0, 1]] * 6), 4).item() == pytest.approx(2.0)
    assert router_z_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4) ** 2)


# --- errors and the layout ------------------------------------------------------------------------

def test_errors_name_the_cause():
    model = build(moe_config())
    with pytest.raises(ValueError, match="do not split over parallel.ep=3"):
        apply_expert_parallel(model, Group(None, "ep", (0, 1, 2), 0))
    with pytest.raises(ValueError, match="no Mixture-of-Experts layers"):
        apply_expert_parallel(torch.nn.Linear(2, 2), Group(None, "ep", (0, 1), 0))
    with pytest.raises(ConfigError, match="parallel.ep=3 must be a positive divisor of parallel.dp=4"):
        moe_config(dp=4, ep=3, G=8, mbs=2, world=4)


def test_ep_groups_and_dry_run():
    eps, edps = ep_layout(pp=2, dp=4, tp=2, ep=2)
    assert eps[:2] == [(0, 2), (1, 3)] and edps[:2] == [(0, 4), (1, 5)]     # ep: neighbouring dp ranks
    assert sorted(r for g in eps for r in g) == list(range(16)) == sorted(r for g in edps for r in g)
    from launch.dry_run import describe
    text = describe(moe_config(dp=4, ep=2, G=8, mbs=2))
    assert "ep groups:  [[0, 1], [2, 3]]" in text and "edp groups: [[0, 2], [1, 3]]" in text


# --- expert parallelism vs one process ---------------------------------------------------------

def _ep_body(rank, world, runs):
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    from parallel.moe import moe_counters
    from parallel.parameters import param_info
    out, refs = [], {}
    for pp, dp, ep, stage, cf, *tp in runs:
        cfg = moe_config(dp=dp, ep=ep, stage=stage, cf=cf, world=world, pp=pp, tp=tp[0] if tp else 1)
        if rank == 0 and cf not in refs:
            refs[cf] = reference_moe(cfg)
        model = build(cfg)
        full_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        eng = parallelize(model, cfg)
        data = dataset(cfg)
        before = eng.mesh.stats.snapshot()         # (the pipeline split's trace forward also runs the MoE layers)
        losses, norms = [], []
        for t in range(cfg.train.steps):
            losses.append(eng.train_step(rank_batch(data, t, cfg.data.global_batch_size, dp, eng.mesh.coord["dp"])))
            norms.append(eng.last_result.grad_norm)
        ex = [b for b in eng.zero._all if b.group is not None]
        flagged = sum(p.numel() for p in eng.module.parameters() if param_info(p).ep_split) if stage < 3 else None
        moe = moe_counters(eng.moe, eng.dp)
        a2a = eng.mesh.stats.diff(eng.mesh.stats.snapshot(), before).get("ep", {}).get("all_to_all")
        out.append(dict(ref=refs.get(cf), losses=losses, full_expert=full_expert, flagged=flagged,
                        expert_numel=sum(b.numel for b in ex), expert_master=sum(b.master.numel() for b in ex),
                        edp=eng.mesh.size("edp"), a2a=a2a, moe=moe, norms=norms,
                        micro=cfg.micro_batches))
        eng.close()
    return out


def _check(res, runs):
    for i, (pp, dp, ep, stage, cf, *tp) in enumerate(runs):
        what = f"pp={pp} dp={dp} ep={ep} tp={tp} stage={stage} cf={cf}"
        r0 = res[0][i]
        ref, ref_norms = r0["ref"]
        for r in res:
            got = r[i]
            assert_close(got["losses"], ref, what)
            assert_close(got["norms"], ref_norms, what + " grad norm")
            # per-rank expert state: E/ep of the expert parameters (and f/tp of each expert: parallel.moe.tp),
            # ZeRO ≥ 1 partitions it over edp
            assert got["expert_numel"] * ep * pp * (tp[0] if tp else 1) == got["full_expert"], what
            assert got["flagged"] in (None, got["expert_numel"]), what
            if stage > 0:
                assert got["expert_master"] == -(-got["expert_numel"] // got["edp"]), what
            # all-to-all: 2 forward (dispatch, combine) + 2 backward per layer and micro-batch; with capacity
            # factor 1 each carries E·C·h·b = T·k·h·b bytes, (ep−1)/ep of them off-rank
            calls = 4 * MOE["n_layer"] // pp * got["micro"] * len(got["losses"])
            a = got["a2a"]
            assert a["calls"] == calls and a["wire_bytes"] == a["payload_bytes"] * (ep - 1) / ep, what
            if cf == 1.0:
                T = 2 * 16
                assert a["payload_bytes"] == calls * T * MOE["top_k"] * MOE["n_embd"] * 4, what
        m = r0["moe"]                                   # counters of the whole run, summed over dp
        assert (m["dropped_tokens"] > 0) == (cf is not None), what
        assert sum(m["expert_load"][0]) == len(r0["losses"]) * 8 * 16 * MOE["top_k"], what
        if pp == 1:
            assert len(m["expert_load"]) == MOE["n_layer"], what


# (pp, dp, ep, ZeRO stage, capacity factor; None = dropless)
EP2_FAST = [(1, 2, 2, 0, 1.0), (1, 2, 2, 3, None)]
EP2 = [(1, 2, 2, s, cf) for s in (0, 1, 2, 3) for cf in (1.0, None) if (1, 2, 2, s, cf) not in EP2_FAST]


def test_ep2_reproduces_one_process():
    _check(run_ranks(_ep_body, 2, EP2_FAST), EP2_FAST)


@pytest.mark.slow
def test_ep2_every_zero_stage_reproduces_one_process():
    _check(run_ranks(_ep_body, 2, EP2), EP2)


DP4 = [(1, 4, 2, s, cf) for s in (0, 1, 2, 3) for cf in (1.0, None)] + [(1, 4, 4, s, 1.0) for s in (0, 3)]
PP2 = [(2, 2, 2, s, cf) for s in (0, 1) for cf in (1.0, None)]


@pytest.mark.slow
def test_dp4_ep2_and_ep4_reproduce_one_process():
    _check(run_ranks(_ep_body, 4, DP4), DP4)


@pytest.mark.slow
def test_pp2_ep2_reproduces_one_process():
    _check(run_ranks(_ep_body, 4, PP2), PP2)


PP2_Z23 = [(2, 2, 2, s, cf) for s in (2, 3) for cf in (1.0, None)]


@pytest.mark.slow
def test_pp2_ep2_zero2_zero3_reproduce_one_process():
    """pp × ep with the expert gradients (ZeRO-2) and parameters (ZeRO-3) partitioned over edp."""
    _check(run_ranks(_ep_body, 4, PP2_Z23), PP2_Z23)


PP2_EDP2 = [(2, 4, 2, 3, 1.0), (2, 4, 2, 2, None)]


@pytest.mark.slow
def test_pp2_dp4_ep2_zero3_edp2_reproduces_one_process():
    """pp2 × dp4 × ep2 (8 ranks): expert state partitioned over edp = 2 inside each pipeline stage."""
    _check(run_ranks(_ep_body, 8, PP2_EDP2, timeout=900), PP2_EDP2)


TP2 = [(1, 2, 2, s, cf, 2) for s, cf in ((0, 1.0), (2, None))]


@pytest.mark.slow
def test_tp2_ep2_reproduces_one_process():
    """ep × tp: attention split over tp, the router replicated, the experts split over ep and over tp."""
    _check(run_ranks(_ep_body, 4, TP2), TP2)


# --- unmodified transformers MoE models ----------------------------------------------------------

def _hf_body(rank, world, runs):
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    from parallel.moe.hf import ExpertParallelExperts
    out = []
    for model_type, stage, *tp in runs:
        cfg = hf_config(model_type, stage=stage, world=world, tp=tp[0] if tp else 1)
        ref = reference_moe(cfg) if rank == 0 else None
        model = build(cfg)
        full = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        eng = parallelize(model, cfg)
        data = dataset(cfg)
        losses, norms = [], []
        for t in range(cfg.train.steps):
            losses.append(eng.train_step(rank_batch(data, t, cfg.data.global_batch_size, 2, eng.mesh.coord["dp"])))
            norms.append(eng.last_result.grad_norm)
        conv = [m for m in eng.module.modules() if isinstance(m, ExpertParallelExperts)]
        mine = sum(b.numel for b in eng.zero._all if b.group is not None)
        out.append(dict(ref=ref, losses=losses, norms=norms, full=full, mine=mine, converted=len(conv),
                        a2a=eng.mesh.stats.snapshot()["ep"]["all_to_all"]["calls"]))
        eng.close()
    return out


def _check_hf(res, runs):
    for i, (model_type, stage, *tp) in enumerate(runs):
        ref, ref_norms = res[0][i]["ref"]
        for r in res:
            got = r[i]
            assert_close(got["losses"], ref, f"{model_type} stage {stage}")
            assert_close(got["norms"], ref_norms, f"{model_type} stage {stage} grad norm")
            assert got["converted"] == 2 and got["mine"] * 2 * (tp[0] if tp else 1) == got["full"], (model_type, got)
            assert got["a2a"] == 4 * 2 * 2 * len(ref), (model_type, got)     # 4 per layer, micro-batch, step


HF_RUNS = [("mixtral", 0), ("qwen3_moe", 2), ("olmoe", 3)]


@pytest.mark.slow
def test_hf_moe_models_ep2_reproduce_one_process():
    pytest.importorskip("transformers")
    _check_hf(run_ranks(_hf_body, 2, HF_RUNS), HF_RUNS)


HF_TP = [("mixtral", 1, 2), ("olmoe", 0, 2), ("qwen3_moe", 2, 2)]   # (qwen3_moe's dense-MLP plan entries dropped)


@pytest.mark.slow
def test_hf_moe_models_tp2_ep2_reproduce_one_process():
    """Attention under the model's published tp plan, experts split over ep and tp, the router replicated."""
    pytest.importorskip("transformers")
    _check_hf(run_ranks(_hf_body, 4, HF_TP), HF_TP)


def _metrics_body(rank, world, path):
    from launch.metrics import read_jsonl
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = moe_config(dp=2, ep=2, steps=2, world=world)
    cfg.train.metrics_file = path
    run(cfg, Mesh(dp=2, ep=2), print_fn=lambda *a, **k: None)
    return read_jsonl(path) if rank == 0 else None


def test_metrics_carry_expert_load_and_dropped_tokens(tmp_path):
    recs = run_ranks(_metrics_body, 2, str(tmp_path / "m.jsonl"))[0]
    assert len(recs) == 2
    for r in recs:                                    # per step: every routed token of the global batch
        m = r["moe"]
        assert [sum(row) for row in m["expert_load"]] == [8 * 16 * MOE["top_k"]] * MOE["n_layer"]
        assert 0 < m["dropped_tokens"] < 8 * 16 * MOE["top_k"] and m["aux_loss"] > 0 and m["z_loss"] > 0
        assert r["comm"]["ep"]["all_to_all"]["calls"] == 4 * MOE["n_layer"] * 2
