"""Ring attention on torch's fused attention kernels (parallel/context_parallel/fused.py) against the fp32
row-chunked reference blocks (parallel/context_parallel/blocks.py): output and dq/dk/dv at cp = 1 and cp = 2 (fp32,
1e-5: causal, packed documents, a sliding window, both, a dense non-causal mask; GQA 4 query heads on 2 kv heads),
the bias path run a few query rows at a time, the fallback where no kernel fits, and GPT training at cp = 2 on the
fused path equal to one process. (The CUDA kernels and the host-sync check: benchmarks/gpu_check_cp.py.)"""
import torch
from engine_cases import config, train
from harness import run_ranks
from reference import assert_close_curve, reference_losses


def _cases(b, s):
    """name → (causal, docs given to the ring: None | Visibility)."""
    from parallel.context_parallel.masks import Visibility
    docs = torch.stack([torch.cumsum((torch.arange(s) % n == 0).long(), 0) for n in (5, 11)][:b])
    gen = torch.Generator().manual_seed(1)
    dense = (torch.rand(b, s, s, generator=gen) < 0.4) | torch.eye(s, dtype=torch.bool)
    return {"causal": (True, None), "documents": (True, Visibility(docs)), "window 3": (True, Visibility(window=3)),
            "documents + window 4": (True, Visibility(docs, 4)), "dense": (False, Visibility(allow=dense)),
            "full": (False, None)}


def _run(ql, kl, vl, dout, group, causal, vis, fused):
    from parallel.context_parallel import ring
    q, k, v = (t.clone().requires_grad_() for t in (ql, kl, vl))
    with ring.fused_blocks(fused):
        out = ring.ring_attention(q, k, v, group, causal, vis)
    out.backward(dout)                                 # the backward takes the path the forward chose
    return [out.detach(), q.grad, k.grad, v.grad]


def _compare(rank, world, dtype=torch.float32, bias_elems=None):
    """{case: max |fused − reference| over out, dq, dk, dv} and the number of fused block calls, on this rank."""
    from parallel.context_parallel import fused, shard
    from parallel.mesh import Mesh
    group = Mesh(cp=world).group("cp")
    b, h, hk, s, d = 2, 4, 2, 24, 8
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(b, h, s, d, generator=gen, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(b, hk, s, d, generator=gen, dtype=dtype) for _ in range(2))
    r = group.rank
    ql, kl, vl, dl = (shard(t, world, r, dim=2) for t in (q, k, v, dout))
    calls, real_f, real_b, old = [0, 0], fused.fused_forward, fused.fused_backward, fused.BIAS_ELEMS
    import parallel.context_parallel.ring as ring_mod

    def count(i, f):
        def wrapped(*a, **kw):
            calls[i] += 1
            return f(*a, **kw)
        return wrapped
    ring_mod.fused_forward, ring_mod.fused_backward = count(0, real_f), count(1, real_b)
    fused.BIAS_ELEMS = bias_elems or old
    try:
        errs = {}
        for name, (causal, vis) in _cases(b, s).items():
            want = _run(ql, kl, vl, dl, group, causal, vis, False)
            got = _run(ql, kl, vl, dl, group, causal, vis, True)
            errs[name] = max((a - w).abs().max().item() for a, w in zip(got, want))
    finally:
        ring_mod.fused_forward, ring_mod.fused_backward, fused.BIAS_ELEMS = real_f, real_b, old
    return errs, calls


def test_fused_ring_equals_reference_cp1_and_cp2():
    """Every block kind (diagonal causal, full, masked by documents / window / dense mask), GQA, fp32: 1e-5.
    Block calls per direction: cp = 1 one per case; cp = 2 two per rank (diagonal + one half block) — all fused."""
    for world in (1, 2):
        for errs, calls in run_ranks(_compare, world):
            assert len(errs) == 6 and max(errs.values()) < 1e-5, (world, errs)
            assert calls == [6 * world, 6 * world], (world, calls)


def test_fused_bias_path_in_row_chunks():
    """The masked (bias) blocks run ≤ 64 bias elements per kernel call (2·2 query rows at a time at cp = 2: many
    chunks, dK and dV summed over them): the same numbers."""
    for errs, _ in run_ranks(_compare, 2, bias_elems=64):
        assert max(errs.values()) < 1e-5, errs


def test_fused_falls_back_where_no_kernel_fits():
    """float64 has no fused kernel: the ring takes the reference blocks (bitwise the reference result)."""
    from parallel.context_parallel.fused import supported
    assert supported(torch.zeros(1, 1, 4, 8, dtype=torch.float64)) == "dtype torch.float64"
    for errs, calls in run_ranks(_compare, 1, torch.float64):
        assert calls == [0, 0] and max(errs.values()) == 0.0, (errs, calls)


