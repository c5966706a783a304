"""Tensor-parallel layers against their one-process twins (fp32, gloo CPU ranks, tp = 2 and 4).

Tolerance: max|a − b| ≤ 1e-5 · max|b| per tensor (outputs and every gradient). Counts are exact.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_ranks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

B, S, H, V = 2, 16, 32, 64
F32 = 4


def close(a, b, tol=1e-5):
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def _fake_group(size, rank=0):
    from parallel.comm import Group
    return Group(None, "tp", tuple(range(size)), rank)


class MaxAlloc(TorchDispatchMode):
    """Records the largest tensor (in elements) that any op returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.max, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.max:
                self.max, self.op = t.numel(), str(func)
        return out


def _mlp(rank, world, sp):
    from parallel.mesh import Mesh
    from parallel.parameters import ParamInfo, param_info
    from parallel.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, shard_tensor
    m = Mesh(tp=world)
    g = m.group("tp")
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(H, 4 * H), nn.GELU(), nn.Linear(4 * H, H))
    torch.manual_seed(0)                       # the layers draw their full weights as nn.Linear does
    fc = ColumnParallelLinear(H, 4 * H, g, sequence_parallel=sp)
    proj = RowParallelLinear(4 * H, H, g, sequence_parallel=sp)
    x = torch.randn(B, S, H, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.randn(B, S, H, generator=torch.Generator().manual_seed(2))
    y_ref = ref(x)
    (y_ref * w).sum().backward()
    xs = (x.detach().chunk(world, 1)[rank] if sp else x.detach()).clone().requires_grad_()
    ws = w.chunk(world, 1)[rank] if sp else w
    before = m.stats.snapshot()
    y = proj(F.gelu(fc(xs)))
    (y * ws).sum().backward()                  # with sp each rank's loss covers its tokens; the sum is the total
    counts = m.stats.diff(m.stats.snapshot(), before).get("tp", {})
    close(y, y_ref.chunk(world, 1)[rank] if sp else y_ref)
    close(xs.grad, x.grad.chunk(world, 1)[rank] if sp else x.grad)
    close(fc.weight.grad, shard_tensor(ref[0].weight.grad, 0, world, rank))
    close(fc.bias.grad, shard_tensor(ref[0].bias.grad, 0, world, rank))
    close(proj.weight.grad, shard_tensor(ref[2].weight.grad, 1, world, rank))
    close(proj.bias.grad, ref[2].bias.grad)
    assert (param_info(fc.weight).tp_dim, param_info(fc.bias).tp_dim, param_info(proj.weight).tp_dim) == (0, 0, 1)
    assert param_info(proj.bias) == ParamInfo()                   # replicated: the defaults
    return {op: (c["calls"], c["payload_bytes"]) for op, c in counts.items()}


@pytest.mark.parametrize("world", [2, 4])
def test_mlp_matches_one_process(world):
    act = B * S * H * F32                       # b·s·h activation bytes
    # Megatron: one all-reduce of b·s·h forward (g after the row layer), one backward (f before the column layer).
    for c in run_ranks(_mlp, world, False):
        assert c == {"all_reduce": (2, 2 * act)}
    # Sequence parallel: f̄ = all-gather fwd / reduce-scatter bwd, ḡ = reduce-scatter fwd / all-gather bwd,
    # plus the row bias gradient (added on the sequence shard) all-reduced: h floats.
    for c in run_ranks(_mlp, world, True):
        assert c == {"all_gather": (2, 2 * act), "reduce_scatter": (2, 2 * act), "all_reduce": (1, H * F32)}


def _gather_and_embedding(rank, world, sp):
    from parallel import comm
    from parallel.mesh import Mesh
    from parallel.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, shard_tensor
    m = Mesh(tp=world)
    g = m.group("tp")
    torch.manual_seed(3)
    ref_lin, ref_emb = nn.Linear(H, 2 * H), nn.Embedding(V, H, padding_idx=V - 1)
    torch.manual_seed(3)
    lin = ColumnParallelLinear(H, 2 * H, g, gather_output=True)
    emb = VocabParallelEmbedding(V, H, g, padding_idx=V - 1, sequence_parallel=sp)
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(4))
    ids[0, :3] = V - 1                                          # padding tokens: no gradient to that row
    w = torch.randn(B, S, 2 * H, generator=torch.Generator().manual_seed(5))
    (ref_lin(ref_emb(ids)) * w).sum().backward()
    e = emb(ids)                                                # seq-sharded when sp
    e = comm.gather_from_seq(e, g, 1) if sp else e              # back to the full sequence for the linear
    y = lin(e)
    close(y, ref_lin(ref_emb(ids)))
    (y * w).sum().backward()
    close(lin.weight.grad, shard_tensor(ref_lin.weight.grad, 0, world, rank))
    close(emb.weight.grad, shard_tensor(ref_emb.weight.grad, 0, world, rank))
    close(emb.weight.detach(), shard_tensor(ref_emb.weight.detach(), 0, world, rank))
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_gather_output_and_vocab_embedding(world):
    assert all(run_ranks(_gather_and_embedding, world, False))
    assert all(run_ranks(_gather_and_embedding, world, True))


