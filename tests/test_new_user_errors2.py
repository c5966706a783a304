"""Defects a second new-user pass met (session 11): each test failed on the code before its fix."""
import os

import pytest

from launch.prepare_data import main as prepare


def test_prepare_data_names_a_file_that_is_not_utf8_and_leaves_no_partial_corpus(tmp_path, capsys):
    """A Latin-1 .txt (or a .jsonl line with a stray byte) said only "'utf-8' codec can't decode byte 0xe9 in
    position 3: invalid continuation byte": no file, no line, no fix; a .jsonl failing after its first line left
    ``<out>.bin.tmp`` behind."""
    good = tmp_path / "good.txt"
    good.write_text("first document\n\nsecond one\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    out = str(tmp_path / "c")
    assert prepare([str(good), str(latin), "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"{latin}: not UTF-8 text (byte 0xe9 at byte offset 3" in err, err
    assert "iconv -f latin1 -t utf-8" in err and "--encoding latin-1" in err, err
    assert sorted(os.listdir(tmp_path)) == ["good.txt", "latin.txt"]          # no c.bin.tmp, no half corpus
    jl = tmp_path / "docs.jsonl"
    jl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert prepare([str(jl), "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"{jl}:2: not UTF-8 text (byte 0xe9" in err, err
    assert not [f for f in os.listdir(tmp_path) if f.startswith("c.")]
    # the fix it names works: --encoding latin-1 reads the file as written
    assert prepare([str(latin), "--out", out, "--encoding", "latin-1"]) == 0
    from parallel.corpus import TokenCorpus
    c = TokenCorpus(out, seq_len=4)
    assert bytes(int(t) for t in c.tokens[:13]).decode("utf-8") == "caf\u00e9 au lait"