def _train_fused(rank, world, overrides, on):
    from parallel.context_parallel import ring
    with ring.fused_blocks(on):
        losses, engine = train(rank, world, "gpt", overrides)
    return losses, engine.mesh.stats.total("cp")


def test_gpt_cp2_fused_trains_like_one_process():
    """GPT, 2 steps of 2 micro-batches of 4 × 16 tokens, 2 layers, ring at cp = 2 on the fused blocks: the losses
    of one process (1e-5), and the same ring traffic as the reference blocks (the blocks change, not the ring)."""
    small = ["train.steps=2", "data.micro_batch_size=4", "model.kwargs.n_layer=2", "parallel.cp=2",
             "parallel.cp_algorithm=ring"]
    want = reference_losses(config("gpt", small[:3]))
    fused, ref = run_ranks(_train_fused, 2, small, True), run_ranks(_train_fused, 2, small, False)
    for (lf, tf), (lr, tr) in zip(fused, ref):
        assert_close_curve(lr, want, 1e-5, "gpt cp2 ring, reference blocks")
        assert_close_curve(lf, want, 1e-5, "gpt cp2 ring, fused blocks")
        assert tf == tr > 0


def test_cuda_kernel_calls_check_on_meta_tensors():
    """The CUDA branch (flash for bf16 without a mask, memory-efficient for fp32 or with a bias: lse padded to 32
    rows, bias padded to 16 columns, the forward's bookkeeping outputs passed to the backward) run on meta tensors:
    torch's meta kernels check every argument's type and shape, so a signature drift fails here without a GPU."""
    from parallel.context_parallel import fused
    b, h, hk, n, d = 2, 4, 2, 40, 16
    allow = torch.ones(1, n, n, dtype=torch.bool, device="meta")
    for dtype in (torch.float32, torch.bfloat16):
        q, dout = (torch.empty(b, h, n, d, device="meta", dtype=dtype) for _ in range(2))
        k, v = (torch.empty(b, hk, n, d, device="meta", dtype=dtype) for _ in range(2))
        for kind in ("causal", "full", "masked"):
            o, lse = fused.fused_forward(q, k, v, kind, lambda r: allow[:, r], 0.25)
            assert (o.shape, lse.shape) == ((b, hk, h // hk, n, d), (b, hk, h // hk, n)), kind
            out = o.reshape(b, h, n, d).to(dtype)
            lse = lse.reshape(b, h, n)
            dq, dk, dv = fused.fused_backward(q, k, v, kind, lambda r: allow[:, r], 0.25, dout, out, lse)
            assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape), kind
            assert dq.dtype == dk.dtype == torch.float32
    assert {(f, t) for _, f, t in fused._EXTRAS} >= {(True, torch.bfloat16), (False, torch.float32)}


def _host_reads(rank, world):
    """The aten ops of a ring forward + backward (documents, GQA) that read a tensor's value on the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from parallel.context_parallel import ring, shard
    from parallel.context_parallel.masks import Visibility
    from parallel.mesh import Mesh
    syncing = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2",
               "equal", "allclose", "tolist"}

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))
    group = Mesh(cp=world).group("cp")
    b, h, hk, s, d = 2, 4, 2, 24, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(b, n, s, d, generator=gen) for n in (h, hk, hk, h))
    docs = Visibility(torch.stack([torch.cumsum((torch.arange(s) % n == 0).long(), 0) for n in (5, 11)]), 9)
    ql, kl, vl, dl = (shard(t, world, group.rank, dim=2).requires_grad_(t is not dout) for t in (q, k, v, dout))
    out = {}
    for on in (False, True):
        with ring.fused_blocks(on), Record() as rec:
            ring.ring_attention(ql, kl, vl, group, True, docs).backward(dl)
        out[on] = sorted(rec.seen & syncing), len(rec.seen)
    return out


def test_ring_reads_no_tensor_on_the_host():
    """Both block paths at cp = 2, documents + window: no op of the forward or backward reads a value on the host
    (.item(), bool(tensor), nonzero, …: each a host sync per block on CUDA; the CUDA-side check is
    benchmarks/gpu_check_cp.py under torch.cuda.set_sync_debug_mode)."""
    for res in run_ranks(_host_reads, 2):
        for on, (bad, n_ops) in res.items():
            assert bad == [] and n_ops > 10, (on, bad, n_ops)
