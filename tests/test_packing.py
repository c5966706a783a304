"""Packed samples with document boundaries (parallel/corpus/packed.py): position ids restart per
document, attention stays inside each document, and packed training equals one process."""
import pytest
import torch
from dict_cases import config, reference, train
from harness import run_ranks
from reference import assert_close_curve

from parallel.corpus import CorpusError, PackedCorpus, TokenWriter, cu_seqlens, document_mask

EOS = 63


def _corpus(tmp_path, lengths, seed=0, name="c"):
    g = torch.Generator().manual_seed(seed)
    w = TokenWriter(str(tmp_path / name), 64, EOS)
    for n in lengths:
        w.add(torch.randint(1, EOS, (n,), generator=g).tolist())
    w.close()
    return str(tmp_path / name)


def test_positions_labels_and_metadata(tmp_path):
    path = _corpus(tmp_path, [5, 3, 9, 2, 12])            # documents of 6, 4, 10, 3, 13 tokens with EOS
    ds = PackedCorpus(path, 8)
    assert len(ds) == 36 // 8
    s0, s1 = ds[0], ds[1]
    assert s0["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert s1["position_ids"].tolist() == [0, 1, 0, 1, 2, 3, 4, 5]      # doc 1 cut at 8 restarts; doc 2 at 10
    assert s0["labels"].tolist() == [-100] + s0["input_ids"][1:6].tolist() + [-100, s0["input_ids"][7].item()]
    assert s0["input_ids"][5].item() == EOS
    pos = torch.stack([s0["position_ids"], s1["position_ids"]])
    cu, longest = cu_seqlens(pos)
    assert cu.tolist() == [0, 6, 8, 10, 16] and cu.dtype == torch.int32 and longest == 6
    m = document_mask(s0["position_ids"])[0]
    assert m.shape == (8, 8) and m[7, 6] and not m[7, 5] and not m[2, 3] and m[5, 0]
    assert PackedCorpus(path, 8, mask="4d")[0]["attention_mask"].shape == (1, 8, 8)
    bare = tmp_path / "bare.bin"
    bare.write_bytes(open(path + ".bin", "rb").read())
    assert PackedCorpus(str(bare), 8, eos_id=EOS)[1]["position_ids"].tolist() == s1["position_ids"].tolist()
    with pytest.raises(CorpusError, match=r"bare.bin: packing with document boundaries needs .* eos_id"):
        PackedCorpus(str(bare), 8)


@pytest.mark.parametrize("mask", ["position_ids", pytest.param("4d", marks=pytest.mark.slow)])
def test_each_document_is_seen_alone(tmp_path, mask):
    """The logits of a document inside a packed window equal those of the document run alone."""
    from examples.hf_causal_lm import llama_tiny
    path = _corpus(tmp_path, [5, 3, 9, 2, 12])
    torch.manual_seed(0)
    model = llama_tiny().eval()
    s = PackedCorpus(path, 16, mask=mask)[0]                # docs: [0, 6), [6, 10), [10, 16) of the third
    kw = {k: v[None] for k, v in s.items() if k != "labels"}
    packed = model(**kw).logits[0]
    for a, b in ((0, 6), (6, 10), (10, 16)):
        alone = model(input_ids=s["input_ids"][None, a:b]).logits[0]
        torch.testing.assert_close(packed[a:b], alone, rtol=1e-5, atol=1e-5)
    crossed = model(input_ids=s["input_ids"][None]).logits[0]
    assert (crossed[6:10] - packed[6:10]).abs().max() > 1e-3   # without the boundaries it differs


def test_packed_pp2_equals_one_process(tmp_path):
    """pp2: stage 1 rebuilds the document mask from the position ids it gets with its micro-batch."""
    g = torch.Generator().manual_seed(1)
    path = _corpus(tmp_path, torch.randint(2, 20, (40,), generator=g).tolist())
    data = {"path": path, "seq_len": 16, "vocab_size": 64}
    ov = ["parallel.pp=2", "parallel.pp_schedule=1f1b"]
    got = run_ranks(train, 2, "llama", ov, data, "parallel.corpus:PackedCorpus", timeout=300)[0]
    want = reference(config("llama", ov, data_kwargs=data, factory="parallel.corpus:PackedCorpus"))
    assert_close_curve(got, want, 1e-5, "packed pp2")


@pytest.mark.slow
def test_packed_dp2_tp2_4d_mask_equals_one_process(tmp_path):
    g = torch.Generator().manual_seed(2)
    path = _corpus(tmp_path, torch.randint(2, 20, (40,), generator=g).tolist())
    data = {"path": path, "seq_len": 16, "vocab_size": 64, "mask": "4d"}
    ov = ["parallel.dp=2", "parallel.tp=2", "zero.stage=2"]
    got = run_ranks(train, 4, "llama", ov, data, "parallel.corpus:PackedCorpus", timeout=300)[0]
    want = reference(config("llama", ov, data_kwargs=data, factory="parallel.corpus:PackedCorpus"))
    assert_close_curve(got, want, 1e-5, "packed dp2 tp2 4d mask")
