"""Hugging Face ``datasets`` saved on local disk as a source (``Dataset.save_to_disk`` / ``DatasetDict``).

Two uses, both offline (``datasets.load_from_disk``; nothing is downloaded):

* text → token files: ``python -m launch.prepare_data DIR --text-key text --out data/c ...`` reads the
  ``text_key`` column of a saved dataset directory like a ``.jsonl`` file (:func:`hf_documents`), so packing,
  document boundaries and sharded memory-mapped reading (:mod:`.token_file`, :mod:`.packed`) apply unchanged;
* already tokenized rows: ``data: {factory: parallel.corpus.hf_source:hf_tokens, kwargs: {path: DIR,
  seq_len: 256, vocab_size: V}}`` — one sample per row of the ``input_ids`` column (ragged lists, e.g. SFT
  examples), as the dict batch ``{input_ids, attention_mask, labels}``: a row shorter than ``seq_len`` is
  right-padded with ``pad_id`` and its padding gets label −100 and mask 0 (the token-weighted loss of
  :mod:`parallel.batch` then scores exactly the row's tokens); labels are the input ids (shifted by the loss,
  transformers' convention). A row longer than ``seq_len``, or holding an id outside [0, vocab_size), is an
  error naming the directory and the row — not truncated or clamped silently.

A ``DatasetDict`` directory needs ``split`` (default "train" when it has one). The rows a rank reads are the
parity contract's indices (the trainer's sampler picks them); the dataset's own shuffling is not used.
"""
from __future__ import annotations

import os

import torch

from parallel.corpus.token_file import CorpusError

__all__ = ["is_dataset_dir", "load_local", "hf_documents", "hf_tokens", "HFTokens"]


def is_dataset_dir(path: str) -> bool:
    """A directory written by ``Dataset.save_to_disk`` (state.json) or ``DatasetDict.save_to_disk``."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                       for f in ("state.json", "dataset_dict.json"))


def load_local(path: str, split: str | None = None):
    """The ``datasets.Dataset`` saved at ``path`` (a split of a saved DatasetDict: ``split``, default "train")."""
    if not is_dataset_dir(path):
        raise CorpusError(f"{path} is not a saved Hugging Face dataset (no state.json or dataset_dict.json): write "
                          f"it with Dataset.save_to_disk(path), or give .txt / .jsonl / .parquet files")
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path}: reading a saved Hugging Face dataset needs the datasets package: "
                          f"pip install datasets") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        names = sorted(ds)
        pick = split or ("train" if "train" in ds else None)
        if pick not in ds:
            raise CorpusError(f"{path} holds the splits {names}; choose one with split= (--hf-split for "
                              f"prepare_data)" + (f", not {split!r}" if split else ""))
        ds = ds[pick]
    elif split is not None:
        raise CorpusError(f"{path} is a single Dataset, not a DatasetDict: drop split={split!r}")
    return ds


def hf_documents(path: str, text_key: str, split: str | None = None):
    """Yield the non-empty strings of column ``text_key`` of the saved dataset at ``path``."""
    ds = load_local(path, split)
    if text_key not in ds.column_names:
        raise CorpusError(f"{path}: no column {text_key!r}; pass --text-key (columns: {ds.column_names})")
    texts = (t for batch in ds.select_columns([text_key]).iter(batch_size=1024) for t in batch[text_key])
    for n, text in enumerate(texts):            # streamed in batches: the column is never whole in memory
        if text is None:
            continue
        if not isinstance(text, str):
            raise CorpusError(f"{path}: row {n} of column {text_key!r} is {type(text).__name__}, not text; "
                              f"pass --text-key with a string column")
        if text:
            yield text


class HFTokens(torch.utils.data.Dataset):
    """Map-style dict samples from a tokenized saved dataset (module docstring)."""

    def __init__(self, path: str, seq_len: int, vocab_size: int, column: str = "input_ids",
                 split: str | None = None, pad_id: int = 0):
        if seq_len < 1 or vocab_size < 1 or not 0 <= pad_id < vocab_size:
            raise CorpusError(f"hf_tokens: seq_len={seq_len}, vocab_size={vocab_size}, pad_id={pad_id}: need "
                              f"seq_len ≥ 1 and 0 ≤ pad_id < vocab_size")
        self.ds, self.path, self.column = load_local(path, split), path, column
        if column not in self.ds.column_names:
            raise CorpusError(f"{path}: no column {column!r} (columns: {self.ds.column_names}); pass column=, or "
                              f"tokenize text with python -m launch.prepare_data {path} --text-key <column>")
        if len(self.ds) == 0:
            raise CorpusError(f"{path}: the dataset has no rows")
        self.seq_len, self.vocab_size, self.pad_id = seq_len, vocab_size, pad_id

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        ids = self.ds[int(i)][self.column]
        n = len(ids)
        if n == 0 or n > self.seq_len:
            raise CorpusError(f"{self.path}: row {i} has {n} tokens, seq_len is {self.seq_len}: "
                              + ("drop empty rows" if n == 0 else "raise seq_len, or pack the text into fixed "
                                 "windows with python -m launch.prepare_data and parallel.corpus:PackedCorpus"))
        t = torch.as_tensor(ids, dtype=torch.long)
        bad = t[(t < 0) | (t >= self.vocab_size)]
        if bad.numel():
            raise CorpusError(f"{self.path}: row {i} holds token id {int(bad[0])} outside [0, {self.vocab_size}): "
                              f"wrong vocab_size, or a different tokenizer")
        x = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        x[:n] = t
        labels = torch.full((self.seq_len,), -100, dtype=torch.long)
        labels[:n] = t
        mask = torch.zeros(self.seq_len, dtype=torch.long)
        mask[:n] = 1
        return {"input_ids": x, "attention_mask": mask, "labels": labels}


def hf_tokens(path: str, seq_len: int, vocab_size: int, column: str = "input_ids", split: str | None = None,
              pad_id: int = 0) -> HFTokens:
    return HFTokens(path, seq_len, vocab_size, column, split, pad_id)
