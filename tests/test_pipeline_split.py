"""Stage split of existing models, process-free: the stages chained on one process reproduce the
whole model bit for bit (outputs and gradients), own disjoint blocks, and bad inputs get errors."""
import pytest
import torch
import torch.nn as nn

from parallel.parameters import ParamInfo, param_info
from parallel.pipeline.split import describe_split, find_body, split_model, sync_tied_grads

VOCAB, HIDDEN = 64, 32


def build(family: str, n_layer: int = 2):
    """The test models (tiny, no dropout, no download); call after torch.manual_seed."""
    if family == "gpt":
        from examples.gpt import GPT
        return GPT(vocab_size=VOCAB, seq_len=32, n_layer=n_layer, n_head=4, n_embd=HIDDEN)
    import transformers
    transformers.logging.set_verbosity_error()
    if family == "llama":                           # GQA: 4 query heads, 2 key/value heads
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                       num_hidden_layers=n_layer, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=32)
        return transformers.LlamaForCausalLM(cfg)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=n_layer,
                                      n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    if family == "sequential":
        return nn.Sequential(nn.Linear(8, HIDDEN), *[nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh())
                                                     for _ in range(n_layer)], nn.Linear(HIDDEN, 4))
    raise ValueError(family)


def _chain(family, n_layer, p, v, x, split="auto"):
    """All p·v stages (split_model for every pp rank; the split copies, never changes, the model)
    run back to back on this process; returns (logits, loss, {param name: grad}) with tied
    gradients summed like the pipeline does."""
    from parallel.comm import Group
    from parallel.loss import cross_entropy
    torch.manual_seed(0)
    model = build(family, n_layer)
    stages = [st for r in range(p) for st in split_model(model, r, p, v, split=split)]
    stages.sort(key=lambda s: s.stage_info.index)
    ins, outs, h = [], [], x
    for st in stages:
        h = h.detach().requires_grad_(h.is_floating_point())
        ins.append(h)
        h = st(h)
        outs.append(h)
    loss = cross_entropy(h, (x + 1) % VOCAB) if family != "sequential" else h.square().mean()
    loss.backward()
    for k in range(len(stages) - 2, -1, -1):
        outs[k].backward(ins[k + 1].grad)
    sync_tied_grads(stages, Group(None, "pp", (0,), 0))      # both ends local: summed in place
    grads = {}
    for st in stages:
        tie_of = {post: pre for pre, post in st.stage_info.plan.tied}
        for n, q in st.named_parameters():
            assert tie_of.get(n, n) not in grads or param_info(q).pp_duplicate, n
            grads.setdefault(tie_of.get(n, n), q.grad)
            if param_info(q).pp_duplicate:
                assert torch.equal(q.grad, grads[tie_of[n]])
    return outs[-1], loss, grads


def _whole(family, n_layer, x):
    from parallel.loss import cross_entropy, logits_of
    torch.manual_seed(0)
    model = build(family, n_layer)
    out = logits_of(model(x))
    loss = cross_entropy(out, (x + 1) % VOCAB) if family != "sequential" else out.square().mean()
    loss.backward()
    return out, loss, {n: q.grad for n, q in model.named_parameters()}


