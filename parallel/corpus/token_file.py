"""Tokenized corpora on disk, read through a memory map.

A corpus is three files sharing a prefix (written by ``python -m launch.prepare_data``):

    <prefix>.bin    token ids, little-endian uint16 (vocabulary ≤ 65536) or uint32; the documents
                    concatenated, each followed by the EOS id when the tokenizer has one (the nanoGPT
                    ``train.bin`` convention, which is also readable alone: see :class:`TokenCorpus`)
    <prefix>.idx    little-endian int64 offsets of the D document starts, then the token count:
                    document d is tokens[idx[d] : idx[d+1]] (D + 1 numbers, non-decreasing, idx[0] = 0)
    <prefix>.json   metadata: format, dtype, tokens, documents, vocab_size, eos_id, max_token,
                    tokenizer, sha256 of .bin and .idx

:class:`TokenCorpus` is a map-style dataset of fixed-length training windows over the token stream:
sample i is the ``seq_len + 1`` tokens starting at ``i · stride`` (stride defaults to ``seq_len``:
consecutive windows share one token, the last target of one is the first input of the next), returned
as ``(x, y) = (w[:-1], w[1:])`` in int64. Windows cross document boundaries: the EOS between two
documents is what the model learns to predict there (GPT-2 / nanoGPT pretraining). Because the
dataset is map-style, the parity contract of :mod:`parallel.data` applies unchanged: each dp rank
reads only the windows of its slice of the global batch, and the memory map touches only their pages.

Every defect found when opening (missing, empty or truncated file, a size that is not a whole number of
tokens, an index that does not describe the file, a token id the model's vocabulary has no row for,
a bare uint32 ``.bin`` read as uint16 (every second id 0), unreadable metadata, a checksum mismatch with
``verify=True``) raises :class:`CorpusError` naming the file and the fix.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

__all__ = ["CorpusError", "TokenCorpus", "TokenWriter", "token_dtype", "FORMAT"]

FORMAT = "parallel3d-tokens/1"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_FIX = "re-create it with `python -m launch.prepare_data` (see README, 'Your own data')"


class CorpusError(ValueError):
    """A tokenized corpus that cannot be read as it is; the message names the file and the fix."""


def token_dtype(vocab_size: int) -> str:
    """The narrowest stored dtype for ids < ``vocab_size``."""
    if vocab_size < 1 or vocab_size > 2 ** 32:
        raise ValueError(f"vocab_size must be in [1, 2^32], got {vocab_size}")
    return "uint16" if vocab_size <= 2 ** 16 else "uint32"


def _sha256(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


class TokenWriter:
    """Append documents to ``<prefix>.bin`` / ``.idx`` and write ``<prefix>.json`` on :meth:`close`.
    Files are written under temporary names and renamed at the end, so a crash leaves no half corpus."""

    def __init__(self, prefix: str, vocab_size: int, eos_id: int | None, tokenizer: str = ""):
        self.prefix, self.vocab_size, self.eos_id, self.tokenizer = prefix, vocab_size, eos_id, tokenizer
        self.dtype = _DTYPES[token_dtype(vocab_size)]
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(prefix + ".bin.tmp", "wb")
        self.offsets, self.tokens, self.max_token = [0], 0, -1

    def add(self, ids) -> None:
        """One document's token ids (EOS appended here when the tokenizer has one)."""
        a = np.asarray(list(ids) + ([self.eos_id] if self.eos_id is not None else []), dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
            raise CorpusError(f"{self.prefix}.bin: token id {int(a.max() if a.max() >= self.vocab_size else a.min())}"
                              f" is outside the tokenizer's vocabulary [0, {self.vocab_size})")
        if a.size:
            self.max_token = max(self.max_token, int(a.max()))
        self._bin.write(a.astype(self.dtype).tobytes())
        self.tokens += int(a.size)
        self.offsets.append(self.tokens)

    def abort(self) -> None:
        """Drop what was written (nothing of the corpus is left behind)."""
        self._bin.close()
        if os.path.exists(self.prefix + ".bin.tmp"):
            os.remove(self.prefix + ".bin.tmp")

    def close(self) -> dict:
        self._bin.close()
        if self.tokens == 0:
            os.remove(self.prefix + ".bin.tmp")
            raise CorpusError(f"{self.prefix}: no tokens were produced (empty input?); give text to tokenize")
        np.asarray(self.offsets, dtype="<i8").tofile(self.prefix + ".idx.tmp")
        os.replace(self.prefix + ".bin.tmp", self.prefix + ".bin")
        os.replace(self.prefix + ".idx.tmp", self.prefix + ".idx")
        meta = {"format": FORMAT, "dtype": self.dtype.name, "tokens": self.tokens, "documents": len(self.offsets) - 1,
                "vocab_size": self.vocab_size, "eos_id": self.eos_id, "max_token": self.max_token,
                "tokenizer": self.tokenizer, "bytes": os.path.getsize(self.prefix + ".bin"),
                "sha256": {"bin": _sha256(self.prefix + ".bin"), "idx": _sha256(self.prefix + ".idx")}}
        with open(self.prefix + ".json.tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(self.prefix + ".json.tmp", self.prefix + ".json")
        return meta


def _prefix(path: str) -> str:
    for ext in (".bin", ".json", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


class TokenCorpus(torch.utils.data.Dataset):
    """Training windows over a tokenized corpus (see the module docstring).

    ``path``: the prefix, or any of its three files; a bare ``.bin`` without ``.json`` (nanoGPT) is read
    with ``dtype`` (default uint16) and then scanned once for its largest id. ``vocab_size``: the
    model's; every stored id must be below it. ``verify``: check the sha256 of .bin and .idx (reads
    the whole corpus once)."""

    def __init__(self, path: str, seq_len: int, vocab_size: int | None = None, stride: int | None = None,
                 dtype: str | None = None, verify: bool = False):
        if seq_len < 1 or (stride is not None and stride < 1):
            raise ValueError(f"TokenCorpus: seq_len and stride must be ≥ 1, got seq_len={seq_len}, stride={stride}")
        self.prefix, self.seq_len, self.stride = _prefix(path), seq_len, stride or seq_len
        self.bin = self.prefix + ".bin"
        if not os.path.isfile(self.bin):
            raise CorpusError(f"{self.bin}: no such token file; {_FIX}, or give data.kwargs.path the prefix of "
                              f"an existing corpus")
        self.meta = self._read_meta(dtype)
        np_dtype = _DTYPES[self.meta["dtype"]]
        size = os.path.getsize(self.bin)
        if size == 0:
            raise CorpusError(f"{self.bin} is empty; {_FIX}")
        if size % np_dtype.itemsize:
            raise CorpusError(f"{self.bin}: {size} bytes is not a whole number of {self.meta['dtype']} tokens (a "
                              f"truncated file, or the wrong dtype: pass dtype='uint16' or 'uint32'); {_FIX}")
        n = size // np_dtype.itemsize
        if self.meta.get("tokens", n) != n:
            raise CorpusError(f"{self.bin}: holds {n} tokens but {self.prefix}.json says {self.meta['tokens']} "
                              f"(truncated or overwritten); {_FIX}")
        if verify and "sha256" in self.meta and _sha256(self.bin) != self.meta["sha256"]["bin"]:
            raise CorpusError(f"{self.bin}: sha256 differs from {self.prefix}.json (the file is corrupted); {_FIX}")
        self.tokens = np.memmap(self.bin, dtype=np_dtype, mode="r", shape=(n,))
        self.offsets = self._read_index(n, verify) if "documents" in self.meta else None
        bare = "format" not in self.meta
        if bare:
            self._check_bare_dtype()
        top = self.meta["max_token"] if "max_token" in self.meta else self._scan_max()
        if vocab_size is not None and top >= vocab_size:
            hint = (f" (a bare .bin read as {self.meta['dtype']}: if it holds uint16 ids, pass dtype='uint16')"
                    if bare and self.meta["dtype"] == "uint32" else "")
            raise CorpusError(f"{self.bin}: token id {top} does not fit the model's vocabulary of {vocab_size} "
                              f"(tokenizer {self.meta.get('tokenizer') or '?'}, vocab_size "
                              f"{self.meta.get('vocab_size', '?')}): set the model's vocab_size ≥ {top + 1} or "
                              f"prepare the corpus with the model's tokenizer{hint}")
        if n < seq_len + 1:
            raise CorpusError(f"{self.bin}: {n} tokens are fewer than one sample of {seq_len + 1} tokens; "
                              f"use more text or a shorter seq_len")     # (PackedCorpus asks for seq_len - 1 here)

    def _read_meta(self, dtype) -> dict:
        path = self.prefix + ".json"
        if not os.path.isfile(path):                    # a bare .bin (nanoGPT): the dtype comes from the caller
            dtype = dtype or "uint16"
            if dtype not in _DTYPES:
                raise CorpusError(f"{self.bin}: dtype {dtype!r} is not one of {list(_DTYPES)}")
            return {"dtype": dtype}
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise CorpusError(f"{path}: cannot read the corpus metadata ({e}); {_FIX}") from None
        if meta.get("format") != FORMAT or meta.get("dtype") not in _DTYPES:
            raise CorpusError(f"{path}: not a {FORMAT} metadata file (format={meta.get('format')!r}, "
                              f"dtype={meta.get('dtype')!r}); {_FIX}")
        if dtype is not None and dtype != meta["dtype"]:
            raise CorpusError(f"{path}: the corpus is stored as {meta['dtype']}, not {dtype!r}: drop the dtype "
                              f"argument (the metadata says how it is stored)")
        return meta

    def _read_index(self, n: int, verify: bool) -> np.ndarray:
        path = self.prefix + ".idx"
        if not os.path.isfile(path):
            raise CorpusError(f"{path}: the document index is missing (the .json lists "
                              f"{self.meta['documents']} documents); {_FIX}")
        if verify and _sha256(path) != self.meta["sha256"]["idx"]:
            raise CorpusError(f"{path}: sha256 differs from {self.prefix}.json (the file is corrupted); {_FIX}")
        idx = np.fromfile(path, dtype="<i8")
        ok = (idx.size == self.meta["documents"] + 1 and idx.size and idx[0] == 0 and idx[-1] == n
              and bool(np.all(np.diff(idx) >= 0)))
        if not ok:
            raise CorpusError(f"{path}: the document index does not describe {self.bin} ({idx.size} offsets for "
                              f"{self.meta['documents']} documents and {n} tokens); {_FIX}")
        return idx

    def _check_bare_dtype(self, probe: int = 1 << 20) -> None:
        """A bare .bin of uint32 ids below 65536 read as uint16 yields valid-looking ids with a 0 after each
        one: refuse it (every odd uint16 of the first ``probe`` zero while the even ones are not)."""
        if self.meta["dtype"] != "uint16":
            return
        head = np.asarray(self.tokens[:min(len(self.tokens), probe) // 2 * 2])
        if head.size >= 8 and not head[1::2].any() and head[0::2].any():
            raise CorpusError(f"{self.bin}: read as uint16, every second id is 0 — it looks like uint32 token ids; "
                              f"pass dtype='uint32' (data.kwargs.dtype), or re-create it with "
                              f"`python -m launch.prepare_data`, which records the dtype")

    def _scan_max(self, chunk: int = 1 << 24) -> int:
        return max(int(self.tokens[i:i + chunk].max()) for i in range(0, len(self.tokens), chunk))

    @property
    def documents(self) -> int | None:
        return None if self.offsets is None else len(self.offsets) - 1

    def __len__(self) -> int:
        return (len(self.tokens) - 1 - self.seq_len) // self.stride + 1

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"TokenCorpus index {i} out of range for {len(self)} samples")
        start = (i % len(self)) * self.stride
        w = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return w[:-1], w[1:]
