"""Tokenizers for :mod:`launch.prepare_data`: one small interface over three sources.

    load_tokenizer("bytes")           UTF-8 bytes: ids 0–255, EOS 256, vocabulary 257 (no dependency)
    load_tokenizer("path/to/dir")     a local tokenizer: ``tokenizer.json`` through the ``tokenizers``
                                      library, else transformers' AutoTokenizer (local files only)
    load_tokenizer(meta["tokenizer"]) the tokenizer a corpus was written with (its ``.json`` records
                                      "bytes", "tokenizers:/abs/tokenizer.json" or "transformers:/abs/dir")
    train_bpe(texts, vocab_size, out) a byte-level BPE tokenizer trained offline on the given texts
                                      (``tokenizers``), saved as ``out/tokenizer.json``

Each returns an object with ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``eos_id`` (None when the tokenizer has no end-of-text token) and ``name`` (recorded in the corpus
metadata, and read back by :func:`load_tokenizer`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable

__all__ = ["Tokenizer", "load_tokenizer", "train_bpe", "EOS_NAMES"]

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
# the files a saved tokenizer directory holds (tokenizers' and transformers' save formats)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "tekken.json")


@dataclass
class Tokenizer:
    encode: Callable[[str], list]
    vocab_size: int
    eos_id: int | None
    name: str
    decode: Callable[[list], str] = None


def _bytes() -> Tokenizer:
    return Tokenizer(lambda text: list(text.encode("utf-8")), 257, 256, "bytes",
                     lambda ids: bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace"))


def _from_tokenizers(path: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    path = os.path.abspath(path)
    try:
        tok = HFTokenizer.from_file(path)
    except Exception as e:                      # tokenizers raises a bare Exception("expected value at line 1 ...")
        raise ValueError(f"tokenizer {path}: not a tokenizers tokenizer.json ({type(e).__name__}: {e}); give a "
                         f"tokenizer.json, a local tokenizer directory, 'bytes', or --train-bpe VOCAB") from None
    eos = next((tok.token_to_id(t) for t in EOS_NAMES if tok.token_to_id(t) is not None), None)
    return Tokenizer(lambda text: tok.encode(text).ids, tok.get_vocab_size(), eos, f"tokenizers:{path}",
                     lambda ids: tok.decode([int(i) for i in ids]))


def _from_transformers(path: str) -> Tokenizer:
    from transformers import AutoTokenizer
    path = os.path.abspath(path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return Tokenizer(lambda text: tok.encode(text, add_special_tokens=False), len(tok), tok.eos_token_id,
                     f"transformers:{path}", lambda ids: tok.decode([int(i) for i in ids]))


def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"``, a ``tokenizer.json`` file, or a local directory holding one (or any tokenizer
    transformers' AutoTokenizer reads from local files); also the ``name`` a corpus's metadata records
    ("tokenizers:PATH", "transformers:PATH")."""
    if spec == "bytes":
        return _bytes()
    kind, _, rest = spec.partition(":")
    if kind in ("tokenizers", "transformers") and rest:
        if not os.path.exists(rest):
            raise FileNotFoundError(f"tokenizer {spec!r}: {rest} no longer exists; re-create the corpus with "
                                    f"`python -m launch.prepare_data` or give the tokenizer's new location")
        return _from_tokenizers(rest) if kind == "tokenizers" else _from_transformers(rest)
    if os.path.isfile(spec):
        return _from_tokenizers(spec)
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"tokenizer {spec!r}: not 'bytes', a tokenizer.json file or a local directory; "
                                f"give one of those, or --train-bpe VOCAB to train one on the input")
    has_json = os.path.isfile(os.path.join(spec, "tokenizer.json"))
    if has_json:
        try:
            return _from_tokenizers(os.path.join(spec, "tokenizer.json"))
        except ImportError:
            pass
    elif not any(os.path.isfile(os.path.join(spec, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"tokenizer {spec!r}: the directory holds no tokenizer (none of "
                                f"{list(TOKENIZER_FILES)}); give the directory a tokenizer was saved to "
                                f"(tokenizer.save_pretrained(DIR) or --tokenizer-out), a tokenizer.json file, "
                                f"'bytes', or --train-bpe VOCAB")
    try:
        return _from_transformers(spec)
    except ImportError:
        need = ("the `tokenizers` or `transformers` package: pip install tokenizers" if has_json else
                "the `transformers` package (it holds no tokenizer.json): pip install -e '.[hf]'")
        raise ImportError(f"tokenizer {spec!r}: reading it needs {need} (or use --tokenizer bytes)") from None


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenization, ``<|endoftext|>`` as EOS) on
    ``texts`` offline and save it to ``out_dir/tokenizer.json``."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ImportError("--train-bpe needs the `tokenizers` package: pip install tokenizers "
                          "(or use --tokenizer bytes)") from None
    if vocab_size < 257 + 1:
        raise ValueError(f"--train-bpe {vocab_size}: a byte-level BPE needs a vocabulary of at least 258 "
                         f"(256 bytes, EOS, one merge)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    return _from_tokenizers(path)
