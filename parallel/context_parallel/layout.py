"""Which tokens of a sequence each cp rank holds: the zig-zag split, positions and document ids.

The sequence of length s is cut into 2·cp equal chunks C_0 … C_{2cp−1} of c = s/(2·cp) tokens; cp rank
r holds C_r and C_{2cp−1−r}, in that order (the zig-zag / "load-balanced" split of Megatron-LM's context
parallelism and of Brandon et al., "Striped attention", arXiv 2311.09431, §3). Under a causal mask the
attention work of chunk j is ∝ j + 1/2, so every rank's pair does (r + ½) + (2cp − 1 − r + ½) = 2cp
units: the ranks are balanced, where a contiguous split would leave the last rank cp times the first's.

Document ids (packed sequences): positions that restart at 0 open a new document,
doc(t) = #{u ≤ t : pos(u) = 0}; query t attends key u iff u ≤ t (global index) and doc(u) = doc(t).
"""
from __future__ import annotations

import torch

__all__ = ["zigzag_index", "check_seq", "shard", "document_ids"]


def check_seq(s: int, cp: int) -> int:
    """The chunk length s/(2·cp); a clear error when it does not divide."""
    if s % (2 * cp):
        raise ValueError(f"context parallel: sequence length {s} is not divisible by 2·cp = {2 * cp} (the zig-zag "
                         f"split into 2·cp chunks): use a sequence length that is a multiple of {2 * cp}, "
                         f"or change parallel.cp")
    return s // (2 * cp)


def zigzag_index(s: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global token indices (length s/cp) held by cp ``rank``: chunk ``rank`` then chunk 2·cp−1−rank."""
    c = check_seq(s, cp)
    a = torch.arange(rank * c, (rank + 1) * c, device=device)
    b = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([a, b])


def shard(t: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's zig-zag shard of ``t`` along ``dim`` (the sequence dim)."""
    idx = zigzag_index(t.shape[dim], cp, rank, t.device)
    return t.index_select(dim, idx)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(b, s) document ids from (b, s) or (s,) position ids that restart at 0 for each document."""
    p = position_ids if position_ids.dim() == 2 else position_ids[None]
    return torch.cumsum((p == 0).to(torch.int64), dim=-1)
