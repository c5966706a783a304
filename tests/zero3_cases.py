"""Shared by the small ZeRO-3 regression tests (tests/test_zero3_*.py): a tiny LM's batches and loss, the
one-process AdamW reference and the same run under ZeroOptimizer stage 3 on ``world`` gloo ranks — ``steps``
steps of ``m`` micro-batches, each rank taking its rows of the (4, 6) micro-batch."""
import torch
import torch.nn.functional as F

LR = 1e-2


def batch(t: int, mb: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 6), generator=torch.Generator().manual_seed(10 * t + mb))


def loss_of(model, x: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), ((x + 1) % vocab).flatten())


def reference(make, vocab: int, steps: int, m: int):
    """(mean loss per step, final weights) of ``make()`` trained on one process."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    out = []
    for t in range(steps):
        opt.zero_grad()
        total = 0.0
        for mb in range(m):
            loss = loss_of(model, batch(t, mb, vocab), vocab) / m
            loss.backward()
            total += loss.item()
        opt.step()
        out.append(total)
    return out, {n: p.detach().clone() for n, p in model.named_parameters()}


def zero3(rank: int, world: int, make, vocab: int, steps: int, m: int):
    """Rank body: (this rank's mean loss per step, the gathered final weights) under ZeRO-3 over dp = world."""
    from parallel.config import ZeroConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    torch.manual_seed(0)
    model = make()
    zero = ZeroOptimizer(model, lambda ps: torch.optim.AdamW(ps, lr=LR), Mesh(dp=world).group("dp"),
                         ZeroConfig(stage=3))
    rows = 4 // world
    out = []
    for t in range(steps):
        zero.zero_grad()
        zero.prepare_step(m)
        total = 0.0
        for mb in range(m):
            x = batch(t, mb, vocab)[rows * rank:rows * (rank + 1)]
            loss = loss_of(model, x, vocab) / m
            (loss * zero.loss_scale).backward()
            total += loss.item()
        zero.step()
        out.append(total)
    with zero.stage3.gathered():
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out, weights


def assert_matches(make, vocab: int, steps: int, m: int, run_ranks, weights: bool = True) -> None:
    """dp2 ZeRO-3 = one process: mean losses to 1e-5 (relative), final weights to 1e-5 / 1e-6."""
    want, ref = reference(make, vocab, steps, m)
    res = run_ranks(zero3, 2, make, vocab, steps, m, timeout=120)
    got = [(a + b) / 2 for a, b in zip(res[0][0], res[1][0])]
    for t in range(steps):
        assert abs(got[t] - want[t]) <= 1e-5 * abs(want[t]), (t, got, want)
    for n, w in (ref.items() if weights else ()):
        torch.testing.assert_close(res[0][1][n], w, rtol=1e-5, atol=1e-6, msg=n)
