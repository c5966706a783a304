"""The I/W split of backward (parallel.pipeline.backward_split): I computes ∂ℓ/∂x only, W the weight
gradients from the captured node gradients only. Against one plain backward on the same graph:
FLOPs(I) + FLOPs(W) = FLOPs(B) within 5% (FlopCounterMode; exact for matmul chains), gradients
equal, and the bytes held between I and W equal the captured δ's counted by hand."""
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from parallel.pipeline.backward_split import backward_input, backward_weight

B, S, H = 4, 8, 32


def _run(fn, params, x0, split, loss=False):
    """(total backward FLOPs, FLOPs of I, dx, grads, captured bytes) for y = fn(x)."""
    for p in params:
        p.grad = None
    x = x0.clone().requires_grad_(True)
    y = fn(x)
    if loss:
        y = y if y.dim() == 0 else y.pow(2).mean()
    dy = None if loss else torch.randn_like(y, generator=torch.Generator().manual_seed(3))
    with FlopCounterMode(display=False) as fc:
        if split:
            dx, wp = backward_input(y, dy, x, params)
            f_i, held = fc.get_total_flops(), wp.captured_bytes
            backward_weight(wp, params)
        else:
            torch.autograd.backward(y, dy)
            dx, f_i, held = x.grad, None, 0
    return fc.get_total_flops(), f_i, dx, {id(p): p.grad.clone() for p in params}, held


def _compare(fn, params, x0, loss=False, extra=0):
    params = [p for p in params if p.requires_grad]
    f_b, _, dx_b, g_b, _ = _run(fn, params, x0, False, loss)
    f_s, f_i, dx_s, g_s, held = _run(fn, params, x0, True, loss)
    assert f_b > 0 and abs(f_s - extra - f_b) <= 0.05 * f_b, (f_s, f_b)
    assert 0 < f_i < f_b                       # I alone does not run the weight matmuls
    torch.testing.assert_close(dx_s, dx_b, rtol=1e-5, atol=1e-6)
    assert g_s.keys() == g_b.keys()
    for k in g_b:
        torch.testing.assert_close(g_s[k], g_b[k], rtol=1e-5, atol=1e-6)
    return f_b, f_i, f_s, held


