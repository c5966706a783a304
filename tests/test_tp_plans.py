"""apply_tensor_parallel on existing models against the same model on one process (fp32, gloo CPU ranks).

Models: examples/gpt.py (Megatron plan, tied wte/lm_head), transformers' LlamaForCausalLM with grouped-
query attention (published plan) and GPT2LMHeadModel (fused Conv1D qkv, tied embeddings, built-in plan),
each for tp ∈ {2, 4}, with and without sequence parallel. Tolerance: max|a − b| ≤ 1e-5 · max|b| for the
logits, the loss and every parameter gradient; counts of tp traffic are exact.
"""
import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks

B, S, H, V, L = 2, 16, 32, 64, 2
F32 = 4
ACT = B * S * H * F32              # one b·s·h activation, bytes
CE = 3 * B * S * F32               # vocab-parallel loss: all-reduce of the max (b·s), then [target, sum-exp]


def close(a, b, tol=1e-5, what=""):
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def _fake_group(size, rank=0):
    from parallel.comm import Group
    return Group(None, "tp", tuple(range(size)), rank)


def _gpt(n_layer=L, **kw):
    from examples.gpt import GPT
    return GPT(vocab_size=V, seq_len=S, n_layer=n_layer, n_head=4, n_embd=H, **kw)


def _llama(tp):
    from transformers import LlamaConfig, LlamaForCausalLM
    heads = 4 * tp // 2                        # tp=2: 4 heads / 2 kv heads (GQA); tp=4: 8 / 4 (head_dim 4)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=L, num_attention_heads=heads,
                      num_key_value_heads=heads // 2, max_position_embeddings=64, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def _gpt2(tp):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg)


