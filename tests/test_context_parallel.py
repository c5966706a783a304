"""Context parallelism (issue 23): ring attention and Ulysses reproduce one process's attention and
training to 1e-5 (fp32), and move exactly the bytes their theory says.

Default suite (world 2): both algorithms at the attention level (causal and packed documents, GQA,
forward and backward, wire bytes asserted), GPT training at cp=2 with both algorithms, config errors
and the dry run. Slow: cp=4, cp2×dp2 (ZeRO-1), cp2×tp2, the HF Llama (registered attention function),
and packed documents through the Llama against transformers' own packed-sequence masking.
"""
import pytest
import torch
from engine_cases import config, train
from harness import run_ranks
from reference import assert_close_curve, reference_losses

from parallel.config import ConfigError
from parallel.mesh import coords_of, rank_of


def _packed_positions(b, s):
    """Position ids restarting at document starts, different per row (synthetic packed batch)."""
    rows, lengths = [], [[5, s - 5], [3, s // 2 - 3, s - s // 2]]
    for i in range(b):
        rows.append(torch.cat([torch.arange(n) for n in lengths[i % 2]]))
    return torch.stack(rows)


def _reference_attention(q, k, v, pos):
    """Plain softmax attention, causal, within documents when ``pos`` restarts (the math, no tricks)."""
    b, h, s, d = q.shape
    g = h // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    mask = torch.ones(s, s, dtype=torch.bool).tril()[None].expand(b, s, s)
    if pos is not None:
        doc = torch.cumsum((pos == 0).long(), -1)
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    sc = (q @ k.transpose(-1, -2)) * d ** -0.5
    return torch.softmax(sc.masked_fill(~mask[:, None], float("-inf")), -1) @ v


def _attention_case(rank, world, algorithm, b, s, h, hk, d, packed):
    from parallel.context_parallel import ContextParallel, ring_wire_bytes, shard, ulysses_wire_bytes
    from parallel.mesh import Mesh
    mesh = Mesh(cp=world)
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(b, h, s, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(b, hk, s, d, generator=gen) for _ in range(2))
    pos = _packed_positions(b, s) if packed else None
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = _reference_attention(qr, kr, vr, pos)
    ref.backward(dout)
    cp = ContextParallel(mesh.group("cp"), algorithm)
    cp.shard_batch(torch.zeros(b, s, dtype=torch.long), None, pos)
    r = mesh.local_rank("cp")
    ql, kl, vl = (shard(t, world, r, dim=2).requires_grad_() for t in (q, k, v))
    axis_op = ("cp", "send" if algorithm == "ring" else "all_to_all")
    before = mesh.stats.total(*axis_op)
    out = cp.attention(ql, kl, vl, causal=True)
    fwd = mesh.stats.total(*axis_op) - before
    out.backward(shard(dout, world, r, dim=2))
    bwd = mesh.stats.total(*axis_op) - before - fwd
    err = {n: (a - shard(want, world, r, dim=2)).abs().max().item()
           for n, a, want in (("out", out, ref), ("dq", ql.grad, qr.grad), ("dk", kl.grad, kr.grad),
                              ("dv", vl.grad, vr.grad))}
    theory = (ring_wire_bytes(b, s, hk, d, world) if algorithm == "ring" else
              ulysses_wire_bytes(b, s, h, hk, d, world))
    return err, {"forward": fwd, "backward": bwd}, theory


def _saved_bytes(group, algorithm):
    """Saved-activation bytes per block of a GPT forward on this rank's shard (s = 16 over cp)."""
    from examples.gpt import GPT
    from parallel.activation.memory import SavedActivations
    from parallel.context_parallel import ContextParallel
    torch.manual_seed(0)
    model = GPT(vocab_size=64, seq_len=16, n_layer=2, n_head=4, n_embd=32)
    cp = ContextParallel(group, algorithm)
    x, _, kw = cp.shard_batch(torch.randint(0, 64, (2, 16)))
    with SavedActivations(model) as t, cp.active():
        model(x, **kw)
    return t.block_bytes()


def _cases(rank, world, packed=(False,)):
    out = {}
    for algorithm in ("ring", "ulysses"):
        for p in packed:
            out[(algorithm, p)] = _attention_case(rank, world, algorithm, 2, 16, 4, 2, 8, p)
    import parallel.context_parallel.blocks as blocks
    from parallel.context_parallel.ring import fused_blocks
    old, blocks.ROWS = blocks.ROWS, 3                     # the reference blocks computed 3 query rows at a time
    try:
        with fused_blocks(False):
            out[("ring", "rows3")] = _attention_case(rank, world, "ring", 2, 16, 4, 2, 8, packed[-1])
    finally:
        blocks.ROWS = old
    from parallel.context_parallel import ContextParallel, ulysses_attention
    from parallel.mesh import Mesh
    g = Mesh(cp=world).group("cp")
    out["activations"] = {a: _saved_bytes(g, a) for a in ("ring", "ulysses")}
    try:
        ulysses_attention(torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8), g)
    except ValueError as e:
        out["heads"] = str(e)
    try:
        ContextParallel(g).shard_batch(torch.zeros(1, 6, dtype=torch.long))
    except ValueError as e:
        out["seq"] = str(e)
    return out


def _check_cases(results, cp=2):
    for res in results:
        for key in [k for k in res if isinstance(k, tuple)]:
            err, wire, theory = res[key]
            assert max(err.values()) < 1e-5, f"{key}: max abs error {err}"
            assert wire == pytest.approx(theory, rel=0, abs=1e-6), f"{key}: wire bytes {wire} vs theory {theory}"
            assert wire["forward"] > 0
        # activation bytes per rank are one process's at s/cp (b = 2, s = 16, h = 32, 4 heads): ring exactly,
        # Ulysses plus its head-sharded attention output and two (s,) int64 orders (ulysses.py)
        from parallel.activation.memory import gpt_layer_bytes
        ring = gpt_layer_bytes("none", 2, 16 // cp, 32, 4)
        ulysses = ring + 2 * (16 // cp) * 32 * 4 + 2 * 16 * 8
        assert res["activations"] == {"ring": {0: ring, 1: ring}, "ulysses": {0: ulysses, 1: ulysses}}
        assert f"not divisible by parallel.cp={cp}" in res["heads"]
        assert f"not divisible by 2·cp = {2 * cp}" in res["seq"]


def test_ring_and_ulysses_attention_match_one_process_and_theory():
    """Causal, GQA (4 query heads on 2 kv heads), forward and backward, bytes and activations (world 2)."""
    _check_cases(run_ranks(_cases, 2))


@pytest.mark.slow
def test_ring_and_ulysses_attention_packed_documents():
    """The same with packed documents (position ids restarting), and on 4 ranks."""
    _check_cases(run_ranks(_cases, 2, (False, True)))
    _check_cases(run_ranks(_cases, 4, (False, True)), cp=4)


def _train_cp(rank, world, model, overrides):
    losses, engine = train(rank, world, model, overrides)
    return losses, {a: engine.mesh.stats.total(a) for a in ("cp", "dp_cp", "dp", "tp")}


def _train_both(rank, world, overrides):
    return {a: _train_cp(rank, world, "gpt", ["parallel.cp=2", f"parallel.cp_algorithm={a}"] + overrides)
            for a in ("ring", "ulysses")}


def test_gpt_cp2_trains_like_one_process():
    """Both algorithms, 2 steps of 2 micro-batches (4 samples of 16 tokens), 2 layers of 4 heads of 8."""
    small = ["train.steps=2", "data.micro_batch_size=4", "model.kwargs.n_layer=2"]
    res = run_ranks(_train_both, 2, small)
    want = reference_losses(config("gpt", small))
    from parallel.context_parallel import ring_wire_bytes, ulysses_wire_bytes
    per_call = {"ring": ring_wire_bytes(4, 16, 4, 8, 2), "ulysses": ulysses_wire_bytes(4, 16, 4, 4, 8, 2)}
    for rank_res in res:
        for algorithm, (losses, traffic) in rank_res.items():
            assert_close_curve(losses, want, 1e-5, f"gpt cp2 {algorithm}")
            c = per_call[algorithm]
            assert traffic["cp"] == 2 * 2 * 2 * (c["forward"] + c["backward"])      # steps · micro-batches · layers
            assert traffic["dp_cp"] > 0                                            # gradients reduced over dp×cp


def test_config_errors_and_dry_run():
    from launch.dry_run import describe
    with pytest.raises(ConfigError, match="divisible by 2·cp = 8"):
        config("gpt", ["parallel.cp=4", "data.kwargs.seq_len=12"], world=4)
    assert config("gpt", ["parallel.cp=2", "parallel.pp=2"], world=4).parallel.cp == 2     # cp × pp: allowed
    with pytest.raises(ConfigError, match="parallel.dp/tp/pp/cp"):
        config("gpt", ["parallel.cp=2"], world=3)
    with pytest.raises(ConfigError, match="cp_algorithm"):
        config("gpt", ["parallel.cp=2", "parallel.cp_algorithm=striped"], world=2)
    text = describe(config("gpt", ["parallel.cp=2", "parallel.dp=2"], world=4))
    assert "cp=2" in text and "ZeRO stage 0 over dp×cp = 4" in text and "rank 3: pp=0 dp=1 cp=1 tp=0" in text
    shape = {"pp": 2, "dp": 2, "cp": 2, "tp": 2}
    for r in range(16):
        c = coords_of(r, shape)
        assert rank_of(c["pp"], c["dp"], c["tp"], shape, c["cp"]) == r


# --- slow: larger layouts, the transformers model, packed documents through a model ------------------
LAYOUTS = {"cp4": ["parallel.cp=4"], "cp2xdp2-z1": ["parallel.cp=2", "parallel.dp=2", "zero.stage=1"],
           "cp2xdp2-z3": ["parallel.cp=2", "parallel.dp=2", "zero.stage=3"],
           "cp2xtp2": ["parallel.cp=2", "parallel.tp=2"]}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ring", "ulysses"])
@pytest.mark.parametrize("model,name", [("gpt", "cp4"), ("llama", "cp4"), ("gpt", "cp2xdp2-z1"),
                                        ("llama", "cp2xdp2-z3"), ("gpt", "cp2xtp2"), ("llama", "cp2xtp2")])
def test_cp_layouts_train_like_one_process(model, name, algorithm):
    lay = LAYOUTS[name]
    steps = ["train.steps=6"]
    res = run_ranks(_train_cp, 4, model, lay + [f"parallel.cp_algorithm={algorithm}"] + steps, timeout=600)
    want = reference_losses(config(model, steps))
    for losses, _traffic in res:
        assert_close_curve(losses, want, 1e-5, f"{model} {lay} {algorithm}")


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ring", "ulysses"])
def test_llama_cp2_trains_like_one_process(algorithm):
    steps = ["train.steps=4"]
    res = run_ranks(_train_cp, 2, "llama", ["parallel.cp=2", f"parallel.cp_algorithm={algorithm}"] + steps)
    want = reference_losses(config("llama", steps))
    for losses, _traffic in res:
        assert_close_curve(losses, want, 1e-5, f"llama cp2 {algorithm}")


def _packed_llama(rank, world, algorithm):
    """Loss and gradients of the HF Llama on a packed batch: one process (transformers' own packed-
    sequence mask from the restarting position ids) vs cp ranks (document ids in the cp attention)."""
    import torch.distributed as dist

    from examples.hf_causal_lm import llama_tiny
    from parallel.context_parallel import ContextParallel
    from parallel.mesh import Mesh
    torch.manual_seed(0)
    model = llama_tiny()
    b, s = 2, 16
    x = torch.randint(0, 64, (b, s), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 64, (b, s), generator=torch.Generator().manual_seed(2))
    pos = _packed_positions(b, s)
    ce = torch.nn.functional.cross_entropy
    full = ce(model(x, position_ids=pos).logits.reshape(-1, 64), y.reshape(-1))
    unpacked = ce(model(x).logits.reshape(-1, 64), y.reshape(-1)).item()
    want = torch.autograd.grad(full, list(model.parameters()))
    mesh = Mesh(cp=world)
    cp = ContextParallel(mesh.group("cp"), algorithm)
    cp.prepare(model)
    xl, yl, kw = cp.shard_batch(x, y, pos)
    with cp.active():
        local = ce(model(xl, **kw).logits.reshape(-1, 64), yl.reshape(-1))
        grads = torch.autograd.grad(local, list(model.parameters()))
    total = local.detach().clone()
    dist.all_reduce(total)
    err = 0.0
    for g, w in zip(grads, want):
        g = g.clone()
        dist.all_reduce(g)
        err = max(err, (g / world - w).abs().max().item())
    return full.item(), unpacked, total.item() / world, err


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ring", "ulysses"])
def test_packed_documents_llama_cp2(algorithm):
    for full, unpacked, got, err in run_ranks(_packed_llama, 2, algorithm):
        assert abs(full - unpacked) > 1e-4          # the documents really change the attention
        assert abs(got - full) <= 1e-5 * abs(full), (got, full)
        assert err < 1e-5, err
