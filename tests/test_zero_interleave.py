"""ZeRO-1/2's step updates bucket by bucket and posts each bucket's parameter all-gather before the next
bucket updates (parallel/zero/interleave.py): the parameters equal the two-pass step's (every update, then
every gather) bit for bit, one optimizer call per bucket, and it is used only where that holds."""
import torch
from harness import run_ranks
from test_zero import CLIP, global_batch, loss_of, make_model

from parallel.config import ZeroConfig
from parallel.zero import interleave as interleave_mod


class CountingAdamW(torch.optim.AdamW):
    """A subclass (may keep per-call state): must get the two-pass step."""


def _both(rank, world):
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    return {(stage, opt, inter): _run(g, rank, stage, inter, opt) for stage, opt in ((1, "adamw"), (2, "sgd"))
            for inter in (True, False)}


def _run(g, rank, stage, interleave, opt):
    from parallel.zero import ZeroOptimizer
    model = make_model("gpt")
    factory = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
               "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9)}[opt]
    z = ZeroOptimizer(model, factory, g, ZeroConfig(stage=stage, bucket_mb=0.05), grad_clip=CLIP)
    chosen = interleave_mod.eligible(z)
    z._interleave = interleave
    calls = []
    z.optimizer.register_step_post_hook(lambda *a: calls.append(1))
    per = 4
    for t in range(4):
        x, y = global_batch(t, 8)
        z.zero_grad()
        z.prepare_step(1)
        loss_of(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]).backward()
        z.step()
    owning = sum(1 for b in z._all if any(True for _ in b.pieces()))
    return [p.detach().clone() for p in model.parameters()], chosen, len(calls), owning, len(z._all)


def _choices(rank, world):
    from parallel.mesh import Mesh
    from parallel.optim.lamb import Lamb
    from parallel.zero import ZeroOptimizer
    g = Mesh(dp=world).group("dp")
    out = {}
    for name, stage, factory, mb in (("adamw s1", 1, torch.optim.AdamW, 0.05), ("sgd s2", 2, torch.optim.SGD, 0.05),
                                     ("adamw s0", 0, torch.optim.AdamW, 0.05), ("adamw s3", 3, torch.optim.AdamW, 0.05),
                                     ("one bucket", 1, torch.optim.AdamW, 25.0), ("subclass", 1, CountingAdamW, 0.05),
                                     ("lamb", 1, Lamb, 0.05)):
        z = ZeroOptimizer(make_model("gpt"), lambda ps, f=factory: f(ps, lr=1e-3), g, ZeroConfig(stage=stage,
                                                                                                bucket_mb=mb))
        out[name] = interleave_mod.eligible(z) and not z._interleave     # eligible, off by default (ENABLED)
    return out


def test_interleaving_only_where_it_is_exact():
    got = run_ranks(_choices, 2)[0]
    assert got == {"adamw s1": True, "sgd s2": True, "adamw s0": False, "adamw s3": False, "one bucket": False,
                   "subclass": False, "lamb": False}, got


def test_interleaved_step_equals_the_two_pass_step_bit_for_bit():
    res = run_ranks(_both, 2)
    for stage, opt in ((1, "adamw"), (2, "sgd")):
        for r in res:
            (pa, chosen, calls_a, owning, n), (pb, _, calls_b, _, _) = r[(stage, opt, True)], r[(stage, opt, False)]
            assert chosen and n >= 3, (stage, n)                     # several buckets: the interleaved path
            assert all(torch.equal(x, y) for x, y in zip(pa, pb)), stage
            assert calls_a == 4 * owning and calls_b == 4, (calls_a, owning, calls_b)
