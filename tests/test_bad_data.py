"""Bad data, one case each: every defect gives one CorpusError naming the file and the fix, before any
training (parallel/corpus/token_file.py, launch/prepare_data.py). A token id outside the model's vocabulary
found while training (a map-style dataset) is tests/test_checkpoint_integrity.py's DataError; a resume with
another global batch size is refused there too (test_other_data_contract_is_refused)."""
import os

import numpy as np
import pytest

from launch.prepare_data import main as prepare
from parallel.corpus import CorpusError, PackedCorpus, TokenCorpus

DOCS = ["first document, short.", "the second one\nspans two lines.", "third: ünïcödé bytes"]
FIX = r"re-create it with `python -m launch.prepare_data`"


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(DOCS) + "\n")
    out = str(tmp_path / "c" / "corpus")
    assert prepare([str(src), "--out", out, "--tokenizer", "bytes"]) == 0
    d = tmp_path / "copy"
    d.mkdir()
    for ext in (".bin", ".idx", ".json"):
        (d / f"c{ext}").write_bytes(open(out + ext, "rb").read())
    return str(d / "c")


def _flip(path, at, byte=b"\x07"):
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(byte)


def test_token_id_beyond_the_vocabulary(corpus):
    msg = r"c\.bin: token id 256 does not fit the model's vocabulary of 200 .*set the model's vocab_size ≥ 257"
    with pytest.raises(CorpusError, match=msg):
        TokenCorpus(corpus, 8, vocab_size=200)
    with pytest.raises(CorpusError, match=msg):
        PackedCorpus(corpus, 8, vocab_size=200)


def test_empty_token_file(corpus):
    open(corpus + ".bin", "wb").close()
    with pytest.raises(CorpusError, match=rf"c\.bin is empty; {FIX}"):
        TokenCorpus(corpus, 8)


@pytest.mark.parametrize("content", ["", "\n\n\n"])
def test_empty_input_text(tmp_path, capsys, content):
    (tmp_path / "empty.txt").write_text(content)
    assert prepare([str(tmp_path / "empty.txt"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert ("empty.txt is empty: there is no text to tokenize" if not content else
            "empty.txt: no documents found") in err, err
    assert not any(p.name.startswith("e.") for p in tmp_path.iterdir())        # no half corpus left behind


def test_wrong_dtype(corpus, tmp_path):
    with pytest.raises(CorpusError, match=r"stored as uint16, not 'uint32': drop the dtype argument"):
        TokenCorpus(corpus, 8, dtype="uint32")
    np.arange(7, dtype=np.uint16).tofile(tmp_path / "odd.bin")              # 14 bytes: not whole uint32s
    with pytest.raises(CorpusError, match=r"odd\.bin: 14 bytes is not a whole number of uint32 tokens"):
        TokenCorpus(str(tmp_path / "odd.bin"), 2, dtype="uint32")
    (np.arange(100) % 50).astype(np.uint32).tofile(tmp_path / "u32.bin")    # uint32 ids read as uint16: ids, 0, ids…
    with pytest.raises(CorpusError, match=r"u32\.bin: read as uint16, every second id is 0 .* pass dtype='uint32'"):
        TokenCorpus(str(tmp_path / "u32.bin"), 8, vocab_size=50)
    assert TokenCorpus(str(tmp_path / "u32.bin"), 8, vocab_size=50, dtype="uint32")[0][0].tolist() == list(range(8))
    (np.arange(100) % 50).astype(np.uint16).tofile(tmp_path / "u16.bin")    # uint16 read as uint32: huge ids
    with pytest.raises(CorpusError, match=r"does not fit .* if it holds uint16 ids, pass dtype='uint16'"):
        TokenCorpus(str(tmp_path / "u16.bin"), 8, vocab_size=50, dtype="uint32")


def test_missing_index(corpus):
    os.remove(corpus + ".idx")
    with pytest.raises(CorpusError, match=rf"c\.idx: the document index is missing .*; {FIX}"):
        TokenCorpus(corpus, 8)


def test_corrupted_files(corpus):
    _flip(corpus + ".bin", 6)                                               # same size: found by verify
    TokenCorpus(corpus, 8)
    with pytest.raises(CorpusError, match=rf"c\.bin: sha256 differs .*the file is corrupted\); {FIX}"):
        TokenCorpus(corpus, 8, verify=True)
    _flip(corpus + ".idx", 8, b"\xff")                                      # offset 1 no longer ≤ the next
    with pytest.raises(CorpusError, match=rf"c\.idx: the document index does not describe .*c\.bin .*; {FIX}"):
        TokenCorpus(corpus, 8)
    with open(corpus + ".json", "w") as f:
        f.write('{"format": "parallel3d-tok')
    with pytest.raises(CorpusError, match=rf"c\.json: cannot read the corpus metadata .*; {FIX}"):
        TokenCorpus(corpus, 8)


def test_truncated_token_file(corpus):
    with open(corpus + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(corpus + ".bin") - 4)
    with pytest.raises(CorpusError, match=rf"c\.bin: holds \d+ tokens but .*c\.json says \d+ \(truncated .*; {FIX}"):
        TokenCorpus(corpus, 8)
    with open(corpus + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(corpus + ".bin") - 1)                    # not even whole tokens
    with pytest.raises(CorpusError, match=r"is not a whole number of uint16 tokens \(a truncated file"):
        TokenCorpus(corpus, 8)


def test_missing_file_too_short_and_bad_jsonl(tmp_path, corpus, capsys):
    with pytest.raises(CorpusError, match=r"missing\.bin: no such token file; re-create it"):
        TokenCorpus(str(tmp_path / "missing"), 8)
    with pytest.raises(CorpusError, match=r"fewer than one sample .* use more text or a shorter seq_len"):
        TokenCorpus(corpus, 1000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    assert prepare([str(bad), "--out", str(tmp_path / "j")]) == 2
    assert "bad.jsonl:2: no string field 'text'; pass --text-key" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "j.bin")
