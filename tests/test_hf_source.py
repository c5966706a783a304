"""Hugging Face ``datasets`` saved on disk as a source: prepare_data reads a saved dataset's text column into
the same token files as the equivalent .jsonl; ``hf_tokens`` turns ragged tokenized rows into padded dict
samples whose padding is unscored (label −100, mask 0); bad input is refused naming the directory and row."""
import json

import pytest
import torch

datasets = pytest.importorskip("datasets")     # in the test extra; optional for users

from launch.prepare_data import main as prepare_main  # noqa: E402
from launch.prepare_data import prepare_files  # noqa: E402
from parallel.corpus import CorpusError, TokenCorpus  # noqa: E402
from parallel.corpus.hf_source import hf_tokens  # noqa: E402

TEXTS = ["the cat sat on the mat", "", "a dog ran", "pipes and tensors\nsplit in two"]


def test_prepare_data_reads_a_saved_dataset_like_jsonl(tmp_path):
    d = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))}).save_to_disk(str(d))
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS if t))
    assert prepare_main([str(d), "--out", str(tmp_path / "a")]) == 0
    assert prepare_main([str(jl), "--out", str(tmp_path / "b")]) == 0
    a, b = TokenCorpus(str(tmp_path / "a"), seq_len=4), TokenCorpus(str(tmp_path / "b"), seq_len=4)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes() and len(a) == len(b) > 0
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:1]}),
                          "valid": datasets.Dataset.from_dict({"text": TEXTS[2:3]})}).save_to_disk(str(dd))
    assert prepare_main([str(dd), "--out", str(tmp_path / "c"), "--hf-split", "valid"]) == 0
    assert (tmp_path / "c.bin").stat().st_size < (tmp_path / "a.bin").stat().st_size
    with pytest.raises(CorpusError, match=r"splits \['train', 'valid'\].*not 'test'"):
        prepare_files([str(dd)], str(tmp_path / "e"), hf_split="test", progress=False)
    with pytest.raises(CorpusError, match="no column 'body'"):
        prepare_files([str(d)], str(tmp_path / "f"), text_key="body", progress=False)
    with pytest.raises(CorpusError, match="row 0 of column 'n' is int"):
        prepare_files([str(d)], str(tmp_path / "g"), text_key="n", progress=False)


def test_hf_tokens_pads_and_masks_ragged_rows(tmp_path):
    d = tmp_path / "tok"
    rows = [[5, 6, 7], [1, 2, 3, 4, 5, 6], [9]]
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(d))
    ds = hf_tokens(str(d), seq_len=6, vocab_size=10)
    assert len(ds) == 3
    s = ds[0]
    assert s["input_ids"].tolist() == [5, 6, 7, 0, 0, 0]
    assert s["labels"].tolist() == [5, 6, 7, -100, -100, -100]
    assert s["attention_mask"].tolist() == [1, 1, 1, 0, 0, 0]
    assert torch.equal(ds[1]["labels"], torch.tensor(rows[1]))
    with pytest.raises(CorpusError, match="row 1 has 6 tokens, seq_len is 4"):
        hf_tokens(str(d), seq_len=4, vocab_size=10)[1]
    with pytest.raises(CorpusError, match="row 2 holds token id 9 outside"):
        hf_tokens(str(d), seq_len=6, vocab_size=8)[2]
    with pytest.raises(CorpusError, match="no column 'ids'"):
        hf_tokens(str(d), seq_len=6, vocab_size=10, column="ids")
    with pytest.raises(CorpusError, match="not a saved Hugging Face dataset"):
        hf_tokens(str(tmp_path), seq_len=6, vocab_size=10)
    with pytest.raises(CorpusError, match="single Dataset"):
        hf_tokens(str(d), seq_len=6, vocab_size=10, split="train")
