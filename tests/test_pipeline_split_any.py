"""Splitting models that are not a stack of one block class (issue 19, item 6).

Process-free: the stages chained on one process reproduce the whole model bit for bit (output and
every gradient) for a CNN split at user-named boundaries (``[features.2, head]``: the last stage is
the head alone), a CNN whose ``features`` (a Sequential of different modules) is found and balanced
by counted FLOPs, a flat Sequential CNN, and OPT (``model.decoder.layers``, found automatically).
Unsplittable models get an error listing the candidate containers. Through the engine (2 gloo
ranks): the CNN at pp2 with ``parallel.pp_split: [features.3]`` (and, slow, ``pp_balance: flops``)
and OPT at pp2 (slow) follow the single-process loss curve (fp32, 1e-5).
"""
import pytest
import torch
import torch.nn as nn
from harness import run_ranks
from reference import assert_close_curve, reference_losses

from parallel.comm import Group
from parallel.config import load_config
from parallel.pipeline.split import describe_split, find_body, split_model, sync_tied_grads


class CNN(nn.Module):
    """A small CNN with a custom forward: features (Sequential of different modules) → pool → head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def cnn(classes: int = 10):
    return CNN(classes)


def images(n: int = 32, size: int = 8, classes: int = 10, seed: int = 0):
    """A map-style dataset of (3×size×size image, class) pairs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i], y[i]) for i in range(n)]


def flat_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def opt(n_layer: int = 4):
    import transformers
    transformers.logging.set_verbosity_error()
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=n_layer,
                                 num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32,
                                 dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    return transformers.OPTForCausalLM(cfg)


def _chain(build, S, x, loss_fn, **kw):
    """All S stages (one per pp rank) back to back on this process: output, loss, {name: grad}."""
    torch.manual_seed(0)
    model = build()
    stages = [split_model(model, r, S, 1, **kw)[0] for r in range(S)]
    ins, outs, h = [], [], x
    for st in stages:
        h = h.detach().requires_grad_(h.is_floating_point())
        ins.append(h)
        h = st(h)
        outs.append(h)
    loss = loss_fn(h)
    loss.backward()
    for k in range(S - 2, -1, -1):
        outs[k].backward(ins[k + 1].grad)
    sync_tied_grads(stages, Group(None, "pp", (0,), 0))      # both ends local: summed in place
    tied = {post for pre, post in stages[0].stage_info.plan.tied}
    grads = {n: q.grad for st in stages for n, q in st.named_parameters() if not (st.stage_info.last and n in tied)}
    return h, loss, grads, stages


def _whole(build, x, loss_fn):
    from parallel.loss import logits_of
    torch.manual_seed(0)
    model = build()
    out = logits_of(model(x))
    loss = loss_fn(out)
    loss.backward()
    return out, loss, {n: q.grad for n, q in model.named_parameters()}


def _same(build, S, x, loss_fn, **kw):
    want_out, want_loss, want = _whole(build, x, loss_fn)
    out, loss, got, stages = _chain(build, S, x, loss_fn, **kw)
    assert torch.equal(out, want_out) and torch.equal(loss, want_loss)
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    return stages


def _sq(out):
    return out.square().mean()


def test_cnn_named_boundaries_head_alone():
    """[features.2, head] at S=3: features.0-1 | features.2-6 | head (the modules after the body)."""
    x = torch.randn(2, 3, 8, 8)
    stages = _same(cnn, 3, x, _sq, split=["features.2", "head"], sample=x[:1])
    plan = stages[0].stage_info.plan
    assert (plan.body, plan.bounds, plan.post, plan.balance) == ("features", [(0, 2), (2, 7), (7, 7)], ["head"],
                                                                 "named boundaries")
    assert [sum(q.numel() for q in st.parameters() if q.requires_grad) for st in stages] == \
        plan.stage_params == [3 * 8 * 9 + 8, 8 * 8 * 9 + 8 + 8 * 16 * 9 + 16, 16 * 10 + 10]
    assert _same(cnn, 2, x, _sq, split=["features.0", "features.5"], sample=x[:1])[1].stage_info.blocks == (5, 7)