BUILD = {"gpt": lambda tp: _gpt(), "llama": _llama, "gpt2": _gpt2}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _parity(rank, world, kind, sp):
    from examples.gpt import random_tokens
    from parallel.mesh import Mesh
    from parallel.parameters import param_info
    from parallel.tensor_parallel import shard_tensor, vocab_parallel_cross_entropy
    from parallel.tensor_parallel.plan import apply_tensor_parallel
    m = Mesh(tp=world)
    g = m.group("tp")
    torch.manual_seed(0)
    ref = BUILD[kind](world)
    torch.manual_seed(0)
    model = BUILD[kind](world)
    conv = apply_tensor_parallel(model, m, "auto", sequence_parallel=sp)
    assert conv.vocab_parallel_output and conv.sequence_parallel == sp and conv.group is g
    x, y = zip(*(random_tokens(B, S, V, seed=1)[i] for i in range(B)))
    x, y = torch.stack(x), torch.stack(y)
    ref_logits = _logits(ref(x))
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, V), y.reshape(-1))
    ref_loss.backward()
    before = m.stats.snapshot()
    logits = _logits(model(x))
    loss = vocab_parallel_cross_entropy(logits, y, g)
    loss.backward()
    counts = m.stats.diff(m.stats.snapshot(), before)["tp"]
    close(logits, ref_logits.chunk(world, -1)[rank], what="logits")
    close(loss, ref_loss, what="loss")
    ref_params = dict(ref.named_parameters())
    names = []
    for name, p in model.named_parameters():
        r = ref_params[name]
        info = param_info(p)
        want = shard_tensor(r.grad, info.tp_dim, world, rank, info.sections) if info.tp_split else r.grad
        assert p.grad is not None and p.grad.shape == want.shape, name
        close(p.grad, want, what=name)
        names.append((name, info.tp_split))
    assert len(names) == len(ref_params)
    tied = {"gpt": ("wte", "lm_head"), "gpt2": ("transformer.wte", "lm_head"), "llama": None}[kind]
    if tied:
        mods = dict(model.named_modules())
        assert mods[tied[0]].weight is mods[tied[1]].weight and mods[tied[1]].weight.shape == (V // world, H)
    return {op: (c["calls"], c["payload_bytes"]) for op, c in counts.items()}, names


def _expected(kind, sp, tp):
    """Exact tp traffic of one forward + vocab-parallel loss + backward, as (calls, payload bytes) per op."""
    if not sp:
        # Megatron: per layer 2 all-reduces of b·s·h forward (attention and MLP row layers) and 2 backward
        # (f before the fused/shared qkv and the MLP column layers); extra: the vocab embedding's all-reduce
        # forward, the lm_head's f backward, and the loss's 2 small all-reduces.
        return {"all_reduce": (4 * L + 2 + 2, (4 * L + 2) * ACT + CE)}
    norms = {"gpt": 2 * (2 * L + 1), "gpt2": 2 * (2 * L + 1), "llama": 2 * L + 1}[kind]   # LN w+b / RMSNorm w
    biases = {"gpt": 2 * L, "gpt2": 2 * L, "llama": 0}[kind]                            # row-parallel biases
    small = (2 + norms + biases, CE + (norms + biases) * H * F32)   # loss + grads of params on sequence shards
    if kind == "gpt":
        # Megatron layout: per layer 2 all-gathers + 2 reduce-scatters of b·s·h forward and the same backward;
        # extra: embedding reduce-scatter fwd / all-gather bwd, lm_head all-gather fwd / reduce-scatter bwd,
        # wpe's all-gather of its s·h position gradient bwd.
        return {"all_gather": (4 * L + 3, (4 * L + 2) * ACT + S * H * F32),
                "reduce_scatter": (4 * L + 2, (4 * L + 2) * ACT), "all_reduce": small}
    # Region layout (transformers): the same per-layer traffic; extra: embedding all-reduce fwd, entry
    # all-gather bwd, exit all-gather fwd, lm_head f all-reduce bwd.
    return {"all_gather": (4 * L + 2, (4 * L + 2) * ACT), "reduce_scatter": (4 * L, 4 * L * ACT),
            "all_reduce": (small[0] + 2, small[1] + 2 * ACT)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["gpt", "llama", "gpt2"])
def test_model_matches_one_process(kind, world):
    for sp in (False, True):
        for counts, names in run_ranks(_parity, world, kind, sp):
            assert counts == _expected(kind, sp, world), (sp, counts)
            assert any(s for _, s in names) and any(not s for _, s in names)


def _per_layer(rank, world, n_layer):
    """Non-SP tp traffic of the GPT with n_layer blocks (for the per-layer difference)."""
    from parallel.mesh import Mesh
    from parallel.tensor_parallel import vocab_parallel_cross_entropy
    from parallel.tensor_parallel.plan import apply_tensor_parallel
    m = Mesh(tp=world)
    torch.manual_seed(0)
    model = _gpt(n_layer)
    apply_tensor_parallel(model, m)
    x = torch.randint(0, V, (B, S))
    before = m.stats.snapshot()
    vocab_parallel_cross_entropy(model(x), x, m.group("tp")).backward()
    c = m.stats.diff(m.stats.snapshot(), before)["tp"]["all_reduce"]
    return c["calls"], c["payload_bytes"], c["wire_bytes"]


def test_megatron_count_per_layer():
    one, two = run_ranks(_per_layer, 2, 1)[0], run_ranks(_per_layer, 2, 2)[0]
    # one more transformer layer = 2 all-reduces of b·s·h forward + 2 backward, ring wire 2(N−1)/N·M each
    assert (two[0] - one[0], two[1] - one[1], two[2] - one[2]) == (4, 4 * ACT, 4 * ACT)


def _train(rank, world, sp, steps):
    from examples.gpt import random_tokens
    from parallel.mesh import Mesh
    from parallel.tensor_parallel import vocab_parallel_cross_entropy
    from parallel.tensor_parallel.plan import apply_tensor_parallel
    m = Mesh(tp=world)
    g = m.group("tp")
    data = random_tokens(2 * B, S, V, seed=2)              # two batches, alternated: the model can learn them
    torch.manual_seed(0)
    ref = _gpt()
    torch.manual_seed(0)
    model = _gpt()
    apply_tensor_parallel(model, m, sequence_parallel=sp)
    opts = [torch.optim.AdamW(mod.parameters(), lr=3e-3) for mod in (ref, model)]
    losses = []
    for t in range(steps):
        x, y = (torch.stack(v) for v in zip(*(data[t % 2 * B + i] for i in range(B))))
        pair = []
        for mod, opt, lossf in ((ref, opts[0], lambda o, y=y: F.cross_entropy(o.reshape(-1, V), y.reshape(-1))),
                                (model, opts[1], lambda o, y=y: vocab_parallel_cross_entropy(o, y, g))):
            opt.zero_grad()
            loss = lossf(mod(x))
            loss.backward()
            opt.step()
            pair.append(loss.item())
        losses.append(pair)
    return losses


def test_training_reproduces_one_process_loss_curve():
    """20 AdamW steps at tp = 2, with and without sequence parallel, against the same loop on one process."""
    for sp in (False, True):
        for losses in run_ranks(_train, 2, sp, 20):
            assert losses[-1][0] < losses[0][0] - 0.5                 # it learns
            for t, (want, got) in enumerate(losses):
                assert abs(got - want) <= 1e-4 * abs(want), (sp, t, got, want)


# --- errors: reported before anything changes, no ranks needed (a group of the size is enough) -----------

def test_plan_errors_name_module_and_numbers():
    from parallel.tensor_parallel.plan import apply_tensor_parallel
    g4 = _fake_group(4)
    with pytest.raises(ValueError, match=r"'blocks\.\*\.attn\.qkvv' \(colwise\) matches no module.*did you mean "
                                         r"\['blocks\.0\.attn\.qkv'"):
        apply_tensor_parallel(_gpt(), g4, {"blocks.*.attn.qkvv": "colwise"})
    with pytest.raises(ValueError, match=r"blocks\.0\.ln1: style 'colwise' needs nn\.Linear or transformers Conv1D, "
                                         r"found LayerNorm"):
        apply_tensor_parallel(_gpt(), g4, {"blocks.*.ln1": "colwise"})
    with pytest.raises(ValueError, match="unknown style 'diagonal'"):
        apply_tensor_parallel(_gpt(), g4, {"wte": "diagonal"})
    gpt = _gpt()
    before = [(n, type(m)) for n, m in gpt.named_modules()]
    with pytest.raises(ValueError) as e:
        apply_tensor_parallel(gpt, _fake_group(3))
    msg = str(e.value)
    assert "vocabulary" not in msg and "lm_head" not in msg         # padded to 66 rows (test_tp_uneven.py)
    assert "blocks.0.attn.qkv: section 0 of [32, 32, 32] has 4 heads (head_dim 8), not divisible by tp = 3" in msg
    assert "blocks.1.mlp.fc: out_features = 128 is not divisible by tp = 3" in msg
    assert "blocks.0.attn.n_head = 4" in msg
    assert [(n, type(m)) for n, m in gpt.named_modules()] == before   # nothing was changed
    llama = _llama(2)                           # 2 kv heads are replicated over 4 ranks, not over 8 (4 q heads)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj: 2 key/value heads with 4 query heads "
                                         r"cannot be split over tp = 8"):
        apply_tensor_parallel(llama, _fake_group(8))


