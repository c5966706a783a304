"""Dict batches {input_ids, attention_mask, labels|targets} with ragged padding (−100 labels) and
``loss: model``: every layout trains to the one-process curve (loss = mean over the scored tokens of the
global batch; parallel/batch.py)."""
import pytest
import torch
from dict_cases import Padded, config, reference, train
from harness import run_ranks
from reference import assert_close_curve
from torch.utils.data import default_collate

from parallel.batch import IGNORE, Targets, model_loss, prepare, scored_count, token_loss

NANO = {"n": 32, "seq_len": 16, "vocab_size": 64, "key": "targets", "mask": False}


def _layout(dp, tp, pp, *extra):
    return [f"parallel.dp={dp}", f"parallel.tp={tp}", f"parallel.pp={pp}", *extra]


def _check(model, overrides, world, data_kwargs=None, what=""):
    got = run_ranks(train, world, model, overrides, data_kwargs, timeout=300)[0]
    want = reference(config(model, overrides, data_kwargs=data_kwargs))
    assert_close_curve(got, want, 1e-5, what)
    return got, want


def test_token_weighting_is_the_global_mean_not_a_mean_of_means():
    """Counting alone (no processes): 2 dp ranks × 2 micro-batches of ragged samples; the weighted micro
    losses average (over m and dp, as the engine does) to Σ ℓ / N, which a mean of means misses."""
    ds = Padded(n=8, seq_len=16)
    b = default_collate([ds[i] for i in range(8)])
    torch.manual_seed(0)
    logits = torch.randn(8, 16, 64)
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), b["labels"][:, 1:].reshape(-1))

    n_global = scored_count(b["labels"], "labels")
    fn = token_loss(lambda out, y: torch.nn.functional.cross_entropy(out.reshape(-1, 64), y.reshape(-1)), "token")
    total, means = 0.0, []
    for r in range(2):
        part = {k: v[4 * r:4 * r + 4] for k, v in b.items()}
        micro = prepare(dict(part), 2, lambda t: t, None, "token")
        for i, mb in enumerate(micro):
            mb.y.weight = 2 * 2 / n_global
            lg = logits[4 * r + 2 * i:4 * r + 2 * i + 2]
            total += fn(lg, mb.y).item() / (2 * 2)
            means.append(torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, 64),
                                                           mb.y.labels[:, 1:].reshape(-1)).item())
    assert abs(total - full.item()) < 1e-6
    assert abs(sum(means) / 4 - full.item()) > 1e-3          # the ragged data makes the difference visible
    assert scored_count(torch.tensor([[5, IGNORE, 7, IGNORE]]), "labels") == 1     # shifted: [-100, 7, -100]
    assert scored_count(torch.tensor([[-1, 5, -100, 7]]), "targets") == 2
    zero = fn(logits[:1].requires_grad_(), Targets(torch.full((1, 16), IGNORE), "labels", 0, 1.0))
    assert zero.item() == 0.0                                  # no scored token: 0, not NaN
    assert model_loss((torch.ones(2, 3), torch.tensor(2.5))).item() == 2.5


def test_dp2_padded_labels_equal_one_process():
    _check("llama", _layout(2, 1, 1, "zero.stage=1"), 2, what="dp2 padded cross_entropy")


def test_pp2_loss_model_hf_equals_one_process():
    _check("llama", _layout(1, 1, 2, "loss=model", "parallel.pp_schedule=1f1b"), 2, what="pp2 HF loss=model")


@pytest.mark.slow
def test_dp2_nanogpt_loss_model_equals_one_process():
    """nanoGPT's forward(idx, targets) unmodified: (logits, loss), ignore_index=-1, ragged targets."""
    _check("nanogpt", _layout(2, 1, 1, "loss=model"), 2, NANO, "dp2 nanoGPT loss=model")


@pytest.mark.slow
@pytest.mark.parametrize("model,loss,extra,data", [
    ("llama", "cross_entropy", (), None),
    ("llama", "model", (), None),
    ("nanogpt", "model", ("parallel.tp_plan=auto",), NANO),
])
def test_tp2_equals_one_process(model, loss, extra, data):
    _check(model, _layout(1, 2, 1, f"loss={loss}", *extra), 2, data, f"tp2 {model} {loss}")


@pytest.mark.slow
@pytest.mark.parametrize("model,loss,data", [("llama", "cross_entropy", None), ("nanogpt", "model", NANO)])
def test_pp2_more_equal_one_process(model, loss, data):
    _check(model, _layout(1, 1, 2, f"loss={loss}", "parallel.pp_schedule=zero_bubble"), 2, data,
           f"pp2 zero-bubble {model} {loss}")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cross_entropy", "model"])
def test_2x2x2_zero3_checkpointing_equals_one_process(loss):
    _check("llama", _layout(2, 2, 2, f"loss={loss}", "zero.stage=3", "activation_checkpointing.policy=full"), 8,
           what=f"2x2x2 ZeRO-3 + full checkpointing {loss}")


def test_bad_dict_batches_name_the_key_and_the_fix():
    from dict_cases import NanoGPT

    from parallel.batch import check_keys, check_labels
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"NanoGPT.forward takes no 'attention_mask' \(it takes idx, targets\); drop"):
        check_keys({"input_ids": ids, "attention_mask": ids, "targets": ids}, NanoGPT())
    with pytest.raises(ValueError, match=r"'input_ids' is missing"):
        check_keys({"idx": ids, "targets": ids}, NanoGPT())
    with pytest.raises(ValueError, match=r"both 'labels' .* and 'targets'"):
        check_labels({"input_ids": ids, "labels": ids, "targets": ids})
    with pytest.raises(ValueError, match=r"has no 'labels' .* or 'targets'"):
        check_labels({"input_ids": ids})
