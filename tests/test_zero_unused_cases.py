"""Parameters no rank gives a gradient are skipped as one process skips a ``grad=None`` parameter
(parallel/zero/unused.py), in the cases test_zero_unused_params.py leaves out: optimizer offload (its streamed
AdamW leaves the unused pieces alone and keeps per-parameter step counts; stage 2 also updates buckets inside
backward), expert buckets reduced over edp (an expert no token of its edp group reached), and the stage-0 flag
riding in the last bucket's all-reduce (no collective of its own: dp traffic = one all-reduce of Ψ + 1 elements
per step, nothing on the control channel). Every weight equal to one process (torch AdamW, weight decay) to 1e-6."""
import torch
import torch.nn as nn
from harness import run_ranks
from test_zero_unused_params import STEPS, M, Net, _batch, _loss, _opt, _reference

EXPERT_ROWS = {0: [[], []], 1: [[0], []], 2: [[], [3]]}   # step -> per expert, the global rows routed to it
SYMMETRIC = {0: [[], []], 1: [[0], [3]], 2: [[], []]}     # ZeRO-3: every rank calls its expert, or none does


def _run(model, zero, rank, rows=2, before=lambda t: None):
    unused = []
    for t in range(STEPS):
        model.step = t
        before(t)
        zero.zero_grad()
        zero.prepare_step(M)
        for mb in range(M):
            x = _batch(t, mb)[rows * rank:rows * rank + rows]
            (_loss(model, x) / M * zero.loss_scale).backward()
        zero.step()
        unused.append(sorted(b.names[i] for b in zero.buckets for i in b.unused))
    return unused


def _offload(rank, world, stages, tmp):
    from parallel.config import OffloadConfig, ZeroConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    out = {}
    for stage in stages:
        torch.manual_seed(0)
        model = Net()
        model.data_branch = stage < 3
        off = OffloadConfig(optimizer="nvme" if stage == 1 else "cpu", nvme_path=tmp, buffer_mb=0.0005)
        cfg = ZeroConfig(stage=stage, offload=off, bucket_mb=0.0005)
        zero = ZeroOptimizer(model, _opt, Mesh(dp=world).group("dp"), cfg)
        unused = _run(model, zero, rank)
        early = zero.offload_stats()["optimizer"]["last_step"]["early_buckets"]
        with zero.gathered():
            w = {n: p.detach().clone() for n, p in model.named_parameters()}
        steps = []
        for _ in range(2):                       # the per-parameter counts survive a write-back (checkpoint load)
            with zero.materialized(write_back=True):
                steps.append({b.names[i]: int(zero.optimizer.state[v]["step"]) for b, i, _, _, v in zero._pieces})
        assert steps[0] == steps[1], steps
        zero.close()
        out[stage] = (w, unused, early, steps[0])
    return out


def test_optimizer_offload_skips_parameters_without_gradient(tmp_path):
    refs = {True: _reference(True), False: _reference(False)}
    res = run_ranks(_offload, 2, [0, 1, 2, 3], str(tmp_path), timeout=200)
    for stage in range(4):
        for r in range(2):
            got, unused, early, steps = res[r][stage]
            for n, w in refs[stage < 3].items():
                torch.testing.assert_close(got[n], w, rtol=0, atol=1e-6, msg=f"stage {stage} rank {r} {n}")
            assert "never.weight" in unused[0] and "never.weight" in unused[2], unused
            for n, k in steps.items():           # torch's per-parameter step: skipped steps do not count
                want = {"never": 0, "extra": 1, "side": 2 if stage < 3 else 0}.get(n.split(".")[0], 3)
                assert k == want, (stage, r, n, k)
            if stage == 2:                       # the buckets with every gradient present still went early
                assert early >= 1


def _offload_int8(rank, world, stages, tmp):
    """8-bit moments (Adam8bit): ZeRO with the offloaded 8-bit step vs without offload (bit for bit equal by
    design, parallel/zero/offload_int8.py; Adam8bit skips a grad=None piece with per-piece steps)."""
    from parallel.config import OffloadConfig, ZeroConfig
    from parallel.mesh import Mesh
    from parallel.optim.adam8bit import Adam8bit
    from parallel.zero import ZeroOptimizer
    out = {}
    for stage in stages:
        got = []
        for medium in ("none", "cpu"):
            torch.manual_seed(0)
            model = Net()
            off = OffloadConfig(optimizer=medium, nvme_path=tmp, buffer_mb=0.002)
            zero = ZeroOptimizer(model, lambda ps: Adam8bit(ps, lr=1e-2, weight_decay=0.1, block_size=8),
                                 Mesh(dp=world).group("dp"), ZeroConfig(stage=stage, offload=off, bucket_mb=0.0005))
            _run(model, zero, rank)
            got.append({n: p.detach().clone() for n, p in model.named_parameters()})
            zero.close()
        out[stage] = got
    return out


