"""The quickstart's data: the bundled text, tokenized by a byte-level BPE trained offline on it, packed
into fixed-length samples with document boundaries. Factories for configs:

    data:
      factory: examples.text_corpus:packed
      kwargs: {seq_len: 64, vocab_size: 1024}                  # the bundled corpus, prepared on first use
      eval: {factory: examples.text_corpus:packed, kwargs: {split: heldout, seq_len: 64, vocab_size: 1024}}
    train:
      finish: examples.text_corpus:sample                      # generated text, decoded by the corpus's tokenizer

On first use (whichever rank gets there first, under a file lock; the others wait and read the result)
the bundled text (:func:`examples.gpt.default_corpus`, Python's reference documentation, documents
separated by blank lines) is split into ``examples/data/train.txt`` and ``heldout.txt`` (every 20th
document held out), and exactly the README's commands are run on them:

    python -m launch.prepare_data examples/data/train.txt --out D/train --train-bpe V --tokenizer-out D/tokenizer
    python -m launch.prepare_data examples/data/heldout.txt --out D/heldout --tokenizer D/tokenizer

(D = ``examples/data/bpe<V>``). ``path=`` names a corpus prepared by hand instead (``split`` is then
ignored). Each sample is a :class:`parallel.corpus.PackedCorpus` dict: ``input_ids``, ``labels`` (−100 at
each document's first token), ``position_ids`` restarting per document and, with ``mask="4d"`` (the
default, for :class:`examples.gpt.GPT`), the bool document mask [1, s, s]; transformers models take
``mask="position_ids"`` and build the same mask themselves.
"""
from __future__ import annotations

import fcntl
import json
import os

import torch

from examples.gpt import default_corpus
from launch.prepare_data import prepare_files
from parallel.corpus import PackedCorpus
from parallel.corpus.tokenizer import load_tokenizer

__all__ = ["DATA", "split_text", "prepared", "packed", "tokenizer_of", "sample"]

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
HELDOUT_EVERY = 20


def split_text(src: str | None = None, out_dir: str = DATA) -> tuple[str, str]:
    """``train.txt`` and ``heldout.txt`` in ``out_dir`` from the blank-line separated documents of ``src``
    (default: the bundled corpus): document d goes to heldout when d % 20 == 0."""
    src = src or default_corpus()
    with open(src, encoding="utf-8") as f:
        docs = [d.strip("\n") for d in f.read().split("\n\n") if d.strip()]
    paths = (os.path.join(out_dir, "train.txt"), os.path.join(out_dir, "heldout.txt"))
    parts = ([d for i, d in enumerate(docs) if i % HELDOUT_EVERY], docs[::HELDOUT_EVERY])
    for path, part in zip(paths, parts):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n\n".join(part) + "\n")
        os.replace(tmp, path)
    return paths


def prepared(vocab_size: int = 1024, root: str = DATA, src: str | None = None) -> str:
    """The directory ``root/bpe<V>`` holding ``train``, ``heldout`` (corpora) and ``tokenizer/``, made once
    from ``src`` (default: the bundled text; module docstring); concurrent callers (the ranks of a job)
    wait on a file lock for the first."""
    out = os.path.join(root, f"bpe{vocab_size}")
    done = os.path.join(out, "heldout.json")                     # written last
    if os.path.isfile(done):
        return out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(root, ".prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.isfile(done):
                train, heldout = split_text(src, out_dir=root)
                tok = os.path.join(out, "tokenizer")
                meta = prepare_files([train], os.path.join(out, "train"), train_bpe=vocab_size, tokenizer_out=tok,
                                     progress=False)
                held = prepare_files([heldout], os.path.join(out, "heldout"), tokenizer=tok, progress=False)
                print(f"prepared {out}: a byte-level BPE of {vocab_size} tokens trained on {train}; train "
                      f"{meta['documents']:,} documents, {meta['tokens']:,} tokens; heldout {held['documents']:,} "
                      f"documents, {held['tokens']:,} tokens", flush=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def packed(seq_len: int = 64, vocab_size: int = 1024, path: str | None = None, split: str = "train",
           mask: str = "4d") -> PackedCorpus:
    """Data factory: packed samples of ``path`` (a prepared corpus prefix) or of the bundled corpus's
    ``split`` ("train" | "heldout"), prepared on first use."""
    if path is None:
        if split not in ("train", "heldout"):
            raise ValueError(f"examples.text_corpus.packed: split={split!r} is not 'train' or 'heldout'")
        path = os.path.join(prepared(vocab_size), split)
    return PackedCorpus(path, seq_len, vocab_size, mask=mask)


def tokenizer_of(path: str):
    """The tokenizer a corpus was written with (its ``.json`` names it)."""
    with open(path + ".json") as f:
        return load_tokenizer(json.load(f)["tokenizer"])


def sample(model, cfg=None, prompt: str = "The ", n_new: int = 60, seed: int = 0) -> str:
    """``train.finish: examples.text_corpus:sample`` — print text the trained GPT generates from ``prompt``,
    encoded and decoded by the training corpus's tokenizer."""
    kw = dict(cfg.data.kwargs) if cfg is not None else {}
    path = kw.get("path") or os.path.join(prepared(kw.get("vocab_size", 1024)), "train")
    tok = tokenizer_of(path)
    g = torch.Generator().manual_seed(seed)
    model.eval()
    out = model.generate(torch.tensor([tok.encode(prompt)]), n_new, temperature=0.8, generator=g)
    text = tok.decode(out[0].tolist())
    print("--- sample ---\n" + text + "\n--------------", flush=True)
    return text