@pytest.mark.parametrize("family", ["gpt", "llama", "gpt2", "sequential"])
@pytest.mark.parametrize("p,v", [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_chained_stages_equal_the_whole_model(family, p, v):
    """Outputs and every gradient bit for bit (ties: first + last stage grads, summed)."""
    x = torch.randn(2, 8) if family == "sequential" else torch.randint(0, VOCAB, (2, 16))
    want_out, want_loss, want = _whole(family, 4, x)
    out, loss, got = _chain(family, 4, p, v, x)
    assert torch.equal(out, want_out) and torch.equal(loss, want_loss)
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_explicit_uneven_split_and_body_detection():
    x = torch.randint(0, VOCAB, (2, 16))
    want_out, _, want = _whole("llama", 4, x)
    out, _, got = _chain("llama", 4, 2, 1, x, split=[1])
    assert torch.equal(out, want_out) and all(torch.equal(got[n], want[n]) for n in want)
    paths = {f: find_body(build(f, 3))[0] for f in ("gpt", "llama", "gpt2", "sequential")}
    assert paths == {"gpt": "blocks", "llama": "model.layers", "gpt2": "transformer.h", "sequential": ""}


def test_plan_contents():
    torch.manual_seed(0)
    gpt = build("gpt", 4)
    plan = describe_split(gpt, 2)
    assert plan.bounds == [(0, 2), (2, 4)] and plan.body == "blocks" and plan.block_class == "Block"
    assert plan.pre == ["wte", "wpe"] and plan.post == ["ln_f", "lm_head"]
    assert plan.tied == [("wte.weight", "lm_head.weight")]
    block = sum(q.numel() for q in gpt.blocks[0].parameters())
    assert plan.stage_params == [2 * block + 64 * 32 + 32 * 32, 2 * block + 2 * 32 + 64 * 32]
    assert describe_split(gpt, 2, split=[3]).bounds == [(0, 3), (3, 4)]
    assert describe_split(gpt, 2, split=[0, 1]).bounds == [(0, 1), (1, 4)]
    assert describe_split(gpt, 2, balance=[1, 1, 1, 10]).bounds == [(0, 3), (3, 4)]
    assert describe_split(gpt, 4, balance=[5, 1, 1, 1]).bounds == [(0, 1), (1, 2), (2, 3), (3, 4)]
    timed = describe_split(gpt, 2, balance="cost", sample=torch.zeros(2, 16, dtype=torch.long))
    assert len(timed.costs) == 4 and min(timed.costs) > 0 and timed.balance == "measured forward time"
    assert plan.stages_of(1) == [1] and describe_split(gpt, 2, 2).stages_of(1) == [1, 3]
    assert "stage 1 (pp rank 1): blocks 2..3" in str(plan) and "tied: wte.weight" in str(plan)
    seq = describe_split(build("sequential", 4), 3)        # 6 children: Linear, 4 blocks, Linear
    assert seq.kind == "sequential" and seq.n_blocks == 6 and len(seq.bounds) == 3


def test_balance_is_the_optimal_contiguous_partition():
    """The DP's largest part equals brute force over all cut positions."""
    import itertools
    import random

    from parallel.pipeline.split import contiguous_partition

    def worst(b, costs, S, pre, post):
        """Largest part of partition ``b`` ((start, end) pairs): its costs, + pre on part 0, + post on part S-1."""
        return max(sum(costs[a:e]) + (pre if k == 0 else 0) + (post if k == S - 1 else 0)
                   for k, (a, e) in enumerate(b))
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 7)
        S = rng.randint(1, n)
        costs = [rng.randint(1, 20) for _ in range(n)]
        pre, post = rng.randint(0, 10), rng.randint(0, 10)
        got = contiguous_partition(costs, S, pre, post)
        assert [a for a, _ in got] == sorted(a for a, _ in got) and got[0][0] == 0 and got[-1][1] == n
        assert all(e > a for a, e in got)
        best = min(worst(list(zip((0,) + c, c + (n,))), costs, S, pre, post)
                   for c in itertools.combinations(range(1, n), S - 1))
        assert worst(got, costs, S, pre, post) == best


def test_each_stage_holds_only_its_own_parameters():
    """After the split and `del model`, only the rank's own blocks (plus pre/post) stay alive."""
    import gc
    import weakref
    torch.manual_seed(0)
    model = build("llama", 8)
    refs = {n: weakref.ref(q) for n, q in model.named_parameters()}
    stages = split_model(model, 1, 4, 2)                     # stages 1 and 5 of 8: blocks 1 and 5
    del model
    gc.collect()
    alive = {n for n, r in refs.items() if r() is not None}
    assert alive == {n for n in refs if n.startswith(("model.layers.1.", "model.layers.5."))}
    names = {n for st in stages for n, _ in st.named_parameters()}
    assert names == alive                                    # the unsplit model's names
    assert [st.stage_info.blocks for st in stages] == [(1, 2), (5, 6)]
    assert type(stages[0]).__name__ == "PipelineStageLlamaForCausalLM"


def test_tied_copies_are_marked():
    torch.manual_seed(0)
    first, = split_model(build("gpt2", 2), 0, 2)
    torch.manual_seed(0)
    last, = split_model(build("gpt2", 2), 1, 2)
    w0, w1 = first.transformer.wte.weight, last.lm_head.weight
    assert param_info(w0) == ParamInfo(defer_reduce=True, tie=0, pp_duplicate=False)
    assert param_info(w1) == ParamInfo(defer_reduce=True, tie=0, pp_duplicate=True)
    assert torch.equal(w0, w1) and w0 is not w1
    assert not hasattr(last.transformer, "wte") or not any(True for _ in last.transformer.wte.parameters())


class _NoBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x))


class _DirectParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(4))
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x + self.pos)
        return x