def test_optimizer_offload_int8_skips_parameters_without_gradient(tmp_path):
    res = run_ranks(_offload_int8, 2, [1, 2], str(tmp_path), timeout=200)
    for r in range(2):
        for stage, (plain, off) in res[r].items():
            for n, w in plain.items():
                torch.testing.assert_close(off[n], w, rtol=0, atol=1e-6, msg=f"stage {stage} rank {r} {n}")


class ExpertNet(nn.Module):
    """A dense trunk and one 'expert' Linear per ep rank (flagged ep_split), applied to the rows routed to it.
    On one process (``experts`` = all of them) row i goes to the experts listing i in EXPERT_ROWS[step]."""

    def __init__(self, n_experts=2, routes=None):
        super().__init__()
        self.routes = routes or EXPERT_ROWS
        self.wte, self.body, self.head = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 16)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(n_experts))
        self.step, self.rows, self.ids = 0, None, list(range(n_experts))

    def forward(self, x):
        h = torch.tanh(self.body(self.wte(x)))
        for e, k in zip(self.experts, self.ids):
            rows = [i - self.rows.start for i in self.routes[self.step][k] if i in self.rows]
            if rows:
                sel = torch.zeros(len(x), dtype=torch.bool)
                sel[rows] = True
                h = h + torch.where(sel[:, None, None], e(h), 0.0)
        return self.head(h)


def _expert_reference(routes=None):
    torch.manual_seed(0)
    model = ExpertNet(routes=routes)
    opt = _opt(model.parameters())
    for t in range(STEPS):
        model.step = t
        opt.zero_grad()
        for mb in range(M):
            model.rows = range(0, 4)
            (_loss(model, _batch(t, mb)) / M).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _experts(rank, world, ep, stages, routes=None):
    """dp ``world``, ep ``ep``: dp rank d holds expert d % ep (edp rank d // ep) and rows [rows·d, rows·(d+1))."""
    from parallel.config import ZeroConfig
    from parallel.mesh import Mesh
    from parallel.parameters import param_info
    from parallel.zero import ZeroOptimizer
    out, rows = {}, 4 // world
    for stage in stages:
        torch.manual_seed(0)
        model = ExpertNet(routes=routes)
        k = rank % ep
        model.experts = nn.ModuleList([model.experts[k]])
        model.ids, model.rows = [k], range(rows * rank, rows * rank + rows)
        param_info(model.experts[0].weight).ep_split = param_info(model.experts[0].bias).ep_split = True
        mesh = Mesh(dp=world, ep=ep)
        zero = ZeroOptimizer(model, _opt, mesh.group("dp"), ZeroConfig(stage=stage),
                             expert_groups=(mesh.group("ep"), mesh.group("edp")))
        unused = _run(model, zero, rank, rows)
        with zero.gathered():
            out[stage] = ({n.replace("experts.0", f"experts.{k}"): p.detach().clone()
                           for n, p in model.named_parameters()}, unused)
    return out


def _check_experts(res, world, ep, routes=None):
    ref = _expert_reference(routes)
    for stage in res[0]:
        for r in range(world):
            got, unused = res[r][stage]
            for n, w in got.items():
                torch.testing.assert_close(w, ref[n], rtol=0, atol=1e-6, msg=f"stage {stage} rank {r} {n}")
            for t in range(STEPS):               # routed rows all lie on ranks holding the expert (EXPERT_ROWS)
                used = bool((routes or EXPERT_ROWS)[t][r % ep])
                assert ("experts.0.weight" in unused[t]) == (not used), (stage, r, t, unused)


def test_expert_buckets_skip_experts_no_token_reached_dp2_ep2():
    _check_experts(run_ranks(_experts, 2, 2, [0, 1, 2], timeout=200), 2, 2)


def test_expert_units_skip_experts_no_token_reached_zero3_dp2_ep2():
    """ZeRO-3 (expert units over edp): a module call that differs between ranks is not supported there, so the
    routing is the same on every rank: both experts at step 1, none at steps 0 and 2."""
    _check_experts(run_ranks(_experts, 2, 2, [3], SYMMETRIC, timeout=200), 2, 2, SYMMETRIC)


def test_expert_buckets_agree_over_edp_dp4_ep2():
    """edp = 2: at step 1 expert 0 gets a row on dp rank 0 only — updated on rank 2 too, as one process."""
    _check_experts(run_ranks(_experts, 4, 2, [0, 2], timeout=200), 4, 2)


