"""optimizer.fused: torch's fused Adam/AdamW/SGD kernel (parallel/optim/factory.py). Null = on when every
parameter is on CUDA, so CPU runs keep torch's default arithmetic; true forces it (CPU has the kernel too)."""
import pytest
import torch
from harness import run_ranks

KW = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, seq_len=16)


def _train(rank, world, fused, stage, name="adamw"):
    from examples.gpt import GPT
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    cfg = load_config(data={
        "model": {"factory": "examples.gpt:build", "kwargs": KW},
        "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": 4, "micro_batch_size": 2,
                 "kwargs": {"n": 4, "seq_len": KW["seq_len"], "vocab_size": KW["vocab_size"]}},
        "parallel": {"dp": world}, "zero": {"stage": stage},
        "optimizer": {"name": name, "lr": 1e-2, "fused": fused}}).validate(world)
    torch.manual_seed(0)
    eng = parallelize(GPT(**KW), cfg, Mesh(dp=world))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, KW["vocab_size"], (2, KW["seq_len"] + 1), generator=g)
    losses = [eng.train_step((x[:, :-1], x[:, 1:])) for _ in range(4)]
    return losses, eng.zero.optimizer.defaults.get("fused")


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_fused_true_matches_the_default_and_null_stays_unfused_on_cpu(stage):
    fused = run_ranks(_train, 2, True, stage)
    plain = run_ranks(_train, 2, None, stage)
    assert [r[1] for r in fused] == [True, True]
    assert [bool(r[1]) for r in plain] == [False, False]           # null on CPU: torch's default path
    for (lf, _), (lp, _) in zip(fused, plain):
        assert lf[0] == lp[0] and lf[-1] < lf[0]
        assert max(abs(a - b) for a, b in zip(lf, lp)) < 1e-5       # same update, another kernel's rounding


def test_fused_is_refused_where_torch_has_no_such_kernel():
    from parallel.config import ConfigError, load_config
    for opt, word in (({"name": "lamb", "fused": True}, "not lamb"),
                      ({"name": "adamw", "state_dtype": "int8", "fused": True}, "state_dtype=int8"),
                      ({"name": "adamw", "fused": "yes"}, "optimizer.fused: expected bool")):
        with pytest.raises(ConfigError, match=word):
            load_config(data={"model": {"factory": "examples.gpt:build"}, "optimizer": opt,
                                  "data": {"factory": "examples.gpt:random_tokens"}}).validate(1)
