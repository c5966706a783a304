"""Defects a new user met following the README (session 10): each test failed on the code before its fix."""
import pytest
import torch


def test_mse_refuses_a_target_that_is_not_one_value_per_prediction():
    """`loss=mse` on the GPT config (integer class ids) ended in torch's "shape '[2, 16, 64]' is invalid for input
    of size 32"; a transposed target of the same size was reshaped onto the wrong predictions silently."""
    from parallel.loss import mse
    logits, ids = torch.randn(2, 16, 64), torch.randint(0, 64, (2, 16))
    with pytest.raises(ValueError, match=r"predicts \(2, 16, 64\) \(2048 values\) but the target is torch.int64 "
                                         r"\(2, 16\) \(32 values\) \(integer class ids: use loss: cross_entropy\)"):
        mse(logits, ids)
    pred, target = torch.randn(3, 2), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"predicts \(3, 2\) \(6 values\) but the target is torch.float32 \(2, 3\)"):
        mse(pred, target)
    # what trains: the same shape, or the same up to size-1 dimensions (XOR's (B, 1) against (B,))
    torch.testing.assert_close(mse(pred, target.T), torch.nn.functional.mse_loss(pred, target.T))
    p1, t1 = torch.randn(4, 1), torch.randn(4)
    torch.testing.assert_close(mse(p1, t1), torch.nn.functional.mse_loss(p1, t1[:, None]))
    assert float(mse(p1, t1)) == pytest.approx(float(((p1[:, 0] - t1) ** 2).mean()), rel=1e-6)


def test_a_tokenizer_directory_without_a_tokenizer_is_named(tmp_path):
    """`prepare_data --tokenizer DIR` with a DIR holding no tokenizer said "reading it needs the `tokenizers` or
    `transformers` package: pip install tokenizers" (tokenizers installed, no transformers) or transformers'
    "Couldn't instantiate the backend tokenizer ... install sentencepiece or tiktoken" (with it)."""
    from parallel.corpus.tokenizer import load_tokenizer, train_bpe
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(FileNotFoundError, match=r"the directory holds no tokenizer \(none of \['tokenizer.json', "
                                                r"'tokenizer_config.json'.*--train-bpe VOCAB"):
        load_tokenizer(str(tmp_path))
    pytest.importorskip("tokenizers")
    want = train_bpe(["a b c ab abc " * 20] * 4, 260, str(tmp_path / "bpe"))
    got = load_tokenizer(str(tmp_path / "bpe"))                    # a directory holding tokenizer.json still loads
    assert got.vocab_size == want.vocab_size and got.encode("abc ab") == want.encode("abc ab")