def test_errors_name_the_structure_and_the_fix():
    with pytest.raises(ValueError, match=r"no repeated-block body.*fc1: Linear.*parallel.pp=1"):
        describe_split(_NoBody(), 2)
    with pytest.raises(ValueError, match=r"4 stages .*blocks \(2 × Block\) has only 2 blocks.*lower parallel.pp"):
        describe_split(build("gpt", 2), 4)
    with pytest.raises(ValueError, match=r"8 stages .*parallel.pp_virtual_stages=2"):
        describe_split(build("gpt", 4), 4, 2)
    with pytest.raises(ValueError, match=r"pp_split=\[3, 1\].*strictly increasing"):
        describe_split(build("gpt", 4), 3, split=[3, 1])
    with pytest.raises(ValueError, match=r"holds parameters \['pos'\] directly"):
        describe_split(_DirectParam(), 2)
    with pytest.raises(ValueError, match="balance='speed' must be 'params', 'flops', 'cost'"):
        describe_split(build("gpt", 4), 2, balance="speed")
    with pytest.raises(ValueError, match="pp_rank=2"):
        split_model(build("gpt", 4), 2, 2)
    with pytest.raises(ValueError, match=r"probing GPT .*pass sample="):
        describe_split(build("gpt", 4), 2, sample=torch.zeros(1, 64, dtype=torch.long))


def test_sequential_with_tied_ends_and_shared_weights():
    """An nn.Sequential whose first and last children share a weight is split with a tied copy;
    a weight shared by blocks on other stages is refused."""
    from parallel.comm import Group
    torch.manual_seed(0)
    emb, head = nn.Embedding(VOCAB, HIDDEN), nn.Linear(HIDDEN, VOCAB, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), head)
    assert describe_split(model, 2).tied == [("0.weight", "3.weight")]
    x = torch.randint(0, VOCAB, (2, 5))
    model(x).square().mean().backward()
    want = model[0].weight.grad.clone()
    model.zero_grad()
    a, = split_model(model, 0, 2)
    b, = split_model(model, 1, 2)
    h = a(x).detach().requires_grad_()
    b(h).square().mean().backward()
    a(x).backward(h.grad)
    sync_tied_grads([a, b], Group(None, "pp", (0,), 0))
    assert torch.allclose(a[0].weight.grad, want, rtol=1e-6, atol=0)
    assert torch.equal(a[0].weight.grad, b.get_submodule("3").weight.grad)
    lin = nn.Linear(HIDDEN, HIDDEN)
    shared = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), lin, nn.Linear(HIDDEN, HIDDEN), lin, nn.Linear(HIDDEN, HIDDEN))
    with pytest.raises(ValueError, match=r"shared by \['1.weight', '3.weight'\].*stages \[1, 3\]"):
        describe_split(shared, 4, split=[1, 2, 3])


def test_a_stage_ends_without_raising():
    """A non-last stage runs the model's forward to its end: a forward hook added after the split on
    its last block (after the stage's own) still runs and sees exactly the tensor the stage returns,
    later blocks and the final norm/head are pass-throughs (called, holding nothing), and the
    root's forward hooks run."""
    torch.manual_seed(0)
    model = build("llama", 4)
    first, = split_model(model, 0, 2)
    seen, calls = {}, []
    first.model.layers[1].register_forward_hook(lambda m, a, out: seen.setdefault("block", out))
    for name in ("model.layers.3", "model.norm", "lm_head"):
        mod = first.get_submodule(name)
        assert type(mod).__name__ == "_PassThrough" and not any(True for _ in mod.parameters()), name
        mod.register_forward_hook(lambda m, a, out, name=name: calls.append(name))
    first.register_forward_hook(lambda m, a, out: seen.setdefault("root", out))
    x = torch.randint(0, VOCAB, (2, 16))
    h = first(x)
    block = seen["block"][0] if isinstance(seen["block"], tuple) else seen["block"]
    assert h is block and seen["root"] is h and h.shape == (2, 16, HIDDEN)
    assert calls == ["model.layers.3", "model.norm", "lm_head"]
    with torch.no_grad():                                    # the whole model's hidden state after block 1
        want = {}
        model.model.layers[1].register_forward_hook(lambda m, a, out: want.setdefault("h", out))
        model(x)
    assert torch.equal(h, want["h"][0] if isinstance(want["h"], tuple) else want["h"])


class _ViewsTheLogits(nn.Module):
    """Code after the head that needs the head's real output (its vocabulary width)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(2))
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h).view(*x.shape, VOCAB)


def test_a_forward_that_needs_the_heads_output_gets_a_named_error():
    """Refused when the split is planned (every stage is run once then), before any rank trains."""
    torch.manual_seed(0)
    model = _ViewsTheLogits()
    for pp_rank in (0, 1):                                   # every rank plans the same split: all refuse
        with pytest.raises(ValueError, match=r"stage 0 of 2 .*failed after block 0, where this stage ends.*"
                                             r"parallel.pp=1"):
            split_model(model, pp_rank, 2)
