"""The fused 1-bit compressor passes (parallel/optim/onebit_kernels.py) against the eager code they replace, bit
for bit: the compiled kernels and their eager twins (the no-compiler fallback), on random rows with exact
zeros, ±0, denormals, ±inf and NaN; and the count of full passes over Ψ in a compressed step."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.optim import onebit_kernels as K
from parallel.optim.onebit_adam import OneBitAdam, _compress, _decompressed_mean, _unpack, apply_step, compressed_mean


@pytest.fixture(params=["kernel", "eager"])
def path(request, monkeypatch):
    if request.param == "kernel":
        if not K.available():
            pytest.skip("no C++ compiler: the kernels are not built (the eager twin runs)")
    else:
        monkeypatch.setattr(K, "_ext", None)
        monkeypatch.setattr(K, "_tried", True)
    return request.param


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, NaN where NaN (a NaN's sign and payload are the hardware's choice)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32))


def _nasty(n: int, seed: int, special: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3)
    if special:
        i = torch.randperm(n, generator=g)
        x[i[:n // 10]] = 0.0
        x[i[n // 10:n // 8]] = -0.0
        x[i[n // 8:n // 6]] = torch.randn(n // 6 - n // 8, generator=g) * 1e-40        # denormals
    return x


def _old_compressed_mean(x, state):
    """The eager compressed_mean of session 8 on one rank (N = 1), verbatim."""
    n = x.numel()
    c = -(-n // 8) * 8
    if "worker_error" not in state:
        state["worker_error"], state["server_error"] = torch.zeros(c), torch.zeros(c)
    xp = state["worker_error"]
    xp[:n].add_(x)
    packed, scale, approx = _compress(xp.view(1, c))
    xp.sub_(approx.view(-1))
    xp[n:] = 0.0
    y = _decompressed_mean(packed, scale).add_(state["server_error"])
    s_packed, s_scale, s_approx = _compress(y.unsqueeze(0))
    state["server_error"] = y - s_approx[0]
    return (_unpack(s_packed) * s_scale.unsqueeze(-1)).reshape(-1)[:n]


@pytest.mark.parametrize("n", [1, 7, 8, 13, 1000, 4099])
def test_compressed_mean_equals_the_eager_code(path, n):
    new, old = {}, {}
    for t in range(6):
        x = _nasty(n, 100 * n + t)
        if t == 4 and n > 2:
            x[1] = math.inf                                     # one step with inf, then the errors carry NaN
        a, b = compressed_mean(x, new, None), _old_compressed_mean(x, old)
        assert _same(a, b), (n, t)
        assert _same(new["worker_error"], old["worker_error"]) and _same(new["server_error"], old["server_error"])


@pytest.mark.parametrize("N,c,c8,n_valid", [(3, 64, 64, 150), (2, 13, 16, 26), (3, 5, 8, 11), (1, 4096, 4096, 4096)])
def test_primitives_on_several_rows_equal_the_eager_code(path, N, c, c8, n_valid):
    x = _nasty(N * c, N * c)
    x[min(3, x.numel() - 1)] = -math.inf
    rows = torch.nn.functional.pad(x.view(N, c), (0, c8 - c))
    scale = K.row_scale(rows)
    ref_p, ref_s, approx = _compress(rows)                     # the eager compressor on the padded rows
    assert _same(scale, ref_s)
    packed, err = torch.empty(N, c8 // 8, dtype=torch.uint8), torch.empty(N * c)
    K.pack_error(x, scale, c, c8, packed, err, n_valid)
    ref_err = (x.view(N, c) - approx[:, :c]).reshape(-1)
    ref_err[n_valid:] = 0.0
    assert torch.equal(packed, ref_p) and _same(err, ref_err)
    es, y = _nasty(c, 7), torch.empty(c)                      # the server: mean of N rows + its error
    K.server_mean(packed, scale, es, y, c)
    assert _same(y, _decompressed_mean(packed, scale)[:c] + es)
    m_full = (_unpack(packed)[:, :c] * scale.unsqueeze(-1)).reshape(-1)
    for off, k in ((0, N * c), (3, N * c - 5), (min(c - 1, N * c - 2), 2)):  # slices of the flat, across rows
        for bound, wd, mode in ((3.16, 0.99, 0), (None, None, 0), (0.5, None, 1)):
            w, v = _nasty(k, off + 1), _nasty(k, off + 2, special=False).abs()
            v[:k // 4] = 0.0                                   # never-seen elements: √v̂ = 0
            v[k // 2:] = torch.rand(k - k // 2) * 1e-3         # where √v rounds (torch.sqrt is MKL's)
            w_ref, m_ref = w.clone(), m_full[off:off + k].clone()
            if wd is not None:
                w_ref.mul_(wd)
            denom = (v.sqrt() / 0.7).add_(1e-8) if mode == 0 else v + 1e-8
            apply_step(w_ref, m_ref, denom, 1e-3, 0.3, bound)
            m = torch.empty(k)
            K.unpack_update(packed, scale, c, off, m, w, v, mode=mode, sqrt_c2=0.7, eps=1e-8, lr=1e-3, c1=0.3, wd=wd,
                            bound=bound)
            assert _same(m, m_ref) and _same(w, w_ref), (off, k, bound, wd, mode)


@torch.no_grad()
def _old_onebit_step(opt, ps):
    """Session 8's OneBitAdam.step in the compressed phase (one rank), verbatim but for compressed_mean → old."""
    g = opt.param_groups[0]
    (b1, b2), lr, eps, wd = g["betas"], g["lr"], g["eps"], g["weight_decay"]
    opt._t = opt.t + 1
    for p in ps:
        st = opt.state[p]
        st["step"] = torch.tensor(float(opt._t))
        st["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
    flat = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in ps])
    mean = _old_compressed_mean(flat, opt.comm_state)
    o = 0
    for p in ps:
        opt.state[p]["exp_avg"].copy_(mean[o:o + p.numel()].view_as(p))
        o += p.numel()
    T = min(opt._t, g["freeze_step"])
    c1, c2 = 1 - b1 ** opt._t, 1 - b2 ** T
    for p in ps:
        st = opt.state[p]
        if wd:
            p.mul_(1 - lr * wd)
        apply_step(p, st["exp_avg"], (st["exp_avg_sq"].sqrt() / math.sqrt(c2)).add_(eps), lr, c1,
                   g.get("update_bound"))


