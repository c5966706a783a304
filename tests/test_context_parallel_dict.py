"""Dict batches under context parallelism (issue 23): labels, padding masks and position ids split by the
zig-zag cut of the tokens (parallel/context_parallel/micro.py), the loss = the mean over the scored tokens
of the global batch, exactly.

Default: the counting alone (no processes: the cp shards' weighted losses sum to the one-process loss,
shifted labels and aligned targets, padding folded into document ids). Slow (suite budget): the HF Llama on
ragged left-padded SFT-like samples at cp2, both algorithms, with loss=cross_entropy and loss=model
(transformers' own loss, given the shard's shift_labels); the same through pp2 × cp2; the refusals.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from dict_cases import Padded, config, reference
from harness import run_ranks
from reference import assert_close_curve
from torch.utils.data import default_collate

from parallel.batch import MicroBatch, Targets, token_loss
from parallel.context_parallel.micro import shard_micro

LEFT = "test_context_parallel_dict:left_padded"


class LeftPadded(Padded):
    """:class:`dict_cases.Padded` with the padding first: real queries would see the padding keys under the
    causal mask alone, so only a correct padding mask gives the one-process numbers."""

    def __getitem__(self, i):
        d = super().__getitem__(i)
        shift = int(d["attention_mask"].sum()) if "attention_mask" in d else 0
        return {k: torch.roll(v, self.s - shift) for k, v in d.items()}


def left_padded(**kw):
    return LeftPadded(**kw)


def _ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("key", ["labels", "targets"])
def test_shards_weigh_to_the_one_process_loss(key):
    """2 cp ranks × the micro-batch of 4 ragged samples: Σ_c token_loss(shard c) / cp = the mean over scored
    tokens of the whole micro-batch (the engine averages over dp×cp); the padding becomes own documents."""
    ds = Padded(n=4, seq_len=16, key=key)
    b = default_collate([ds[i] for i in range(4)])
    y = b.pop(key)
    logits = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(0))
    lg, yy = (logits[:, :-1], y[:, 1:]) if key == "labels" else (logits, torch.where(y < 0, -100, y))
    full = F.cross_entropy(lg.reshape(-1, 64), yy.reshape(-1), ignore_index=-100)
    n = int((yy != -100).sum())
    fn, total = token_loss(_ce, "token"), 0.0
    for r in range(2):
        cp = SimpleNamespace(group=SimpleNamespace(size=2, rank=r))
        mb = MicroBatch(b["input_ids"], Targets(y, key, n, 1 / n), {"attention_mask": b["attention_mask"]})
        local, docs = shard_micro(cp, mb, "token", None)
        idx = torch.cat([torch.arange(r * 4, r * 4 + 4), torch.arange((3 - r) * 4, (4 - r) * 4)])
        assert torch.equal(local.x, b["input_ids"][:, idx]) and "attention_mask" not in local.kwargs
        assert torch.equal(local.kwargs["position_ids"], idx.expand(4, 8))
        pad = b["attention_mask"] == 0
        assert (docs[pad] < 0).all() and (docs[~pad] == 0).all()
        assert len(set(docs[0][pad[0]].tolist())) == int(pad[0].sum())             # one document per pad token
        total += fn(logits[:, idx], local.y).item() / 2
    assert abs(total - full.item()) < 1e-6, (total, full.item())


def _train(rank, world, model, overrides, factory):
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = config(model, overrides, world, factory=factory)
    p = cfg.parallel
    return run(cfg, Mesh(pp=p.pp, dp=p.dp, tp=p.tp, cp=p.cp), print_fn=lambda *a, **k: None)["losses"]


def _check(world, overrides, what, factory=LEFT):
    got = run_ranks(_train, world, "llama", overrides, factory, timeout=300)
    want = reference(config("llama", overrides, factory=factory))
    for losses in got:
        assert_close_curve(losses, want, 1e-5, what)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ring", "ulysses"])
def test_llama_cp2_padded_dict_batches(algorithm):
    for loss in ("cross_entropy", "model"):
        _check(2, ["parallel.cp=2", f"parallel.cp_algorithm={algorithm}", f"loss={loss}"],
               f"cp2 {algorithm} padded {loss}")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cross_entropy", "model"])
def test_llama_pp2_cp2_padded_dict_batches(loss):
    _check(4, ["parallel.cp=2", "parallel.pp=2", "parallel.pp_schedule=1f1b", f"loss={loss}"], f"pp2×cp2 {loss}")


def _refused(rank, world, overrides, data_kwargs):
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = config("llama", overrides, world, data_kwargs)
    try:
        run(cfg, Mesh(cp=2), print_fn=lambda *a, **k: None)
    except Exception as e:                 # noqa: BLE001 - the message is what is checked
        return str(e)
    return None


@pytest.mark.slow
def test_dict_batches_refused_with_the_reason():
    msgs = run_ranks(_refused, 2, ["parallel.cp=2", "loss=mse"], None)
    assert all(m and "loss='mse'" in m and "parallel.cp=1" in m for m in msgs), msgs
