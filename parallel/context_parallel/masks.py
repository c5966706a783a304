"""Which keys a query may see under context parallelism, by global token index (beyond causality).

Every cp rank holds the whole micro-batch before it is sharded, so what decides visibility is known
everywhere for every pair of global indices (q, k) and nothing about it is communicated:

* documents (packed sequences, :mod:`.layout`): doc(q) = doc(k);
* a sliding window of W tokens (Mistral, Qwen2, …; transformers' ``sliding_window_overlay``): q − k < W,
  with the causal k ≤ q (Beltagy et al., Longformer, arXiv 2004.05150, §3.1);
* a dense mask the batch carries, (b, 1, s, s) or (b, s, s): ``allow[b, q, k]`` (a prefix-LM's, a custom
  packing's); with it the attention is *not* additionally causal — as a one-process model that is given a
  4-D mask uses the mask alone (transformers passes it to SDPA with is_causal=False).

The ring (:mod:`.ring`) asks for the block of rows gq against columns gk; Ulysses (:mod:`.ulysses`) for the
whole (s, s) at once (its attention runs on whole sequences).
"""
from __future__ import annotations

import torch

__all__ = ["Visibility", "dense_allow"]


def dense_allow(mask: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """(b, s, s) bool from a 4-D (b, 1, s, s) / 3-D (b, s, s) mask: bool as given; float additive masks whose
    entries are 0 (visible) or ≤ half the dtype's minimum (hidden, what transformers builds). A float mask
    with other values is a bias, not a mask: refused."""
    m = mask
    if m.dim() == 4:
        if m.shape[1] != 1:
            raise ValueError(f"context parallel: a per-head attention mask {tuple(mask.shape)} is not supported; give "
                             f"(b, 1, s, s) (one mask for every head)")
        m = m[:, 0]
    if m.dim() != 3 or tuple(m.shape[1:]) != (s, s) or m.shape[0] not in (1, b):
        raise ValueError(f"context parallel: attention_mask of shape {tuple(mask.shape)} is neither a (b, s) padding "
                         f"mask nor a (b, 1, s, s) mask over the whole sequence (b = {b}, s = {s})")
    if m.dtype == torch.bool:
        return m.expand(b, s, s)
    if not m.is_floating_point():
        return (m != 0).expand(b, s, s)
    hidden = m <= torch.finfo(m.dtype).min / 2
    if not ((m == 0) | hidden).all():
        raise ValueError("context parallel: the float attention mask has values other than 0 and the dtype's "
                         "minimum, i.e. an additive bias (ALiBi-like), which the cp attention does not add; give a "
                         "boolean mask, or set parallel.cp=1")
    return (m == 0).expand(b, s, s)


class Visibility:
    """``docs`` (b, s) document ids, ``window`` W, ``allow`` (b, s, s) bool: any of them may be None."""

    def __init__(self, docs: torch.Tensor | None = None, window: int | None = None,
                 allow: torch.Tensor | None = None):
        if window is not None and not (isinstance(window, int) and window > 0):
            raise ValueError(f"context parallel: sliding window {window!r} must be a positive number of tokens")
        self.docs, self.window, self.allow = docs, window, allow

    @staticmethod
    def of(docs, window: int | None = None) -> Visibility | None:
        """A Visibility from what the context holds (None, document ids or a Visibility) and a window."""
        v = docs if isinstance(docs, Visibility) else Visibility(docs)
        if window is not None:
            v = Visibility(v.docs, window, v.allow)
        return v if (v.docs is not None or v.window is not None or v.allow is not None) else None

    def block(self, gq: torch.Tensor, gk: torch.Tensor) -> torch.Tensor | None:
        """(b or 1, len(gq), len(gk)) bool: the pairs visible beyond causality; None when all are."""
        m = None
        if self.docs is not None:
            m = self.docs[:, gq][:, :, None] == self.docs[:, gk][:, None, :]
        if self.window is not None:
            w = ((gq[:, None] - gk[None, :]) < self.window)[None]
            m = w if m is None else m & w
        if self.allow is not None:
            a = self.allow[:, gq][:, :, gk]
            m = a if m is None else m & a
        return m

    def expand(self, b: int) -> Visibility:
        """The same for a batch of ``b`` rows (a (1, …) document or mask row broadcast)."""
        grow = lambda t: t if t is None or t.shape[0] == b else t.expand(b, *t.shape[1:])    # noqa: E731
        return Visibility(grow(self.docs), self.window, grow(self.allow))