def test_cnn_auto_body_balanced_by_counted_flops():
    """No same-class container: the body is features; per-block FLOPs (conv: 2·Cout·Cin·9·H·W per
    sample; ReLU and pooling count 0) balance the split: conv1 + conv2 = 101,376 | conv3 + head =
    37,184 (the best contiguous cut; parameter counts rank the blocks differently: conv3 holds the
    most parameters but half conv2's FLOPs)."""
    torch.manual_seed(0)
    model, x = cnn(), torch.randn(1, 3, 8, 8)
    assert find_body(model)[0] == "features"
    plan = describe_split(model, 2, balance="flops", sample=x)
    conv = [2 * 8 * 3 * 9 * 64, 2 * 8 * 8 * 9 * 64, 2 * 16 * 8 * 9 * 16]
    assert plan.costs == [conv[0], 0, conv[1], 0, 0, conv[2], 0] and plan.balance == "FLOPs"
    assert plan.bounds == [(0, 3), (3, 7)]
    assert describe_split(model, 2, sample=x).costs == [224, 0, 584, 0, 0, 1168, 0]
    _same(cnn, 2, torch.randn(2, 3, 8, 8), _sq, balance="flops", sample=x)
    flat = describe_split(flat_cnn(), 2, balance="flops", sample=x)
    assert flat.kind == "sequential" and flat.costs[0] == 2 * 4 * 3 * 9 * 64
    _same(flat_cnn, 2, torch.randn(2, 3, 8, 8), _sq, balance="flops", sample=x)


@pytest.mark.slow
def test_opt_splits_automatically():
    from parallel.loss import cross_entropy
    x = torch.randint(0, 64, (2, 16))
    assert find_body(opt())[0] == "model.decoder.layers"
    stages = _same(opt, 2, x, lambda out: cross_entropy(out, (x + 1) % 64))
    assert stages[0].stage_info.plan.tied == [("model.decoder.embed_tokens.weight", "lm_head.weight")]


def test_unsplittable_models_list_the_candidates():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4)])

        def forward(self, x):
            return self.layers[2](self.layers[0](x))

    with pytest.raises(ValueError, match=r"containers: layers \(3 × LayerNorm/Linear/ReLU\)"):
        find_body(Mixed())
    with pytest.raises(ValueError, match=r"names no child .* its containers are: features \(7 × "):
        describe_split(cnn(), 2, split=["feature.2"])
    with pytest.raises(ValueError, match=r"'features.9' is not a block of CNN.features"):
        describe_split(cnn(), 3, split=["features.2", "features.9"], sample=torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"gives 2 stages over .* but parallel.pp × pp_virtual_stages = 3"):
        describe_split(cnn(), 3, split=["features.2"], sample=torch.randn(1, 3, 8, 8))


# ----------------------------------------------------------------------------------- engine parity
def _config(over=()):
    base = {"model": {"factory": "test_pipeline_split_any:cnn"},
            "data": {"factory": "test_pipeline_split_any:images", "global_batch_size": 8, "micro_batch_size": 2},
            "optimizer": {"name": "sgd", "lr": 0.1}, "train": {"steps": 3}}
    return load_config(data=base, overrides=list(over))


def _engine(rank, world, over):
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = _config(over).validate(world)
    return run(cfg, Mesh(pp=2), print_fn=lambda *a, **k: None)["losses"]


@pytest.mark.parametrize("over", [["parallel.pp_split=[features.3]"],
                                  pytest.param(["parallel.pp_balance=flops"], marks=pytest.mark.slow)])
def test_cnn_pipeline_matches_single_process(over):
    over = ["parallel.pp=2"] + over
    want = reference_losses(_config(over))
    for rank, got in enumerate(run_ranks(_engine, 2, over)):
        assert_close_curve(got, want, 1e-5, f"CNN pp2 {over} rank {rank}")


def _opt_engine(rank, world, over):
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = _opt_config(over).validate(world)
    return run(cfg, Mesh(pp=2), print_fn=lambda *a, **k: None)["losses"]


def _opt_config(over=()):
    base = {"model": {"factory": "test_pipeline_split_any:opt"},
            "data": {"factory": "examples.gpt:random_tokens", "kwargs": {"n": 32, "seq_len": 16, "vocab_size": 64},
                     "global_batch_size": 8, "micro_batch_size": 2},
            "optimizer": {"name": "adamw", "lr": 0.003}, "train": {"steps": 3}}
    return load_config(data=base, overrides=list(over))


@pytest.mark.slow
def test_opt_pipeline_matches_single_process():
    """OPTForCausalLM at pp2 (1F1B, auto split of model.decoder.layers, tied lm_head)."""
    over = ["parallel.pp=2"]
    want = reference_losses(_opt_config(over))
    for rank, got in enumerate(run_ranks(_opt_engine, 2, over)):
        assert_close_curve(got, want, 1e-5, f"OPT pp2 rank {rank}")
