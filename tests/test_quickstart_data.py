"""The quickstart's tokenized path (examples/text_corpus.py, configs/quickstart.yaml): the bundled text split
into train / held-out documents, a byte-level BPE trained offline once (the ranks wait on a lock), packed
documents whose boundaries are the corpus index, the GPT's document mask, and the quickstart config
trained at pp2 (and 2×2×2, slow) equal to one process."""
import json
import os
import threading

import numpy as np
import pytest
import torch
from dict_cases import reference
from harness import run_ranks
from reference import assert_close_curve

import examples.text_corpus as tc
from examples.gpt import GPT, default_corpus
from parallel.config import load_config
from parallel.corpus import PackedCorpus, TokenWriter, document_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 300


def _source(tmp_path, chars=30000):
    src = tmp_path / "src.txt"
    src.write_text(open(default_corpus(), encoding="utf-8").read()[:chars], encoding="utf-8")
    return str(src)


def _docs(path):
    return [d.strip("\n") for d in open(path, encoding="utf-8").read().split("\n\n") if d.strip()]


def test_prepared_once_split_bpe_and_packed_documents(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tokenizers")
    src = _source(tmp_path)
    calls, real = [], tc.prepare_files
    monkeypatch.setattr(tc, "prepare_files", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(tc.prepared(V, str(tmp_path), src))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = str(tmp_path / f"bpe{V}")
    assert outs == [out] * 3 and len(calls) == 2                  # train + heldout, prepared by one caller only
    docs = _docs(src)
    assert _docs(tmp_path / "heldout.txt") == docs[::20]
    assert _docs(tmp_path / "train.txt") == [d for i, d in enumerate(docs) if i % 20]
    meta = json.load(open(os.path.join(out, "train.json")))
    assert meta["vocab_size"] == V and meta["documents"] == len(docs) - len(docs[::20])
    assert json.load(open(os.path.join(out, "heldout.json")))["tokenizer"] == meta["tokenizer"]
    tok = tc.tokenizer_of(os.path.join(out, "train"))
    idx = np.fromfile(os.path.join(out, "train.idx"), dtype="<i8")
    ids = np.fromfile(os.path.join(out, "train.bin"), dtype="<u2")
    train_docs = _docs(tmp_path / "train.txt")
    for d in range(len(train_docs)):                                # every document decodes back, EOS after it
        assert tok.decode(ids[idx[d]:idx[d + 1] - 1].tolist()) == train_docs[d]
        assert ids[idx[d + 1] - 1] == meta["eos_id"]
    ds = tc.packed(32, V, path=os.path.join(out, "train"))
    starts = set(idx.tolist())
    for i in range(len(ds)):                                        # boundaries = the index; labels −100 there
        s = ds[i]
        assert torch.equal(s["input_ids"], torch.from_numpy(ids[32 * i:32 * i + 32].astype(np.int64)))
        zero = (s["position_ids"] == 0).nonzero().reshape(-1).tolist()
        assert zero == sorted({0} | {t - 32 * i for t in starts if 32 * i < t < 32 * i + 32})
        assert (s["labels"] == -100).nonzero().reshape(-1).tolist() == zero
        assert torch.equal(s["attention_mask"], document_mask(s["position_ids"]))
    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      [f"data.kwargs={{path: {out}/train, seq_len: 32, vocab_size: {V}}}"])
    text = tc.sample(GPT(V, 32, 1, 2, 16), cfg, n_new=5)
    assert text.startswith("The ") and "--- sample ---" in capsys.readouterr().out


def test_gpt_document_mask_sees_each_document_alone(tmp_path):
    """examples.gpt.GPT with the 4D document mask: each document's logits in a packed window equal the
    document run alone (positions from 0); without the mask they differ."""
    w = TokenWriter(str(tmp_path / "c"), 64, 63)
    g = torch.Generator().manual_seed(0)
    for n in (5, 3, 9):
        w.add(torch.randint(1, 63, (n,), generator=g).tolist())
    w.close()
    s = PackedCorpus(str(tmp_path / "c"), 16, 64, mask="4d")[0]   # documents [0, 6), [6, 10), [10, 16)
    torch.manual_seed(0)
    model = GPT(64, 16, 2, 4, 32).eval()
    packed = model(s["input_ids"][None], position_ids=s["position_ids"][None],
                   attention_mask=s["attention_mask"][None])[0]
    for a, b in ((0, 6), (6, 10), (10, 16)):
        torch.testing.assert_close(packed[a:b], model(s["input_ids"][None, a:b])[0], rtol=1e-5, atol=1e-5)
    crossed = model(s["input_ids"][None], position_ids=s["position_ids"][None])[0]
    assert (crossed[6:10] - packed[6:10]).abs().max() > 1e-3


def _cfg(out, layout, world=None):
    ov = [f"model.kwargs={{vocab_size: {V}, seq_len: 16, n_layer: 2, n_head: 2, n_embd: 32, tie: true}}",
          f"data.kwargs={{path: {out}/train, seq_len: 16, vocab_size: {V}}}", "data.eval=null",
          "train.eval_every=0", "data.global_batch_size=8", "data.micro_batch_size=2", "train.steps=3",
          "train.metrics_file=null", "train.finish=null", *layout]
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), ov)
    return cfg.validate(world) if world else cfg


def _train(rank, world, out, layout):
    from launch.train import run
    from parallel.mesh import Mesh
    cfg = _cfg(out, layout, world)
    p = cfg.parallel
    return run(cfg, Mesh(pp=p.pp, dp=p.dp, tp=p.tp), print_fn=lambda *a, **k: None)["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.dp=1", "parallel.tp=1", "parallel.pp=2"], ["data.micro_batch_size=1"]],
                         ids=["pp2", "2x2x2"])
def test_quickstart_config_equals_one_process(tmp_path, layout):
    """The quickstart's data path (packed BPE documents, the 4D document mask through every stage) at pp2
    and at the quickstart's own 2×2×2 ZeRO-1, tiny model, 3 steps: losses = one process to 1e-5."""
    pytest.importorskip("tokenizers")
    out = tc.prepared(V, str(tmp_path), _source(tmp_path))
    world = _cfg(out, layout).world_size
    got = run_ranks(_train, world, out, layout, timeout=600)[0]
    assert_close_curve(got, reference(_cfg(out, layout)), 1e-5, f"quickstart data {layout}")
