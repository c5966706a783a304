"""Token-weighted means where padding makes counts differ (parallel/batch.py, launch/evaluate.py): padded
(x, y) tuple batches (−100 = ignore_index) train as one process at dp2 and pp2, and eval_loss is the
mean over every scored token of the eval set, not a mean of batch means."""
import json

import pytest
import torch
import torch.nn.functional as F
from dict_cases import Padded
from harness import run_ranks
from reference import assert_close_curve, reference_losses
from torch.utils.data import default_collate

from parallel.config import load_config


class PaddedTuples(torch.utils.data.Dataset):
    """(x, y) next-token pairs of ragged length, right-padded: y = −100 on the padding, so every sample
    scores a different number of tokens."""

    def __init__(self, n=32, seq_len=16, vocab_size=64, seed=0):
        self.p = Padded(n, seq_len + 1, vocab_size, seed=seed, mask=False)

    def __len__(self):
        return len(self.p)

    def __getitem__(self, i):
        s = self.p[i]
        return s["input_ids"][:-1], s["labels"][1:]


def padded_tuples(**kw):
    return PaddedTuples(**kw)


def padded_dicts(**kw):
    return Padded(**kw)


class UnevenEval(Padded):
    """Padded samples whose first global batch (positions 0–7) scores at most 5 tokens each: the eval batches'
    token counts differ by ~2×."""

    def __getitem__(self, i):
        s = super().__getitem__(i)
        if i < 8:
            s["labels"][6:] = -100
        return s


def uneven_eval(**kw):
    return UnevenEval(**kw)


def sharp_gpt(**kw):
    """The small GPT with its (tied) embedding scaled ×30: confident, token-dependent losses from the start,
    so batches of different scored counts have clearly different means."""
    from examples.gpt import build
    model = build(**kw)
    with torch.no_grad():
        model.wte.weight.mul_(30)
    return model


MODEL = {"factory": "examples.gpt:build", "kwargs": {"vocab_size": 64, "seq_len": 16, "n_layer": 2, "n_head": 2,
                                                      "n_embd": 32}}


def _cfg(layout, world=None, **over):
    base = {"model": MODEL, "data": {"factory": "test_token_weighting:padded_tuples", "global_batch_size": 8,
                                     "micro_batch_size": 2},
            "parallel": layout, "optimizer": {"name": "adamw", "lr": 0.003},
            "train": {"steps": 3, "metrics_file": None}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v}
    cfg = load_config(data=base)
    return cfg.validate(world) if world else cfg


def _train(rank, world, layout, over):
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = _cfg(layout, world, **over)
    p = cfg.parallel
    return run(cfg, Mesh(pp=p.pp, dp=p.dp, tp=1, cp=p.cp), print_fn=lambda *a, **k: None)["losses"]


@pytest.mark.parametrize("layout", [{"dp": 2}, pytest.param({"pp": 2}, marks=pytest.mark.slow)], ids=["dp2", "pp2"])
def test_padded_tuple_batches_equal_one_process(layout):
    want = reference_losses(_cfg(layout))             # F.cross_entropy over the whole batch: the token mean
    torch.manual_seed(0)                               # the mean of micro-batch means would differ: the test can tell
    from examples.gpt import build
    model = build(**MODEL["kwargs"])
    x, y = default_collate([PaddedTuples()[i] for i in range(8)])
    logits = model(x)
    means = [F.cross_entropy(logits[i:i + 2].reshape(-1, 64), y[i:i + 2].reshape(-1)) for i in range(0, 8, 2)]
    assert abs(sum(means).item() / 4 - want[0]) > 1e-4 * want[0]
    got = run_ranks(_train, 2, layout, {}, timeout=300)[0]
    assert_close_curve(got, want, 1e-5, f"padded tuples {layout}")


def _refused(rank, world, layout):
    try:
        _train(rank, world, layout, {})
    except ValueError as e:                         # every rank refuses at step 0 (the pool stays usable)
        return str(e)


def test_padded_tuple_batches_are_refused_under_cp():
    """cp averages each rank's sequence-shard mean, the token mean only without padding: refused, naming the fix."""
    for msg in run_ranks(_refused, 2, {"cp": 2}, timeout=300):
        assert msg is not None and "ignored (-100) targets in this global batch: with parallel.cp > 1" in msg, msg
        assert msg.endswith("train padded data with parallel.cp=1, or pack it without padding"), msg


def _eval_train(rank, world, metrics):
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = _cfg({"dp": 2}, world, **_EVAL, train={"steps": 1, "metrics_file": metrics, "eval_every": 1})
    run(cfg, Mesh(pp=1, dp=2, tp=1), print_fn=lambda *a, **k: None)


_EVAL = {"model": {"factory": "test_token_weighting:sharp_gpt"},
         "data": {"factory": "test_token_weighting:padded_dicts", "kwargs": {"n": 8, "mask": False},
                  "eval": {"factory": "test_token_weighting:uneven_eval",
                           "kwargs": {"n": 24, "seed": 7, "mask": False}}},
         "optimizer": {"name": "sgd", "lr": 0.0}}


def test_eval_loss_is_the_token_mean_of_the_eval_set(tmp_path):
    """dp2, 3 eval batches of padded dict samples scoring ~2× different counts; lr 0 keeps the initial model,
    so one process computes the expected number directly: Σ token losses / Σ scored tokens."""
    metrics = str(tmp_path / "m.jsonl")
    run_ranks(_eval_train, 2, metrics, timeout=300)
    rec = [json.loads(line) for line in open(metrics)][-1]
    torch.manual_seed(0)
    model = sharp_gpt(**MODEL["kwargs"]).eval()
    ev = UnevenEval(n=24, seed=7, mask=False)
    total, count, batch_means = 0.0, 0, []
    with torch.no_grad():
        for j in range(3):
            b = default_collate([ev[i] for i in range(8 * j, 8 * j + 8)])
            logits = model(b["input_ids"])[:, :-1].reshape(-1, 64)
            y = b["labels"][:, 1:].reshape(-1)
            s = F.cross_entropy(logits, y, reduction="sum").item()
            n = int((y != -100).sum())
            total, count = total + s, count + n
            batch_means.append(s / n)
    want = total / count
    assert rec["eval_tokens"] == count and rec["eval_batches"] == 3
    assert abs(rec["eval_loss"] - want) <= 1e-5 * want, (rec["eval_loss"], want)
    assert abs(sum(batch_means) / 3 - want) > 1e-3 * want   # a mean of batch means would be off
