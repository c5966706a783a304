"""1-bit Adam (arXiv 2102.02888) over dp: the compressed momentum with error feedback, the wire bytes
after warm-up (≤ 1/16 of Adam's, asserted from CommStats) and convergence on a small character
LM (seed 0: the loss after 60 steps within 2% of Adam's)."""
import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks

from parallel.optim.onebit_adam import OneBitAdam, _compress, _pack, _unpack, compressed_mean

G, STEPS, FREEZE, LR = 16, 60, 15, 3e-3


def test_signs_pack_8_to_a_byte_and_error_feedback_tracks_the_sum():
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    packed = _pack(torch.signbit(x))                  # the compressor packs sign bits: set = negative
    assert packed.dtype == torch.uint8 and packed.shape == (3, 8)
    assert torch.equal(_unpack(packed), torch.where(x >= 0, 1.0, -1.0))
    assert [int(b) for b in _pack(torch.tensor([[True] + [False] * 7 + [False] * 7 + [True]]))[0]] == [1, 128]
    p, scale, approx = _compress(x)                   # what travels and what the worker subtracts agree
    assert torch.equal(p, packed) and torch.equal(approx, _unpack(p) * scale.unsqueeze(-1))
    # error feedback telescopes: Σ_t out_t = Σ_t x_t − e_worker − e_server (one worker), so nothing is lost
    st, xs, outs = {}, [torch.randn(100) for _ in range(200)], []
    for v in xs:
        outs.append(compressed_mean(v, st, None))
    torch.testing.assert_close(sum(outs), sum(xs) - st["worker_error"][:100] - st["server_error"][:100],
                               rtol=0, atol=1e-4)
    assert (sum(outs) - sum(xs)).norm() < 0.1 * sum(xs).norm()
    assert 1 - F.cosine_similarity(outs[-1], xs[-1], 0) > 0.01      # each single output is lossy