@pytest.mark.parametrize("bound,wd", [("adam", 0.1), (None, 0.0)])
def test_onebit_adam_fused_step_equals_the_eager_step(path, bound, wd):
    torch.manual_seed(0)
    shapes = [(5, 3), (17,), (4, 4, 2), (1,)]
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    oa, ob = (OneBitAdam(ps, lr=1e-2, weight_decay=wd, freeze_step=2, update_bound=bound) for ps in (a, b))
    for t in range(7):
        for i, (pa, pb) in enumerate(zip(a, b)):
            gr = _nasty(pa.numel(), 10 * t + i, special=t > 2).view_as(pa)
            if i == 1 and t >= 2:
                gr[:5] = 0.0                                   # elements with no gradient after the freeze
            pa.grad, pb.grad = gr.clone(), gr.clone()
        oa.step()
        if oa.local_gradients and t >= 2:
            _old_onebit_step(ob, b)
        else:
            ob.step()
        for pa, pb in zip(a, b):
            assert _same(pa.detach(), pb.detach()), t
            for k in ("exp_avg", "exp_avg_sq"):
                assert _same(oa.state[pa][k], ob.state[pb][k]), (t, k)
    assert _same(oa.comm_state["worker_error"], ob.comm_state["worker_error"])


class _Passes(TorchDispatchMode):
    """Counts aten ops that read or write a tensor of at least ``n`` elements (a pass over Ψ); views and
    allocations are not passes."""
    FREE = ("view", "slice", "detach", "alias", "empty", "zeros", "select", "unsqueeze", "squeeze", "_reshape")

    def __init__(self, n):
        super().__init__()
        self.n, self.ops = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ts = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.numel() >= self.n for t in ts) and not any(f in str(func) for f in self.FREE):
            self.ops.append(str(func))
        return out