def test_mlp_flops_exact_and_held_bytes():
    """Linear(H,4H) GELU Linear(4H,H) LayerNorm Linear(H,H) on b·s = 32 rows. A linear with n rows,
    fan-in k and fan-out o: forward 2nko; B = data grad 2nko + weight grad 2nko. So I = half of
    the linear FLOPs, W the other half, I + W = B exactly. Held: the δ into each of the four
    weight-consuming nodes, n·(4H + H + H + H) fp32 values."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(H, 4 * H), nn.GELU(), nn.Linear(4 * H, H), nn.LayerNorm(H), nn.Linear(H, H))
    f_b, f_i, f_s, held = _compare(net, net.parameters(), torch.randn(B, S, H))
    n = B * S
    mm = 2 * n * (H * 4 * H + 4 * H * H + H * H)    # forward matmul FLOPs of the three linears
    assert f_b == f_s == 2 * mm and f_i == mm
    assert held == n * (4 * H + H + H + H) * 4


def test_reused_weight_counted_once():
    """A weight used twice on the path (h = L(L(x))): two intermediates in one group; the δ into
    the inner one must not be added again by W's walk from the outer one (gradients exact). The
    cost of the reuse: W walks from the outer node to the inner one, one extra data matmul of
    2·b·H·H FLOPs (torch's stage_backward_weight has the same)."""
    torch.manual_seed(0)
    lin = nn.Linear(H, H)
    f_b, f_i, f_s, _ = _compare(lambda x: torch.tanh(lin(torch.tanh(lin(x)))), lin.parameters(),
                                torch.randn(B, H), extra=2 * B * H * H)
    assert f_s == f_b + 2 * B * H * H


@pytest.mark.parametrize("family", ["gpt", pytest.param("llama", marks=pytest.mark.slow)])
def test_transformer_stage_flops(family):
    """The last stage of a 2-stage split of a small model (blocks, final norm, head, loss): the
    split's FLOPs equal one backward's within 5%, gradients and ∂ℓ/∂x equal."""
    from test_pipeline_split import build

    from parallel.loss import cross_entropy
    from parallel.pipeline.split import split_model
    torch.manual_seed(0)
    model = build(family, 4)
    first, = split_model(model, 0, 2)
    last, = split_model(model, 1, 2)
    ids = torch.randint(0, 64, (B, S))
    x0 = first(ids).detach()
    f_b, f_i, f_s, held = _compare(lambda x: cross_entropy(last(x), ids), last.parameters(), x0, loss=True)
    assert f_i < 0.6 * f_b and held > 0


def test_first_stage_falls_back_to_whole_backward():
    """No input gradient (token ids): I does nothing, W is the plain backward."""
    torch.manual_seed(0)
    emb, lin = nn.Embedding(16, H), nn.Linear(H, H)
    ids = torch.randint(0, 16, (B, S))
    y = lin(emb(ids)).sum()
    dx, wp = backward_input(y, None, None, [emb.weight, lin.weight, lin.bias])
    assert dx is None and wp.captured_bytes == 0 and emb.weight.grad is None
    backward_weight(wp, [emb.weight, lin.weight, lin.bias])
    want = emb(ids).sum((0, 1)).detach()             # ∂ Σ(W e + b) / ∂W = 1 ⊗ Σe
    torch.testing.assert_close(lin.weight.grad, want.expand(H, H), rtol=1e-5, atol=1e-5)


def _split_once(fn, params, x0, cache, calls):
    """One I + W through ``cache``; returns (dx, grads, I engine calls, W engine calls)."""
    import parallel.pipeline.backward_split as bs
    for p in params:
        p.grad = None
    x = x0.clone().requires_grad_(True)
    y = fn(x)
    n0 = len(calls)
    dx, wp = bs.backward_input(y, torch.ones_like(y), x, params, cache=cache)
    n_i = len(calls) - n0
    assert wp.engine_calls == len(wp.groups)
    bs.backward_weight(wp, params)
    return dx, {id(p): _g(p) for p in params}, n_i, len(calls) - n0 - n_i


def _plain(fn, params, x0):
    for p in params:
        p.grad = None
    x = x0.clone().requires_grad_(True)
    y = fn(x)
    y.backward(torch.ones_like(y))
    return x.grad, {id(p): _g(p) for p in params}


def _g(p):
    return None if p.grad is None else p.grad.clone()


@pytest.fixture
def engine_calls(monkeypatch):
    """Every call the split makes into the autograd engine, counted."""
    import parallel.pipeline.backward_split as bs
    calls, run = [], bs._run
    monkeypatch.setattr(bs, "_run", lambda *a: calls.append(a) or run(*a))
    return calls


def test_analysis_cached_per_structure(engine_calls):
    """The graph analysis runs once per graph structure: micro-batches 2 and 3 reuse it (hits), a
    different structure (the branch taken) is analysed afresh, and swapping two same-shaped weights
    (same node types, other AccumulateGrad at each place) is caught. Per micro-batch: I = 1 engine
    call, W = one per weight group (3 linears + 1 norm = 4). Every gradient equals a plain backward."""
    from parallel.pipeline.backward_split import SplitCache
    torch.manual_seed(0)
    a, b, norm = nn.Linear(H, H), nn.Linear(H, H), nn.LayerNorm(H)
    params = [*a.parameters(), *b.parameters(), *norm.parameters()]
    head = nn.Linear(H, H)
    params += list(head.parameters())
    cache = SplitCache()

    def check(fn, x0, hits, misses, w_calls):
        dx, g, n_i, n_w = _split_once(fn, params, x0, cache, engine_calls)
        dx_b, g_b = _plain(fn, params, x0)
        torch.testing.assert_close(dx, dx_b, rtol=1e-5, atol=1e-6)
        for k in g_b:
            assert (g[k] is None) == (g_b[k] is None)
            if g_b[k] is not None:
                torch.testing.assert_close(g[k], g_b[k], rtol=1e-5, atol=1e-6)
        assert (n_i, n_w, cache.hits, cache.misses) == (1, w_calls, hits, misses)

    fwd = lambda x: head(norm(torch.tanh(b(torch.tanh(a(x))))))          # noqa: E731
    x0 = torch.randn(B, H)
    check(fwd, x0, 0, 1, 4)
    check(fwd, x0 * 2, 1, 1, 4)
    check(fwd, x0 - 1, 2, 1, 4)
    check(lambda x: head(norm(torch.tanh(b(x)))), x0, 2, 2, 3)          # another structure: a unused
    check(lambda x: head(norm(torch.tanh(a(torch.tanh(b(x)))))), x0, 2, 3, 4)   # a and b swapped
    check(fwd, x0, 2, 4, 4)                                   # the swap replaced the plan: analysed again
    check(fwd, x0, 3, 4, 4)


def test_one_engine_call_for_all_groups_rewalks_the_path():
    """Why W makes one engine call per weight group: one call from every captured intermediate to
    every weight (the δ of the other intermediates clamped, as W does within a group) gives the same
    gradients but walks the activation path between the intermediates again — its FLOPs are W's plus
    I's data matmuls above the first intermediate (the Linear-GELU-Linear-LayerNorm-Linear chain of
    the first test: all of I but the first linear's data matmul into x, 2·n·H·4H). If torch ever
    stops re-walking, this fails and W can merge its calls."""
    from torch.autograd.graph import GradientEdge

    import parallel.pipeline.backward_split as bs
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(H, 4 * H), nn.GELU(), nn.Linear(4 * H, H), nn.LayerNorm(H), nn.Linear(H, H))
    params = list(net.parameters())
    x = torch.randn(B, S, H, requires_grad=True)
    dy = torch.randn(B, S, H)
    y = net(x)
    with FlopCounterMode(display=False) as fc:
        _, wp = backward_input(y, dy, x, params)
    f_i = fc.get_total_flops()
    edges, grads, clamps = [], [], []
    for grp in wp.groups:
        for n, gs in zip(grp.nodes, grp.grads):
            clamps.append(n.register_prehook(lambda _g, gs=gs: gs))
            edges += [GradientEdge(n, k) for k, g in enumerate(gs) if g is not None]
            grads += [g for g in gs if g is not None]
    with FlopCounterMode(display=False) as fc:
        bs._run(edges, grads, params, True)
    for h in clamps:
        h.remove()
    f_one = fc.get_total_flops()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    _, wp = backward_input(net(x), dy, x, params)
    n_groups = len(wp.groups)
    with FlopCounterMode(display=False) as fc:
        backward_weight(wp, params)
    assert f_one == fc.get_total_flops() + f_i - 2 * B * S * H * 4 * H and n_groups == 4 == len(edges)
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
