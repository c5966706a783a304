"""Vocabulary padding (V = 101, not divisible by tp) and kv-head replication (kv heads < tp) against one process.

transformers' LlamaForCausalLM (fp32, 4 query heads of head_dim 8) converted by its published plan, trained
3 AdamW steps (weight decay 0.1, eps 1e-3) with vocab_parallel_cross_entropy next to the same model on one
process: losses, gathered logits, every gradient piece and every weight piece to 1e-5 relative; padded rows
exactly zero (their gradient too); tp traffic counted exactly. Then the engine with ZeRO-3 over dp and a
consolidated checkpoint, which must equal the one-process state dict.
"""
import pytest
import torch
import torch.nn.functional as F
from engine_cases import config, layout, train
from harness import run_ranks
from reference import assert_close_curve, reference_losses

B, S, H, V, L, HD = 2, 16, 32, 101, 2, 8
F32 = 4


def close(a, b, tol=1e-5, what=""):
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def _llama(tied, n_kv):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
                      num_key_value_heads=n_kv, max_position_embeddings=64, tie_word_embeddings=tied,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def _expected(world, n_kv):
    """tp all-reduces of one forward + loss + backward (no SP): Megatron's 4 per layer of b·s·h, the embedding's
    and the head's f, the loss's max and [target, sum-exp]; replicated kv: per layer one all-reduce of the
    [n_kv, hd, H] gradient buffer for each of k_proj and v_proj (the ring moves 2(tp−1)/tp of it)."""
    act, ce = B * S * H * F32, 3 * B * S * F32
    calls, payload = 4 * L + 2 + 2, (4 * L + 2) * act + ce
    if n_kv < world:
        calls, payload = calls + 2 * L, payload + 2 * L * n_kv * HD * H * F32
    return calls, payload