def test_plan_resolution_and_hf_guard():
    from parallel.tensor_parallel.plan import apply_tensor_parallel, resolve_plan
    llama = _llama(2)
    p = resolve_plan(llama)
    assert p["model.embed_tokens"] == "vocab" and p["lm_head"] == "colwise_vocab"
    assert p["model.layers.*.self_attn.k_proj"] == "colwise"
    assert p["model.layers.0"] == "seq_scatter_input" and p["model.norm"] == "seq_gather_output"
    p2 = resolve_plan(_gpt2(2))
    assert p2["transformer.h.*.attn.c_attn"] == "colwise_qkv" and p2["transformer.ln_f"] == "seq_gather_output"
    assert resolve_plan(_gpt2(2), {"a": "embedding_rowwise"}) == {"a": "vocab"}
    with pytest.raises(ValueError, match="has no tensor-parallel plan"):
        resolve_plan(torch.nn.Linear(2, 2))
    # per-rank head counts of GPT-2 attention; the HF loss refuses vocab-split logits
    gpt2 = _gpt2(2)
    apply_tensor_parallel(gpt2, _fake_group(2))
    attn = gpt2.transformer.h[0].attn
    assert (attn.num_heads, attn.split_size, attn.head_dim) == (2, 16, 8)
    assert tuple(attn.c_attn.weight.shape) == (H, 3 * H // 2)      # Conv1D layout kept: [in, out/tp]
    with pytest.raises(ValueError, match="call it without labels="):
        gpt2(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
    one = _gpt()
    conv = apply_tensor_parallel(one, _fake_group(1))                # tp = 1: checked, unchanged
    assert isinstance(one.wte, torch.nn.Embedding) and not conv.vocab_parallel_output

