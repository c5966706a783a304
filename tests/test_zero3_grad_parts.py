"""ZeRO-3 over two ranks reduce-scatters straight from ``p.grad`` (parallel/data_parallel/grad_parts.py,
parallel/comm/ring_parts.py): no gradient is copied into a flat buffer (issue 18: 4Ψ bytes a step and rank that
FSDP2 copies too), and every number is bitwise the flat path's.

* the parts ring equals the flat ring bitwise, for parts cut at odd places and more than 64 messages (tag blocks);
* small neighbouring pieces share a message: a GPT block's reduce-scatter posts 6 + 4 messages, not 9 + 4;
* a GPT trained with ZeRO-3 at dp = 2 on the ring: the bytes written by ``copy_`` outside the parameter
  gathers are a few scalars a step (the flat path: 4Ψ more, every gradient copied once), no full-gradient
  buffer is allocated, and losses and updated shards are bitwise those of the flat path (and one process's
  to 1e-5).
"""
import torch
from harness import run_ranks
from test_zero import OPTS, assert_curve, reference_run
from test_zero import train as zero_train

from parallel.config import ZeroConfig

KW = dict(vocab_size=64, seq_len=16, n_layer=3, n_head=4, n_embd=64)
G, STEPS = 8, 4


def _ring_parts(rank, world):
    from parallel.comm import ring
    from parallel.comm.ring_parts import ring_reduce_scatter_parts
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    sizes = [7, 1, 300, 129, 5, 2000, 33, 1]                # 2476 elements, halves cut inside parts
    gen = torch.Generator().manual_seed(rank)
    parts = [torch.randn(n, generator=gen) for n in sizes]
    full = torch.cat(parts)
    old, ring.SUB_BYTES = ring.SUB_BYTES, 4 * 16            # 16-element messages: > 64 of them per half
    try:
        want = torch.empty(full.numel() // 2)
        ring.ring_reduce_scatter(want, full.clone(), g)
        got = torch.empty_like(want)
        ring_reduce_scatter_parts(got, parts, g)
    finally:
        ring.SUB_BYTES = old
    return torch.equal(got, want), torch.equal(torch.cat(parts), full)


def test_parts_ring_equals_flat_ring_bitwise():
    for same, untouched in run_ranks(_ring_parts, 2):
        assert same and untouched


def _block_messages(rank, world):
    import torch.distributed as dist

    from parallel.comm import ring
    from parallel.comm.ring_parts import ring_reduce_scatter_parts
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    h = 256                                                  # a GPT block's gradients, in its parameter order
    sizes = [h, h, 3 * h * h, 3 * h, h * h, h, h, h, 4 * h * h, 4 * h, 4 * h * h, h]
    gen = torch.Generator().manual_seed(rank)
    parts = [torch.randn(n, generator=gen) for n in sizes]
    want = torch.empty(sum(sizes) // 2)
    ring.ring_reduce_scatter(want, torch.cat(parts), g)
    count = {"isend": 0, "irecv": 0}
    isend, irecv = dist.isend, dist.irecv

    def counted(name, fn):
        def f(*a, **k):
            count[name] += 1
            return fn(*a, **k)
        return f
    dist.isend, dist.irecv = counted("isend", isend), counted("irecv", irecv)
    try:
        got = torch.empty_like(want)
        ring_reduce_scatter_parts(got, parts, g)
    finally:
        dist.isend, dist.irecv = isend, irecv
    return count, torch.equal(got, want)


def test_small_pieces_share_a_message():
    """Rank 0's half holds ln1, qkv, attn proj, ln2 and part of fc: 9 pieces, 6 messages once the small neighbours
    ([ln1.w, ln1.b], [qkv.b], [proj.b, ln2.w, ln2.b]) travel together; rank 1's 4 pieces stay 4 messages."""
    res = run_ranks(_block_messages, 2)
    assert [c for c, _ in res] == [{"isend": 4, "irecv": 6}, {"isend": 6, "irecv": 4}], res
    assert all(same for _, same in res)                      # bitwise the flat ring


def _model():
    from examples.gpt import GPT
    torch.manual_seed(0)
    return GPT(**KW)


class _Copies(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes written by ``copy_`` into a unit's gathered flat parameter (the gathers' own shard) and elsewhere."""

    def __init__(self, flats):
        super().__init__()
        self.flats, self.gather, self.other = flats, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "copy_":
            n = args[0].numel() * args[0].element_size()
            if args[0].untyped_storage().data_ptr() in {f.untyped_storage().data_ptr() for f in self.flats}:
                self.gather += n
            else:
                self.other += n
        return func(*args, **(kwargs or {}))


def _train(rank, world, from_grads):
    from parallel.comm import ring
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    old, ring.MIN_BYTES = ring.MIN_BYTES, 0                 # every collective on the ring
    try:
        g = Mesh(dp=world).group("dp")
        model = _model()
        zero = ZeroOptimizer(model, OPTS["adamw"], g, ZeroConfig(stage=3), unit_types=(type(model.blocks[0]),))
        zero.reducer.from_grads = from_grads
        zero.reducer.fuse_div = from_grads        # the flat path as before: copy, then divide (data_parallel/fused_div)
        losses, other, gather = [], [], []
        for t in range(STEPS):
            with _Copies([u.flat_param for u in zero.stage3.units]) as c:
                losses += zero_train(zero, model, g, G, 1, start=t)[0]
            other.append(c.other)
            gather.append(c.gather)
        psi = sum(u.numel for u in zero.stage3.units)                    # (the params are freed: 0 elements)
        return dict(losses=losses, other=other, gather=gather, psi=psi, allocated=zero.reducer.buffers["allocated"],
                    shards=[b.master.clone() for b in zero._all],
                    ref=reference_run(None, "adamw", STEPS, G, model=_model())[0] if rank == 0 else None)
    finally:
        ring.MIN_BYTES = old


def test_zero3_reduces_from_grads_without_copies_and_bitwise():
    parts = run_ranks(_train, 2, True)
    flat = run_ranks(_train, 2, False)
    for p, f in zip(parts, flat):
        assert p["losses"] == f["losses"]                                   # bitwise
        assert all(torch.equal(a, b) for a, b in zip(p["shards"], f["shards"]))
        # no gradient copied (what is left: a few scalars of the norm's bookkeeping); the flat path copied each
        assert max(p["other"]) <= 64, p["other"]                           # gradient once: 4Ψ bytes more
        assert [a - b for a, b in zip(f["other"], p["other"])] == [4 * f["psi"]] * STEPS, (f["other"], p["other"])
        assert p["gather"] == f["gather"]
        assert p["allocated"] == 0 and f["allocated"] >= 1
    got = [sum(r["losses"][i] for r in parts) / 2 for i in range(STEPS)]
    assert_curve(got, parts[0]["ref"], 1e-5, "zero3 dp2, reduce-scatter from p.grad")