def _parity(rank, world, tied, n_kv, sp, gather=False, steps=3):
    from examples.gpt import random_tokens
    from parallel.mesh import Mesh
    from parallel.parameters import param_info
    from parallel.tensor_parallel import vocab_parallel_cross_entropy
    from parallel.tensor_parallel.plan import apply_tensor_parallel, resolve_plan
    from parallel.tensor_parallel.uneven import gather_vocab_logits, piece_of
    m = Mesh(tp=world)
    g = m.group("tp")
    torch.manual_seed(0)
    ref = _llama(tied, n_kv)
    torch.manual_seed(0)
    model = _llama(tied, n_kv)
    plan = {**resolve_plan(model), "lm_head": "colwise_gather"} if gather else "auto"
    apply_tensor_parallel(model, m, plan, sequence_parallel=sp)
    local = -(-V // world)                                   # ⌈V/tp⌉ rows per rank; the last rank's tail is padding
    valid = min(V - rank * local, local)
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert emb.shape == head.shape == (local, H) and (emb is head) == tied
    assert param_info(emb).tp_pad == local * world - V
    attn = model.model.layers[0].self_attn
    replicated = n_kv < world
    assert attn.k_proj.weight.shape == (max(n_kv // world, 1) * HD, H)
    assert attn.num_key_value_groups == (4 // world if replicated else 4 // n_kv)
    assert param_info(attn.k_proj.weight).tp_duplicate == (replicated and rank % (world // n_kv) != 0)
    # eps = 1e-3: Adam's first steps move every weight by ≈ lr·sign(g), so a gradient of ~1e-9 whose sign differs
    # in the last float bit between layouts would move a weight by 2·lr; a large eps keeps updates ∝ g (exact-able).
    opts = [torch.optim.AdamW(mod.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-3) for mod in (ref, model)]
    data = random_tokens(steps * B, S, V, seed=3)
    losses, counts = [], None
    for t in range(steps):
        x, y = (torch.stack(v) for v in zip(*(data[t * B + i] for i in range(B))))
        for o in opts:
            o.zero_grad()
        ref_logits = ref(x).logits
        want = F.cross_entropy(ref_logits.reshape(-1, V), y.reshape(-1))
        want.backward()
        before = m.stats.snapshot()
        logits = model(x).logits
        if gather:                               # colwise_gather: the full [..., V] logits, padding dropped
            assert logits.shape == ref_logits.shape
            close(logits, ref_logits, what="gathered logits")
            got = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        else:
            got = vocab_parallel_cross_entropy(logits, y, g)
        got.backward()
        if t == 0 and not gather:
            c = m.stats.diff(m.stats.snapshot(), before)["tp"]
            counts = {op: (v["calls"], v["payload_bytes"]) for op, v in c.items()}
            assert logits.shape[-1] == local and bool(torch.isneginf(logits[..., valid:]).all())
            assert bool(torch.isfinite(logits[..., :valid]).all())
            full = gather_vocab_logits(logits.detach(), g, V)
            assert full.shape == ref_logits.shape
            close(full, ref_logits, what="gathered logits")
        if t == 0:
            for name, p in model.named_parameters():
                close(p.grad, piece_of(dict(ref.named_parameters())[name].grad, p, world, rank), what=f"grad {name}")
            assert bool((emb.grad[valid:] == 0).all()) and bool((head.grad[valid:] == 0).all())
        for o in opts:
            o.step()
        losses.append((got.item(), want.item()))
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        close(p.detach(), piece_of(ref_params[name], p, world, rank), what=f"weight {name}")
    assert bool((emb[valid:] == 0).all()) and bool((head[valid:] == 0).all())      # padding stays zero
    return losses, counts


@pytest.mark.parametrize("world,tied,n_kv,sp,gather", [(2, True, 1, False, False), (2, False, 2, False, False),
                                                      (4, True, 2, False, False), (4, False, 1, False, False),
                                                      (4, True, 1, True, False), (4, False, 2, False, True)])
def test_padded_vocab_and_replicated_kv_match_one_process(world, tied, n_kv, sp, gather):
    """V = 101 padded to 102 (tp 2) / 104 (tp 4), tied and untied; kv heads 1 and 2 replicated at tp 4 (and 1 at
    tp 2); one case with sequence parallel, one with a gathering head (colwise_gather: logits [..., V]); tp
    traffic counted in the plain cases."""
    for losses, counts in run_ranks(_parity, world, tied, n_kv, sp, gather):
        for t, (got, want) in enumerate(losses):
            assert abs(got - want) <= 1e-5 * abs(want), (t, got, want)
        if not sp and not gather:
            assert counts == {"all_reduce": _expected(world, n_kv)}


def _engine(rank, world, lay, d):
    from launch.consolidate import consolidated_model
    losses, engine = train(rank, world, "llama", lay)
    engine.save(d + "/final")
    if rank != 0:
        return losses, None
    return losses, {k: v.detach().clone() for k, v in consolidated_model(d + "/final").state_dict().items()}


MODEL = ["model.kwargs.vocab_size=101", "data.kwargs.vocab_size=101", "model.kwargs.num_key_value_heads=1",
         "model.kwargs.num_hidden_layers=2", "data.micro_batch_size=4", "train.steps=3",
         "optimizer.weight_decay=0.1", "optimizer.eps=0.001",        # eps: see _parity
         "train.grad_clip=0.5"]     # active clipping: the grad norm counts one kv copy and no padding


@pytest.mark.parametrize("lay,tied", [((2, 2, 1, 3), True), ((1, 2, 2, 1), True),
                                      pytest.param((2, 2, 1, 3), False, marks=pytest.mark.slow)])
def test_engine_checkpoint_consolidates_to_one_process_state(tmp_path, lay, tied):
    """dp2 × tp2 ZeRO-3 (the padded embedding/head and the replicated MQA kv head partitioned over dp) and
    tp2 × pp2 (the padded tied embedding copied to the last stage): the loss curve of one process, and the
    consolidated checkpoint is the one-process state dict (V × H, one kv copy)."""
    over = MODEL + [f"model.kwargs.tie_word_embeddings={str(tied).lower()}"]
    want, ref = reference_losses(config("llama", over), return_model=True)
    res = run_ranks(_engine, 4, layout(*lay) + over, str(tmp_path / "ck"))
    assert_close_curve(res[0][0], want, 1e-5, f"dp, tp, pp, zero = {lay}")
    sd, ref_sd = res[0][1], ref.state_dict()
    assert sorted(sd) == sorted(ref_sd)
    for k, v in ref_sd.items():
        assert sd[k].shape == v.shape, k
        close(sd[k], v, what=k)


def test_refusals_name_the_counts():
    """What padding and replication cannot do is refused at plan time, naming the module and the numbers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from parallel.comm import Group
    from parallel.tensor_parallel.plan import apply_tensor_parallel

    def group(n):
        return Group(None, "tp", tuple(range(n)), 0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(5, 8), torch.nn.Linear(8, 5)

    with pytest.raises(ValueError, match=r"emb: vocabulary size 5 is too small for tp = 4: padded to 8, rank 3 would "
                                         r"hold only padding") as e:
        apply_tensor_parallel(Tiny(), group(4), {"emb": "vocab", "head": "colwise_vocab"})
    assert "head: vocabulary size 5 is too small" in str(e.value)
    apply_tensor_parallel(Tiny(), group(3), {"emb": "vocab", "head": "colwise_vocab"})     # 5 → 6: fine
    cfg = LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=6,
                      num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"k_proj: 3 key/value heads with 6 query heads cannot be split over tp = 2"):
        apply_tensor_parallel(LlamaForCausalLM(cfg), group(2))
    attn = torch.nn.Module()                                       # fused qkv, 4 query heads, 1 kv head
    attn.head_dim, attn.num_heads, attn.num_key_value_heads = HD, 4, 1
    attn.qkv = torch.nn.Linear(H, 6 * HD)
    model = torch.nn.Module()
    model.attn = attn
    with pytest.raises(ValueError, match=r"attn\.qkv: section 1 of \[32, 8, 8\] has 1 heads \(head_dim 8\), not "
                                         r"divisible by tp = 4.*only for separate k/v projections"):
        apply_tensor_parallel(model, group(4), {"attn.qkv": "colwise_qkv"})
