"""Packed samples with document boundaries: fixed-length windows of a tokenized corpus whose
attention stays inside each document.

:class:`PackedCorpus` cuts the token stream (documents each ending with EOS, :mod:`.token_file`)
into windows of ``seq_len`` tokens, sample i = tokens [i·seq_len, (i+1)·seq_len) — no token is
padding and none is dropped but the tail. A window holds pieces of several documents; a document cut
by the window start begins again at position 0. Each sample is a dict batch (:mod:`parallel.batch`):

``input_ids``     int64 [s]
``labels``        int64 [s], transformers' convention (the loss shifts): the ids, with −100 at the
                  first token of every document — the token before it ends another document, whose
                  context must not predict it
``position_ids``  int64 [s], restarting at 0 at each document start **— the boundary metadata.**
                  A new document starts at t exactly where position_ids[t] == 0 (also at t = 0), so
                  boundaries travel with the batch through every layout (dp/tp/pp split micro-batches
                  along dim 0 only). Consumers: transformers ≥ 5 builds the block-diagonal causal mask
                  from packed position ids when no attention_mask is given
                  (``masking_utils.find_packed_sequence_indices``); :func:`document_mask` gives the same
                  mask for SDPA / eager attention of one's own model; :func:`cu_seqlens` gives the
                  flash-attention varlen form. Context parallelism (issue 23) splitting the sequence
                  must read the boundaries from the full position_ids before it splits.
``attention_mask``  only with ``mask="4d"``: bool [1, s, s], True where query t may attend key u
                  (u ≤ t, same document) — collated to [b, 1, s, s], which transformers uses as given.

``mask="none"`` drops position_ids (plain packing: attention crosses documents, positions run on).
The packing is a pure function of the corpus and i, so the parity contract holds unchanged.
"""
from __future__ import annotations

import numpy as np
import torch

from parallel.corpus.token_file import CorpusError, TokenCorpus

__all__ = ["PackedCorpus", "document_positions", "document_mask", "cu_seqlens"]

IGNORE = -100


def document_positions(start: int, length: int, offsets: np.ndarray) -> torch.Tensor:
    """Position ids of tokens [start, start+length) restarting at every document start in ``offsets``."""
    inner = offsets[(offsets > start) & (offsets < start + length)] - start
    starts = np.unique(np.concatenate([[0], inner])).astype(np.int64)
    t = np.arange(length)
    seg = np.searchsorted(starts, t, side="right") - 1
    return torch.from_numpy(t - starts[seg])


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[..., s] position ids → bool [..., 1, s, s]: query t attends key u iff u ≤ t and no document
    starts in (u, t]. Pass as ``attn_mask`` to ``F.scaled_dot_product_attention`` (True = attend)."""
    doc = (position_ids == 0).long().cumsum(-1)
    s = position_ids.shape[-1]
    t = torch.arange(s, device=position_ids.device)
    causal = t.unsqueeze(-1) >= t                      # (torch's tril of a bool matrix is ~100× slower on CPU)
    return ((doc.unsqueeze(-1) == doc.unsqueeze(-2)) & causal).unsqueeze(-3)


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Flash-attention varlen metadata of a [b, s] packed batch flattened to b·s tokens: the int32
    cumulative document lengths (starts, then b·s) and the longest document."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    if flat.numel() and (starts.numel() == 0 or starts[0] != 0):
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=starts.device), starts])
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=starts.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


class PackedCorpus(torch.utils.data.Dataset):
    """Packed windows of a tokenized corpus with document boundaries (module docstring).

    ``path`` / ``vocab_size`` / ``dtype`` / ``verify`` as :class:`.token_file.TokenCorpus` (same checks,
    same errors); the boundaries come from ``<prefix>.idx`` or, for a bare nanoGPT ``.bin``, from the
    positions after each ``eos_id``. ``mask``: "position_ids" (default), "4d" or "none"."""

    def __init__(self, path: str, seq_len: int, vocab_size: int | None = None, mask: str = "position_ids",
                 eos_id: int | None = None, dtype: str | None = None, verify: bool = False):
        if mask not in ("position_ids", "4d", "none"):
            raise ValueError(f"PackedCorpus: mask={mask!r} is not one of 'position_ids', '4d', 'none'")
        self.corpus = TokenCorpus(path, seq_len - 1, vocab_size, stride=seq_len, dtype=dtype, verify=verify)
        self.seq_len, self.mask = seq_len, mask
        offsets = self.corpus.offsets
        if offsets is None and mask != "none":
            eos = eos_id if eos_id is not None else self.corpus.meta.get("eos_id")
            if eos is None:
                raise CorpusError(f"{self.corpus.bin}: packing with document boundaries needs the document index "
                                  f"{self.corpus.prefix}.idx or the EOS id: pass eos_id=..., mask='none', or "
                                  f"re-create the corpus with `python -m launch.prepare_data`")
            ends = np.nonzero(np.asarray(self.corpus.tokens) == eos)[0] + 1
            offsets = np.concatenate([[0], ends, [len(self.corpus.tokens)]])
        self.offsets = offsets
        self.n = len(self.corpus.tokens) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= i < self.n:
            raise IndexError(f"PackedCorpus index {i} out of range for {self.n} samples")
        a = (i % self.n) * self.seq_len
        ids = torch.from_numpy(self.corpus.tokens[a:a + self.seq_len].astype(np.int64))
        if self.mask == "none":
            return {"input_ids": ids, "labels": ids.clone()}
        pos = document_positions(a, self.seq_len, self.offsets)
        labels = torch.where(pos == 0, IGNORE, ids)
        out = {"input_ids": ids, "labels": labels, "position_ids": pos}
        if self.mask == "4d":
            out["attention_mask"] = document_mask(pos)
        return out
