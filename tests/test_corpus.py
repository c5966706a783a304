"""Tokenized corpora (parallel/corpus, launch/prepare_data): the written files, the windows read back,
each rank reading exactly its parity-contract indices, training at dp2 equal to one process, and one
clear error per kind of bad data (tests/test_bad_data.py)."""
import json
import os

import numpy as np
import pytest
import torch
from harness import run_ranks
from reference import assert_close_curve, reference_losses

from launch.prepare_data import main as prepare
from parallel.config import load_config
from parallel.corpus import CorpusError, TokenCorpus
from parallel.data import global_indices, rank_batch

DOCS = ["first document, short.", "the second one\nspans two lines.", "third: ünïcödé bytes"]


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(DOCS) * 1 + "\n")
    out = str(tmp_path / "c" / "corpus")
    assert prepare([str(src), "--out", out, "--tokenizer", "bytes"]) == 0
    return out


def _stream():
    return [b for d in DOCS for b in list(d.encode()) + [256]]


def test_files_and_windows(corpus):
    meta = json.load(open(corpus + ".json"))
    stream = _stream()
    assert (meta["documents"], meta["tokens"], meta["dtype"], meta["vocab_size"], meta["eos_id"]) == \
        (3, len(stream), "uint16", 257, 256)
    assert os.path.getsize(corpus + ".bin") == 2 * len(stream)
    idx = np.fromfile(corpus + ".idx", dtype="<i8").tolist()
    assert idx == [0, len(DOCS[0].encode()) + 1, len(DOCS[0].encode()) + len(DOCS[1].encode()) + 2, len(stream)]
    ds = TokenCorpus(corpus, seq_len=8, vocab_size=257)
    assert len(ds) == (len(stream) - 1 - 8) // 8 + 1 and ds.documents == 3
    for i in (0, 5, len(ds) - 1):
        x, y = ds[i]
        assert x.dtype == torch.int64 and x.tolist() == stream[8 * i:8 * i + 8]
        assert y.tolist() == stream[8 * i + 1:8 * i + 9]
    assert TokenCorpus(corpus + ".bin", seq_len=8, stride=3)[2][0].tolist() == stream[6:14]
    with pytest.raises(IndexError):
        ds[len(ds)]


class _Recording(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds, self.read = ds, []

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.read.append(i)
        return self.ds[i]


def test_each_dp_rank_reads_exactly_its_slice(corpus):
    G, dp = 6, 2
    for step in range(3):
        want = global_indices(step, G, len(TokenCorpus(corpus, 4)), seed=3, shuffle=True)
        parts = []
        for r in range(dp):
            rec = _Recording(TokenCorpus(corpus, 4))
            parts.append(rank_batch(rec, step, G, dp, r, seed=3, shuffle=True)[0])
            assert rec.read == want[r * G // dp:(r + 1) * G // dp]
        whole = torch.stack([TokenCorpus(corpus, 4)[i][0] for i in want])
        assert torch.equal(torch.cat(parts), whole)


def test_nanogpt_bare_bin(tmp_path):
    ids = np.arange(100, dtype=np.uint16) % 50
    ids.tofile(tmp_path / "train.bin")
    ds = TokenCorpus(str(tmp_path / "train.bin"), seq_len=10, vocab_size=50)
    assert ds.documents is None and ds[3][1].tolist() == (np.arange(31, 41) % 50).tolist()
    with pytest.raises(CorpusError, match=r"token id 49 does not fit the model's vocabulary of 40"):
        TokenCorpus(str(tmp_path / "train.bin"), seq_len=10, vocab_size=40)


def test_bpe_trained_offline_round_trips(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(DOCS * 20))
    out, tok_dir = str(tmp_path / "bpe"), str(tmp_path / "tok")
    assert prepare([str(src), "--out", out, "--train-bpe", "300", "--tokenizer-out", tok_dir]) == 0
    meta = json.load(open(out + ".json"))
    assert meta["documents"] == 60 and meta["vocab_size"] == 300 and meta["max_token"] < 300
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    idx = np.fromfile(out + ".idx", dtype="<i8")
    ids = np.fromfile(out + ".bin", dtype="<u2")
    assert tok.decode(ids[idx[1]:idx[2] - 1].tolist()) == DOCS[1]          # document 1 without its EOS
    assert ids[idx[2] - 1] == meta["eos_id"]


def _cfg(path, world=None):
    ov = ["model.kwargs.vocab_size=257", "model.kwargs.seq_len=16", "model.kwargs.n_layer=2",
          "model.kwargs.n_embd=32", "data.factory=parallel.corpus:TokenCorpus",
          f"data.kwargs={{path: {path}, seq_len: 16, vocab_size: 257}}", "data.global_batch_size=8",
          "data.micro_batch_size=2", "parallel.dp=2", "parallel.tp=1", "parallel.pp=1", "train.steps=3",
          "train.metrics_file=null", "train.finish=null", "train.log_every=1", "data.eval=null", "train.eval_every=0"]
    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                   "quickstart.yaml"), ov)
    return cfg.validate(world) if world else cfg


def _train(rank, world, path):
    from launch.train import run
    from parallel.mesh import Mesh
    return run(_cfg(path, world), Mesh(pp=1, dp=2, tp=1), print_fn=lambda *a, **k: None)["losses"]


def test_training_on_a_corpus_at_dp2_equals_one_process(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text(open(os.path.join(os.path.dirname(__file__), "..", "examples", "data", "corpus.txt")).read()[:20000])
    out = str(tmp_path / "c")
    assert prepare([str(src), "--out", out]) == 0
    got = run_ranks(_train, 2, out, timeout=300)[0]
    assert_close_curve(got, reference_losses(_cfg(out)), 1e-5, "dp2 zero-1 on a token corpus")