def _stage0_traffic(rank, world):
    from parallel.comm import CommStats
    from parallel.config import ZeroConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    torch.manual_seed(0)
    model = Net()
    del model.never, model.side
    model.data_branch = False
    stats = CommStats()
    zero = ZeroOptimizer(model, _opt, Mesh(dp=world, stats=stats).group("dp"), ZeroConfig(stage=0, bucket_mb=0.001))
    out = []
    for t in range(4):                  # .extra: used at steps 1 and 3, on rank 0 only at step 2, not at step 0
        model.step = 1 if t in (1, 3) or t == 2 and rank == 0 else 0
        before = stats.snapshot()
        zero.zero_grad()
        zero.prepare_step(1)
        _loss(model, _batch(t % 3, 0)[2 * rank:2 * rank + 2]).backward()
        zero.step()
        out.append((CommStats.diff(stats.snapshot(), before), [b.names[i] for b in zero.buckets for i in b.unused]))
    return out, sum(p.numel() for p in model.parameters()), len(zero.buckets)


def test_stage0_unused_flag_rides_in_the_last_bucket():
    """No collective of its own: the dp all-reduces move Ψ + 1 elements a step, the control channel carries
    nothing in a step where every rank had every gradient (steps 1, 3) and one flag all-reduce (an int64 per
    parameter) in a step where a rank missed one (step 2; step 0 also agrees on the bucket order)."""
    res = run_ranks(_stage0_traffic, 2, timeout=100)
    out, psi, nb = res[0]
    assert nb >= 2
    for t, (traffic, unused) in enumerate(out):
        ar = traffic["dp"]["all_reduce"]
        assert (ar["calls"], ar["payload_bytes"]) == (nb, 4 * (psi + 1)), (t, ar)
        ctl = traffic.get("control:dp", {})
        if t in (1, 3):
            assert ctl == {}, (t, ctl)
        if t == 2:
            c = ctl["all_reduce"]
            assert list(ctl) == ["all_reduce"] and (c["calls"], c["payload_bytes"]) == (1, 56), ctl
        assert sorted(unused) == (["extra.bias", "extra.weight"] if t == 0 else []), (t, unused)


def _onebit(rank, world):
    import warnings

    from parallel.config import ZeroConfig
    from parallel.mesh import Mesh
    from parallel.optim.onebit_adam import OneBitAdam
    from parallel.optim.onebit_lamb import OneBitLamb
    from parallel.optim.zero_one_adam import ZeroOneAdam
    from parallel.zero import ZeroOptimizer
    cases = {"adam_warmup": (lambda ps: OneBitAdam(ps, lr=1e-2, weight_decay=0.1, freeze_step=5), True),
             "lamb_warmup": (lambda ps: OneBitLamb(ps, lr=1e-2, weight_decay=0.1, freeze_step=5), True),
             "zero_one": (lambda ps: ZeroOneAdam(ps, lr=1e-2, weight_decay=0.1), True),      # local from step 1
             "adam_compressed": (lambda ps: OneBitAdam(ps, lr=1e-2, weight_decay=0.1, freeze_step=1), False)}
    out = {}
    for name, (factory, never) in cases.items():
        torch.manual_seed(0)
        model = Net()
        model.data_branch = False
        del model.side
        if not never:                    # every parameter used at the warm-up step, .extra missing afterwards
            del model.never
        zero = ZeroOptimizer(model, factory, Mesh(dp=world).group("dp"), ZeroConfig(stage=0))
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            _run(model, zero, rank, before=lambda t, m=model: setattr(m, "step", int(t == 0)))
        out[name] = [str(w.message) for w in got if "no gradient" in str(w.message)]
    return out


def test_onebit_family_warns_that_it_moves_parameters_without_gradient():
    """1-bit Adam / LAMB and 0/1 Adam keep one step count (and one compressed momentum) for the model: they
    cannot skip a parameter as torch does, and say so once, naming it — agreed over dp in warm-up, this rank's
    own in the compressed phase (no collective added there)."""
    res = run_ranks(_onebit, 2, timeout=150)
    for r in range(2):
        for name, msgs in res[r].items():
            assert len(msgs) == 1, (r, name, msgs)
            where = "on any dp rank" if name.endswith("warmup") else "on this dp rank"
            assert where in msgs[0] and ("extra" if name == "adam_compressed" else "never.bias") in msgs[0], msgs
            assert "optimizer.name adamw" in msgs[0]


def test_tied_copy_without_gradient_warns():
    """The tied weights' pp sum does not carry whether a stage had a gradient: a stage copy without one warns."""
    import pytest

    from parallel.comm import Group
    from parallel.pipeline.split import split_model, sync_tied_grads
    torch.manual_seed(0)
    emb, head = nn.Embedding(16, 8), nn.Linear(8, 16, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(8, 8), nn.Tanh(), head)
    a, = split_model(model, 0, 2)
    b, = split_model(model, 1, 2)
    x = torch.randint(0, 16, (2, 5))
    b(a(x).detach().requires_grad_()).square().mean().backward()      # stage 0's backward not run: no gradient
    with pytest.warns(UserWarning, match="tied weight 0: its copy on the first pipeline stage got no gradient"):
        sync_tied_grads([a, b], Group(None, "pp", (0,), 0))
    assert torch.equal(a[0].weight.grad, b[-1].weight.grad)