@pytest.mark.parametrize("bound", [None, "adam", 0.5])
def test_update_bound_guards_elements_whose_frozen_v_is_zero(bound):
    """Elements with no gradient in warm-up (v = 0) get ±(chunk scale) from the sign compression; divided by
    √v̂ + ε ≈ 1e-8 that moved them by ~1e5 in 35 steps. With the bound R (default Adam's max(1, (1−β1)/√(1−β2))
    = 3.162…) every compressed step moves an element by at most η·R."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64) * 0.1)
    lr, steps, freeze = 1e-3, 40, 5
    opt = OneBitAdam([w], lr=lr, freeze_step=freeze, update_bound=bound)
    R = {None: None, "adam": (1 - 0.9) / (1 - 0.999) ** 0.5, 0.5: 0.5}[bound]
    assert opt.param_groups[0]["update_bound"] == pytest.approx(R) if R else opt.param_groups[0]["update_bound"] is None
    tgt, w0 = torch.randn(32), w.detach().clone()
    prev = w0.clone()
    for t in range(steps):
        opt.zero_grad()
        ((w[:32] - tgt) ** 2).sum().backward()                    # w[32:] never gets a gradient
        opt.step()
        if R is not None and t >= freeze:
            assert (w.detach() - prev).abs().max() <= lr * R * (1 + 1e-5)
        prev = w.detach().clone()
    drift = (w[32:] - w0[32:]).abs().max().item()
    if bound is None:
        assert drift > 1e3                                         # the hazard, unguarded
    else:
        assert drift <= (steps - freeze) * lr * R
    assert ((w[:32] - tgt) ** 2).sum() < ((w0[:32] - tgt) ** 2).sum()     # it still learns
    with pytest.raises(ValueError, match="update_bound"):
        OneBitAdam([w], update_bound=-1.0)


def _lm_run(rank, world, opt_name, stage=0, lr=LR, **okw):
    from examples.gpt import GPT, char_dataset
    from parallel.comm import CommStats
    from parallel.config import ZeroConfig
    from parallel.mesh import Mesh
    from parallel.zero import ZeroOptimizer
    g = Mesh(dp=world).group("dp")
    data = char_dataset(seq_len=32)
    torch.manual_seed(0)
    model = GPT(vocab_size=96, seq_len=32, n_layer=2, n_head=4, n_embd=32)
    from parallel.optim.lamb import Lamb
    from parallel.optim.onebit_lamb import OneBitLamb
    from parallel.optim.zero_one_adam import ZeroOneAdam
    factory = {"adam": lambda ps: torch.optim.Adam(ps, lr=lr),
               "onebit": lambda ps: OneBitAdam(ps, lr=lr, freeze_step=FREEZE),
               "onebit-unbounded": lambda ps: OneBitAdam(ps, lr=lr, freeze_step=FREEZE, update_bound=None),
               "lamb": lambda ps: Lamb(ps, lr=lr),
               "onebit_lamb": lambda ps: OneBitLamb(ps, lr=lr, **{"freeze_step": FREEZE, **okw}),
               "zero_one": lambda ps: ZeroOneAdam(ps, lr=lr, **okw)}[opt_name]
    zero = ZeroOptimizer(model, factory, g, ZeroConfig(stage=stage, bucket_mb=1.0))
    per = G // world
    losses, wire = [], []
    for t in range(STEPS):
        idx = range(t * G + rank * per, t * G + (rank + 1) * per)
        x = torch.stack([data[i][0] for i in idx])
        y = torch.stack([data[i][1] for i in idx])
        before = g.stats.snapshot()
        zero.zero_grad()
        zero.prepare_step(1)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        zero.step()
        d = CommStats.diff(g.stats.snapshot(), before).get("dp", {})
        wire.append(sum(v["wire_bytes"] for v in d.values()))
        t_loss = torch.tensor([loss.item()])
        torch.distributed.all_reduce(t_loss)
        losses.append(t_loss.item() / world)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    same = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(same, flat)
    return losses, wire, zero.num_params, all(torch.equal(s, flat) for s in same), flat.abs().max().item()


@pytest.mark.slow
def test_dp2_bytes_and_convergence_against_adam():
    adam = run_ranks(_lm_run, 2, "adam")[0]
    onebit = run_ranks(_lm_run, 2, "onebit")[0]
    psi = adam[2]
    assert adam[1][-1] == pytest.approx(2 * 1 / 2 * 4 * psi, rel=0.01)      # Adam: all-reduce 2(N−1)/N·4Ψ
    assert onebit[1][:FREEZE] == pytest.approx(adam[1][:FREEZE])           # warm-up: the same all-reduce
    after = onebit[1][FREEZE + 1:]
    assert max(after) <= adam[1][-1] / 16, (max(after), adam[1][-1])
    assert max(after) == pytest.approx(adam[1][-1] / 32, rel=0.05)          # 1/32 + scales and padding
    a, o = sum(adam[0][-5:]) / 5, sum(onebit[0][-5:]) / 5
    print(f"\n1-bit Adam dp=2: wire bytes/step Adam {adam[1][-1]:.0f}, 1-bit {max(after):.0f} "
          f"(ratio 1/{adam[1][-1] / max(after):.1f}); loss (mean of steps {STEPS - 4}-{STEPS}) Adam {a:.4f}, "
          f"1-bit {o:.4f} ({(o - a) / a:+.2%}); first loss {adam[0][0]:.4f}; max |w| Adam {adam[4]:.3f}, 1-bit "
          f"{onebit[4]:.3f}")
    assert onebit[4] < 3 * adam[4]             # update_bound: no element runs away (unguarded: |w| ~ 1e3-1e4)
    assert abs(o - a) <= 0.02 * a, (o, a)
    assert a < 0.8 * adam[0][0]                                            # it really learned


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_dp2_zero12_bytes_and_convergence_against_adam(stage):
    """1-bit Adam on the ZeRO partition (parallel/zero/onebit.py) vs Adam at the same stage, seed 0."""
    adam = run_ranks(_lm_run, 2, "adam", stage)[0]
    onebit = run_ranks(_lm_run, 2, "onebit", stage)[0]
    zero0 = run_ranks(_lm_run, 2, "onebit", 0)[0]
    assert onebit[0] == zero0[0]          # one bucket, shard a multiple of 8: the same chunks as stage 0, bit for bit
    assert onebit[1][:FREEZE] == pytest.approx(adam[1][:FREEZE])            # warm-up: ZeRO's own traffic
    after = onebit[1][FREEZE + 1:]                                           # step FREEZE starts μ_i (one gather)
    assert max(after) <= adam[1][-1] / 16, (max(after), adam[1][-1])
    assert onebit[3], "the replicas' parameters differ after compressed steps"
    a, o = sum(adam[0][-5:]) / 5, sum(onebit[0][-5:]) / 5
    print(f"\n1-bit Adam dp=2 ZeRO-{stage}: wire bytes/step Adam {adam[1][-1]:.0f}, 1-bit {max(after):.0f} "
          f"(ratio 1/{adam[1][-1] / max(after):.1f}); loss (mean of steps {STEPS - 4}-{STEPS}) Adam {a:.4f}, "
          f"1-bit {o:.4f} ({(o - a) / a:+.2%})")
    assert abs(o - a) <= 0.02 * a, (o, a)
    assert a < 0.8 * adam[0][0]