def _cross_entropy(rank, world):
    from parallel.mesh import Mesh
    from parallel.tensor_parallel import vocab_parallel_cross_entropy
    m = Mesh(tp=world)
    g = m.group("tp")
    full = torch.randn(B, S, V, generator=torch.Generator().manual_seed(6)) * 3
    t = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(7))
    t[1, ::3] = -100                                            # ignored tokens
    ref_logits = full.clone().requires_grad_()
    shard = full.chunk(world, -1)[rank].clone().requires_grad_()
    with MaxAlloc() as serial:
        ref = F.cross_entropy(ref_logits.view(-1, V), t.view(-1))
        ref.backward()
    before = m.stats.snapshot()
    with MaxAlloc() as par:
        loss = vocab_parallel_cross_entropy(shard, t, g)
        loss.backward()
    counts = m.stats.diff(m.stats.snapshot(), before)["tp"]
    close(loss, ref)
    close(shard.grad, ref_logits.grad.chunk(world, -1)[rank])
    return serial.max, par.max, par.op, {op: (c["calls"], c["payload_bytes"]) for op, c in counts.items()}


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_cross_entropy(world):
    for serial_max, par_max, op, counts in run_ranks(_cross_entropy, world):
        assert serial_max >= B * S * V                          # the recorder sees the full logits serially …
        assert par_max <= B * S * V // world, (par_max, op)     # … and never more than b·s·V/p in parallel
        # max, then [target logit, sum-exp] stacked: 2 all-reduces of b·s and 2·b·s floats, none backward
        assert counts == {"all_reduce": (2, 3 * B * S * F32)}


def test_shard_tensor_sections():
    from parallel.tensor_parallel.layers import shard_tensor
    full = torch.arange(12.0)                                   # [q0 q1 q2 q3 | k0 k1 | v0 v1] sizes 4,4,4
    assert shard_tensor(full, 0, 2, 1, sections=[4, 4, 4]).tolist() == [2, 3, 6, 7, 10, 11]
    assert shard_tensor(full, 0, 2, 0, sections=[8, 2, 2]).tolist() == [0, 1, 2, 3, 8, 10]
    assert shard_tensor(full.view(3, 4), 1, 2, 1).tolist() == [[2, 3], [6, 7], [10, 11]]


def test_layer_errors():
    from parallel.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    g4 = _fake_group(4)
    with pytest.raises(ValueError, match=r"out_features = 30 is not divisible by tp = 4"):
        ColumnParallelLinear(32, 30, g4)
    with pytest.raises(ValueError, match=r"in_features = 30 is not divisible by tp = 4"):
        RowParallelLinear(30, 32, g4)
    row = RowParallelLinear(32, 8, g4)          # a user plan's lone 'rowwise' got the full width: named, was
    with pytest.raises(ValueError, match=r"last dim 8, but got \(2, 5, 32\) — the full, replicated width: the "
                                         r"module feeding it is not column-parallel"):     # "mat1 and mat2 shapes"
        row(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match=r"last dim 8, but got \(2, 5\): check the parallel.tp_plan"):
        row(torch.randn(2, 5))
    emb = VocabParallelEmbedding(66, 8, _fake_group(4, 3))       # padded to 68: rank 3 holds rows 51..65 + 2 zeros
    assert emb.weight.shape == (17, 8) and emb.vocab_start == 51 and not emb.weight[15:].any()
    head = ColumnParallelLinear(8, 66, _fake_group(4, 3), pad_vocab=True)
    assert head.weight.shape == (17, 8) and head.valid_local == 15 and not head.weight[15:].any()
    assert not head.bias[15:].any()
    with pytest.raises(ValueError, match=r"sections \(4, 4\) do not sum"):
        ColumnParallelLinear(8, 12, g4, sections=[4, 4])
    with pytest.raises(TypeError, match="not Conv2d"):
        ColumnParallelLinear.from_module(nn.Conv2d(1, 1, 1), g4)
    from parallel.tensor_parallel.layers import seq_scatter  # entering SP: the full sequence splits over tp
    with pytest.raises(ValueError, match=r"sequence length 7 .* not divisible by tp = 2"):
        seq_scatter(torch.randn(1, 7, 8), _fake_group(2))      # (a column layer's all-gather takes any chunk)
    from parallel.tensor_parallel import vocab_parallel_cross_entropy
    with pytest.raises(ValueError, match=r"logits shard \(2, 3, 8\) and targets \(2, 4\) disagree"):
        vocab_parallel_cross_entropy(torch.randn(2, 3, 8), torch.zeros(2, 4, dtype=torch.long), g4)


def _inplace_after_mappings(rank, world):
    """A model's own in-place update of an f/g output (Falcon's ``mlp_output += attention_output``)
    works, leaves the input untouched, and gives the gradients of the same out-of-place code."""
    from parallel import comm
    from parallel.mesh import Mesh
    g = Mesh(tp=world).group("tp")
    out = {}
    for inplace in (False, True):
        x = torch.arange(1.0, 1.0 + B * S * H).reshape(B, S, H).mul(rank + 1).requires_grad_()
        h = x * 2.0                                     # a non-leaf, as a layer's partial output is
        before = h.detach().clone()
        y = comm.reduce_from_group(h, g)
        s = comm.scatter_to_seq(h, g, dim=1)
        if inplace:
            y += 1.0
            s *= 3.0
        else:
            y, s = y + 1.0, s * 3.0
        assert torch.equal(h.detach(), before)          # the input was not modified
        (y.square().sum() + s.sum()).backward()
        out[inplace] = (y.detach(), s.detach(), x.grad)
    for a, b in zip(out[False], out[True]):
        assert torch.equal(a, b)
    full = sum(torch.arange(1.0, 1.0 + B * S * H).reshape(B, S, H) * 2.0 * (r + 1) for r in range(world))
    assert torch.equal(out[True][0], full + 1.0)        # the all-reduce's value, then the update
    return True


@pytest.mark.parametrize("world", [2])
def test_mapping_outputs_are_safe_to_modify_in_place(world):
    assert run_ranks(_inplace_after_mappings, world) == [True] * world
