"""Context parallelism does what the model does in one process, or refuses. Packed position ids (issue 23; found by
trying the quickstart's GPT and transformers' OPT at parallel.cp=2 with ``mask: position_ids``): both attend
across the documents in one process, while the cp attention masked per document — 4e-4 off the one-process
losses by step 3, silently. parallel/context_parallel/doc_probe.py asks the model first."""
from types import SimpleNamespace

import pytest
import torch
from dict_cases import config, reference
from harness import run_ranks
from reference import assert_close_curve

from parallel.batch import MicroBatch, Targets
from parallel.context_parallel.doc_probe import masks_documents
from parallel.context_parallel.micro import shard_micro
from parallel.corpus import TokenWriter

GPT = {"factory": "examples.gpt:build", "kwargs": {"vocab_size": 64, "seq_len": 16, "n_layer": 2, "n_head": 4,
                                                   "n_embd": 32}}


def test_probe_tells_models_apart():
    """Llama builds the document mask from restarting position ids; our GPT (is_causal SDPA) does not."""
    from examples.gpt import build
    from examples.hf_causal_lm import llama_tiny
    torch.manual_seed(0)
    assert masks_documents(llama_tiny()) is True
    gpt = build(**GPT["kwargs"]).train()
    assert masks_documents(gpt) is False and gpt.training
    assert masks_documents(torch.nn.Sequential(torch.nn.Linear(4, 4))) is None       # no token embedding
    with torch.device("meta"):
        assert masks_documents(build(**GPT["kwargs"])) is None


@pytest.mark.parametrize("own,docs", [(True, [1, 1, 2, 2, 2, 2, 3, 3]), (None, [1, 1, 2, 2, 2, 2, 3, 3]),
                                       (False, None)])
def test_shard_keeps_documents_only_for_a_model_that_does(own, docs):
    pos = torch.tensor([[0, 1, 0, 1, 2, 3, 0, 1]])
    x = torch.arange(8)[None]
    cp = SimpleNamespace(group=SimpleNamespace(size=2, rank=0), masks_documents=own)
    mb = MicroBatch(x, Targets(x, "targets", 8, 1 / 8), {"position_ids": pos})
    local, got = shard_micro(cp, mb, "token", None)
    assert (got.tolist()[0] if got is not None else None) == docs
    assert local.kwargs["position_ids"].tolist() == [[0, 1, 0, 1]]                 # zig-zag chunks 0 and 3


def _corpus(tmp_path):
    g = torch.Generator().manual_seed(1)
    w = TokenWriter(str(tmp_path / "c"), 64, 63)
    for n in torch.randint(2, 12, (30,), generator=g).tolist():
        w.add(torch.randint(1, 63, (n,), generator=g).tolist())
    w.close()
    return {"path": str(tmp_path / "c"), "seq_len": 16, "vocab_size": 64}


def _train(rank, world, data):
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = _config(data, ["parallel.cp=2"]).validate(world)
    return run(cfg, Mesh(cp=2), print_fn=lambda *a, **k: None)["losses"]


def _config(data, ov=()):
    cfg = config("llama", ov, data_kwargs=data, factory="parallel.corpus:PackedCorpus")
    cfg.model.factory, cfg.model.kwargs = GPT["factory"], dict(GPT["kwargs"])
    return cfg


@pytest.mark.slow
def test_gpt_packed_positions_cp2_equals_one_process(tmp_path):
    data = _corpus(tmp_path)
    want = reference(_config(data))
    got = run_ranks(_train, 2, data, timeout=300)
    for losses in got:
        assert_close_curve(losses, want, 1e-5, "gpt packed position ids cp2")


class OwnAttention(torch.nn.Module):
    """Attention computed in the model's own code (as transformers' Bloom: alibi + baddbmm + softmax)."""

    def __init__(self):
        super().__init__()
        self.emb, self.qkv = torch.nn.Embedding(64, 8), torch.nn.Linear(8, 24)

    def forward(self, idx, position_ids=None):
        q, k, v = self.qkv(self.emb(idx)).chunk(3, -1)
        s = idx.shape[1]
        w = (q @ k.transpose(1, 2)).masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        return w.softmax(-1) @ v


def test_a_model_whose_attention_never_reaches_cp_is_refused_at_its_first_forward():
    """Bloom at parallel.cp=2 trained 7.5e-5 off one process by step 3: each rank attended within its own shard
    only, and without a causal mask (the cp mask function builds none). Refused at setup by the probe
    (tests/test_new_user_errors3.py); the first forward's check stays for what the probe cannot run."""
    from parallel.context_parallel import ContextParallel
    cp = ContextParallel(SimpleNamespace(size=2, rank=0))
    model = OwnAttention()
    with pytest.raises(ValueError, match=r"parallel.cp=2: OwnAttention's forward made no call to the cp attention"):
        cp.prepare(model)
    cp._name = "OwnAttention"                        # as prepared when the probe has no verdict
    x = torch.arange(8)[None]
    with pytest.raises(ValueError, match=r"parallel.cp=2: OwnAttention's forward made no call to the cp attention: .*"
                                         r"set parallel.cp=1 for this model"):
        with cp.active():
            model(x[:, :4], position_ids=x[:, :4])
    with pytest.raises(RuntimeError, match="boom"), cp.active():   # a failing body is reported as itself
        raise RuntimeError("boom")


def test_probe_leaves_no_trace():
    """Mode, RNG and buffers are as before the probe (a forward may count into a buffer)."""
    class Counting(OwnAttention):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, idx, position_ids=None):
            self.seen += idx.numel()
            return super().forward(idx, position_ids)

    m = Counting().train()
    state = torch.get_rng_state()
    assert masks_documents(m) is False
    assert m.training and m.seen.item() == 0 and torch.equal(torch.get_rng_state(), state)
