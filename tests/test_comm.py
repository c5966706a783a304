"""Counted collectives: values and exact CommStats byte counts at world sizes 2 and 4."""
import pytest
import torch
from harness import run_ranks


def _collectives(rank, world):
    from parallel import comm
    from parallel.mesh import Mesh
    m = Mesh(dp=world)
    g = m.group("dp")
    out = {}
    t = torch.full((6, 4), float(rank + 1))                       # 96 bytes
    comm.all_reduce(t, g)
    out["all_reduce"] = t[0, 0].item()
    x = torch.full((3, 2), float(rank))                           # gathered: world*24 bytes
    out["all_gather"] = comm.all_gather(x, g).tolist()
    y = torch.arange(4 * world * 2, dtype=torch.float32).reshape(4 * world, 2) * (rank + 1)
    out["reduce_scatter"] = comm.reduce_scatter(y, g).tolist()     # input: world*32 bytes
    z = torch.arange(5.0) if rank == 0 else torch.zeros(5)
    out["broadcast"] = comm.broadcast(z, g).tolist()              # 20 bytes
    d = torch.arange(6.0).reshape(2, 3) * (rank + 1)
    out["gather_dim1"] = comm.all_gather(d, g, dim=1).shape
    out["stats"] = m.stats.snapshot()["dp"]
    # p2p with a header: the receiver gives no shape or dtype.
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    w = comm.isend(torch.arange(rank + 3, dtype=torch.bfloat16).reshape(1, -1), nxt, m.group("world"))
    got = comm.recv(prv, m.group("world"))
    w.wait()
    out["p2p"] = (tuple(got.shape), str(got.dtype), got.float().tolist())
    out["p2p_stats"] = m.stats.snapshot()["world"]
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_collective_values_and_counts(world):
    res = run_ranks(_collectives, world)
    n = world
    for rank, r in enumerate(res):
        assert r["all_reduce"] == sum(range(1, n + 1))
        assert r["all_gather"] == [[float(k)] * 2 for k in range(n) for _ in range(3)]
        full = torch.arange(4 * n * 2, dtype=torch.float32).reshape(4 * n, 2) * sum(range(1, n + 1))
        assert r["reduce_scatter"] == full[4 * rank:4 * rank + 4].tolist()
        assert r["broadcast"] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert tuple(r["gather_dim1"]) == (2, 3 * n)
        s = r["stats"]
        # all-reduce of M = 96 bytes: 2(N-1)/N * M
        assert s["all_reduce"] == {"calls": 1, "payload_bytes": 96, "wire_bytes": 2 * (n - 1) / n * 96, "meta_bytes": 0}
        # two all-gathers: 3x2 fp32 -> M = 24N bytes, and 2x3 fp32 -> M = 24N bytes; (N-1)/N * M each
        assert s["all_gather"] == {"calls": 2, "payload_bytes": 48 * n, "wire_bytes": 2 * (n - 1) / n * 24 * n,
                                   "meta_bytes": 0}
        # reduce-scatter of M = 4N*2*4 = 32N bytes: (N-1)/N * M
        assert s["reduce_scatter"] == {"calls": 1, "payload_bytes": 32 * n, "wire_bytes": (n - 1) / n * 32 * n,
                                       "meta_bytes": 0}
        assert s["broadcast"] == {"calls": 1, "payload_bytes": 20, "wire_bytes": (n - 1) / n * 20, "meta_bytes": 0}
        prv = (rank - 1) % n
        assert r["p2p"] == ((1, prv + 3), "torch.bfloat16", [list(map(float, range(prv + 3)))])
        sent = 2 * (rank + 3)                                     # bf16 payload; header is meta only
        assert r["p2p_stats"]["send"] == {"calls": 1, "payload_bytes": sent, "wire_bytes": sent, "meta_bytes": 80}
        assert r["p2p_stats"]["recv"]["wire_bytes"] == 0
        assert r["p2p_stats"]["recv"]["payload_bytes"] == 2 * (prv + 3)


def _megatron_ops(rank, world):
    from parallel import comm
    from parallel.mesh import Mesh
    m = Mesh(tp=world)
    g = m.group("tp")
    x = torch.ones(2, 4 * world, 3, requires_grad=True)
    # f then a rank-dependent scale: backward all-reduces the gradient -> sum of scales.
    (comm.copy_to_group(x, g) * (rank + 1)).sum().backward()
    f_grad = x.grad[0, 0, 0].item()
    # g: forward sums over ranks, backward is identity.
    y = torch.full((2,), float(rank), requires_grad=True)
    z = comm.reduce_from_group(y, g)
    z.sum().backward()
    # sequence-parallel pair: reduce-scatter along dim 1 then all-gather back.
    s = torch.ones(2, 4 * world, 3, requires_grad=True)
    part = comm.reduce_scatter_to_seq(s, g, dim=1)
    back = comm.all_gather_to_seq(part, g, dim=1)
    back.sum().backward()
    return f_grad, z.tolist(), y.grad.tolist(), tuple(part.shape), back[0, 0, 0].item(), s.grad[0, 0, 0].item()


def test_megatron_operators():
    res = run_ranks(_megatron_ops, 2)
    for f_grad, z, ygrad, pshape, bval, sgrad in res:
        assert f_grad == 3.0
        assert z == [1.0, 1.0] and ygrad == [1.0, 1.0]
        assert pshape == (2, 4, 3)
        assert bval == 2.0          # reduce-scatter sums the two ranks' ones
        assert sgrad == 2.0         # backward: reduce-scatter of ones (sum 2), then all-gather