def test_a_compressed_step_makes_one_torch_pass_over_psi_besides_the_kernels():
    """Kernels built: the step's only aten passes over Ψ are the row norms (the worker's, and on one rank the
    server's, whose chunk is then all of Ψ); the rest are 3 kernel passes: momentum_error, pack_error,
    unpack_update = 16 + 8 + 16 bytes an element (its √v is torch.sqrt on 16384-element blocks, in cache), + 4 for
    the norm. The eager path makes ≥ 10 (the session-8
    step: mul, add, cat, add, norm, signbit, pack, copysign, sub, unpack, …)."""
    if not K.available():
        pytest.skip("no C++ compiler")
    n = 1 << 16
    w = torch.nn.Parameter(torch.randn(n))
    opt = OneBitAdam([w], freeze_step=1)
    w.grad = torch.randn(n)
    opt.step()
    with _Passes(n) as mode:
        opt.step()
    assert mode.ops == ["aten.linalg_vector_norm.default"] * 2, mode.ops
    ob = OneBitAdam([torch.nn.Parameter(torch.randn(n))], freeze_step=1)
    ob.param_groups[0]["params"][0].grad = torch.randn(n)
    ob.step()
    with _Passes(n) as mode:
        _old_onebit_step(ob, ob.param_groups[0]["params"])
    assert len(mode.ops) >= 14, mode.ops


def test_no_compiler_falls_back_to_the_eager_twins(monkeypatch):
    def fail(**kw):
        raise RuntimeError("no g++")
    monkeypatch.setattr(K, "load_inline", fail)
    monkeypatch.setattr(K, "_ext", None)
    monkeypatch.setattr(K, "_tried", False)
    with pytest.warns(UserWarning, match="eager path"):
        assert not K.available()
    x, st_new, st_old = _nasty(100, 1), {}, {}
    assert _same(compressed_mean(x, st_new, None), _old_compressed_mean(x, st_old))
    monkeypatch.setattr(K, "_tried", False)
    monkeypatch.setenv("PARALLEL_ONEBIT_KERNELS", "0")
    assert not K.available()


def _dp2_params(rank, world, stage, eager):
    """END steps of test_onebit_zero's 3-bucket MLP (stage 1–2: shards not multiples of 8, strided byte rows)."""
    import test_onebit_zero as oz

    from parallel.mesh import Mesh
    if eager:
        K._ext, K._tried = None, True
    g = Mesh(dp=world).group("dp")
    model, zero = oz._zero(stage, g)
    losses, _ = oz._steps(model, zero, g, 0, oz.END)
    return losses, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_dp2_zero_stages_kernels_equal_the_eager_twins(stage):
    from harness import run_ranks
    if not K.available():
        pytest.skip("no C++ compiler")
    fused, eager = run_ranks(_dp2_params, 2, stage, False), run_ranks(_dp2_params, 2, stage, True)
    for (lf, pf), (le, pe) in zip(fused, eager):
        assert lf == le and _same(pf, pe)


def test_a_stale_build_lock_is_removed_and_a_live_one_waited_for(tmp_path):
    """torch waits on its build lock forever: a build killed mid-way must not hang every later 1-bit run."""
    import os
    import threading
    import time
    import warnings

    lock = tmp_path / "lock"
    lock.write_text("")
    old = time.time() - K.STALE_LOCK_S - 10
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="stale build lock"):
        K.clear_stale_lock(str(lock))
    assert not lock.exists()

    lock.write_text("")                                   # a live build: released after 0.3 s, no warning
    threading.Timer(0.3, lock.unlink).start()
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K.clear_stale_lock(str(lock), poll_s=0.05)
    assert 0.25 < time.time() - t0 < 5 and not lock.exists()


def test_the_build_name_carries_the_cpu_flags():
    tag = K._cpu_tag()
    cap, digest = tag.rsplit("_", 1)
    assert cap == torch.backends.cpu.get_cpu_capability().lower() and len(digest) == 8
