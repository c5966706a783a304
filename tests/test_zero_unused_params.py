"""Parameters no dp rank gives a gradient in a step are skipped by the optimizer, as one process skips a
``grad=None`` parameter (parallel/zero/unused.py): AdamW with weight decay, a branch used at step 1 only
(its moments and weight decay must not move it at step 2), a module never called (no state at all) and a
branch that data selects on one rank's rows only (updated: a rank had a gradient). dp2 at ZeRO stages 0–3,
2 micro-batches, 3 steps: every weight equal to one process to 1e-6."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_ranks

V, H, STEPS, M = 16, 8, 3, 2
FIRST = {(0, 0): [1, 3, 5, 7], (0, 1): [1, 3, 5, 7],      # first tokens: a row starting with 0 mod 4 takes .side
         (1, 0): [4, 3, 5, 7], (1, 1): [1, 3, 5, 7],      # step 1: rank 0's rows only
         (2, 0): [1, 3, 5, 7], (2, 1): [1, 3, 8, 7]}      # step 2: rank 1's rows only


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(V, H)
        self.body = nn.Linear(H, H)
        self.extra = nn.Linear(H, H)       # used at step 1 only (self.step)
        self.side = nn.Linear(H, H)        # used on the rows whose first token is 0 mod 4 (data)
        self.never = nn.Linear(H, H)       # never called
        self.head = nn.Linear(H, V)
        self.step, self.data_branch = 0, True

    def forward(self, ids):
        h = torch.tanh(self.body(self.wte(ids)))
        if self.step == 1:
            h = h + self.extra(h)
        sel = ids[:, 0] % 4 == 0
        if self.data_branch and bool(sel.any()):
            h = h + torch.where(sel[:, None, None], self.side(h), 0.0)
        return self.head(h)


def _batch(t, mb):
    x = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(10 * t + mb))
    x[:, 0] = torch.tensor(FIRST[t, mb])
    return x


def _loss(model, x):
    return F.cross_entropy(model(x).flatten(0, 1), ((x + 1) % V).flatten())


def _opt(ps):
    return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)


def _reference(data_branch):
    torch.manual_seed(0)
    model = Net()
    model.data_branch = data_branch
    opt = _opt(model.parameters())
    for t in range(STEPS):
        model.step = t
        opt.zero_grad()
        for mb in range(M):
            (_loss(model, _batch(t, mb)) / M).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _dp(rank, world, stages):
    from parallel.config import ZeroConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    out = {}
    for stage in stages:
        torch.manual_seed(0)
        model = Net()
        model.data_branch = stage < 3      # ZeRO-3: a data-dependent call in the root is refused (lockstep)
        zero = ZeroOptimizer(model, _opt, Mesh(dp=world).group("dp"), ZeroConfig(stage=stage))
        unused = []
        for t in range(STEPS):
            model.step = t
            zero.zero_grad()
            zero.prepare_step(M)
            for mb in range(M):
                x = _batch(t, mb)[2 * rank:2 * rank + 2]
                (_loss(model, x) / M * zero.loss_scale).backward()
            zero.step()
            unused.append(sorted(b.names[i] for b in zero.buckets for i in b.unused))
        if stage == 3:
            with zero.stage3.gathered():
                out[stage] = ({n: p.detach().clone() for n, p in model.named_parameters()}, unused)
        else:
            out[stage] = ({n: p.detach().clone() for n, p in model.named_parameters()}, unused)
    return out


def test_parameters_without_gradient_on_any_rank_are_skipped_at_every_stage():
    refs = {True: _reference(True), False: _reference(False)}
    res = run_ranks(_dp, 2, [0, 1, 2, 3], timeout=150)
    for stage in range(4):
        ref = refs[stage < 3]
        for r in range(2):
            got, unused = res[r][stage]
            for n, w in ref.items():
                torch.testing.assert_close(got[n], w, rtol=0, atol=1e-6, msg=f"stage {stage} rank {r} {n}")
            def names(*mods):
                return sorted(f"{m}.{k}" for m in mods for k in ("weight", "bias"))
            if stage < 3:                  # .side: no row at step 0, rank 0's at step 1, rank 1's at step 2
                assert unused == [names("never", "extra", "side"), names("never"), names("never", "extra")], unused
            else:                          # .side not called at all
                assert unused == [names("never", "extra", "side"), names("never", "side"),
                                  names("never", "extra", "side")], (stage, unused)
