"""8-bit Adam moments in the offload store: the sub-group layout and its streamed step.

With ``optimizer.state_dtype: int8`` (:class:`parallel.optim.adam8bit.Adam8bit`; Dettmers et al.,
"8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861) the offloaded optimizer
(:mod:`parallel.zero.optimizer_offload`) keeps each moment as one uint8 code per element plus one fp32
scale per block of B (= ``block_size``, 256) elements, the same block-wise dynamic-type code as without
offload. A sub-group of n elements whose blocks number n_blk is stored as one flat uint8 tensor (one
key, one IO buffer):

    [ master fp32 (4n) | m scales fp32 (4·n_blk) | v scales fp32 (4·n_blk) | m codes (n) | v codes (n) ]

so 6n + 8·n_blk bytes instead of fp32's 12n: the moments take 2n + 8·n_blk = 2(n + 4·n_blk) bytes,
1/3.94 of fp32's 8n at B = 256, and the store reads and writes that much less per step.

Blocks start at each parameter piece's first element (ZeRO's pieces: one per parameter part in the
rank's shard, :meth:`parallel.data_parallel.bucket.FlatBucket.pieces`), exactly as Adam8bit blocks the
pieces it is given without offload, and a sub-group cuts a piece only at a multiple of B from the
piece's start. Hence the blocks, the codes and the update are those of ZeRO with Adam8bit and no
offload, bit for bit, and n_blk summed over the sub-groups is Σ_pieces ⌈n_piece / B⌉. Per sub-group
and step t (Adam8bit.step on the same elements, on temporary fp32 copies):

    m, v ← deq(m_q), deq(v_q);   g ← g [+ λ·p (Adam)];   m ← β1·m + (1−β1)·g;   v ← β2·v + (1−β2)·g²
    p ← p [− η·λ·p (AdamW)] − η·(m/(1−β1^t)) / (√(v/(1−β2^t)) + ε);   m_q, v_q ← quant(m), quant(v)

Checkpoints see fp32 moments (:meth:`unpack`); :meth:`pack` re-quantizes them, which gives back the same
codes and scales (the quantizer is idempotent on its own output), so save/resume is exact.
"""
from __future__ import annotations

import torch

from parallel.offload import StoreConfigError
from parallel.optim.adam8bit import dequantize, quantize

__all__ = ["sub_bytes", "plan_subgroups", "Int8Layout"]


def sub_bytes(n: int, n_blk: int) -> int:
    """Stored bytes of a sub-group of ``n`` elements in ``n_blk`` blocks."""
    return 6 * n + 8 * n_blk


def plan_subgroups(pieces: list, n: int, cap: int, B: int) -> list:
    """Cut the owned range [0, n) into sub-groups of at most ``cap`` stored bytes. ``pieces``: the
    (a, e) shard ranges of the parameter pieces, in order, tiling [0, n). Returns [(s, e, segs)] with
    ``segs`` = [(offset from s, length)], one per piece part; a piece is cut only at multiples of B."""
    unit = 6 * B + 8                                   # one whole block
    if cap < unit:
        raise StoreConfigError(f"zero.offload.buffer_mb gives {cap}-byte buffers, less than one 8-bit block of "
                               f"{B} elements ({unit} bytes with its master and scales); raise buffer_mb")
    tiled = [a for a, _ in pieces[1:]] == [e for _, e in pieces[:-1]]
    if not tiled or (pieces and (pieces[0][0], pieces[-1][1]) != (0, n)):
        raise AssertionError(f"the pieces {pieces[:4]}… do not tile the owned range [0, {n})")
    out, s, segs, used = [], 0, [], 0
    for a, e in pieces:
        pos = a
        while pos < e:
            L = e - pos
            if sub_bytes(L, -(-L // B)) > cap - used:
                L = (cap - used) // unit * B
                if L == 0:                                 # full: close the sub-group here
                    out.append((s, pos, segs))
                    s, segs, used = pos, [], 0
                    continue
            segs.append((pos - s, L))
            used += sub_bytes(L, -(-L // B))
            pos += L
    if segs:
        out.append((s, n, segs))
    return out


class Int8Layout:
    """One sub-group's packing: ``segs`` [(offset, length)] of n elements, block size B."""

    def __init__(self, segs: list, B: int):
        self.segs, self.B = segs, B
        self.n = sum(L for _, L in segs)
        self.blocks, k = [], 0                             # (offset, length, first block, blocks)
        for off, L in segs:
            nb = -(-L // B)
            self.blocks.append((off, L, k, nb))
            k += nb
        self.n_blk = k
        self.nbytes = sub_bytes(self.n, k)
        self.moment_bytes = 2 * self.n + 8 * k

    def views(self, x: torch.Tensor):
        """(master, m scales, v scales, m codes, v codes) inside the uint8 tensor ``x``."""
        n, k = self.n, self.n_blk
        o = [0, 4 * n, 4 * n + 4 * k, 4 * n + 8 * k, 5 * n + 8 * k, 6 * n + 8 * k]
        return (x[o[0]:o[1]].view(torch.float32), x[o[1]:o[2]].view(torch.float32),
                x[o[2]:o[3]].view(torch.float32), x[o[3]:o[4]], x[o[4]:o[5]])

    def pack(self, master: torch.Tensor, m: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        """A new stored tensor from fp32 master and moments (None: zero moments)."""
        x = torch.empty(self.nbytes, dtype=torch.uint8)
        views = self.views(x)
        views[0].copy_(master)
        zero = torch.zeros(self.n)
        self._quantize(views, zero if m is None else m.float(), zero if v is None else v.float())
        return x

    def unpack(self, x: torch.Tensor):
        """(master, m, v) as fp32 copies."""
        views = self.views(x)
        return (views[0].clone(),) + self._dequantize(views)

    def _dequantize(self, views):
        _, ms, vs, mc, vc = views
        m, v = torch.empty(self.n), torch.empty(self.n)
        for off, L, k, nb in self.blocks:
            m[off:off + L] = dequantize(mc[off:off + L], ms[k:k + nb], True, self.B)
            v[off:off + L] = dequantize(vc[off:off + L], vs[k:k + nb], False, self.B)
        return m, v

    def _quantize(self, views, m: torch.Tensor, v: torch.Tensor) -> None:
        _, ms, vs, mc, vc = views
        for off, L, k, nb in self.blocks:
            for src, codes, scales, signed in ((m, mc, ms, True), (v, vc, vs, False)):
                c, sc = quantize(src[off:off + L], signed, self.B)
                codes[off:off + L].copy_(c)
                scales[k:k + nb].copy_(sc)

    def step(self, x: torch.Tensor, grad: torch.Tensor, t: int, *, lr: float, betas, eps: float,
             weight_decay: float, decoupled: bool, steps: list | None = None) -> torch.Tensor:
        """Adam8bit's update of step ``t`` (1-based) in place on the stored tensor ``x``; returns the master.
        ``steps``: per segment its own step (1-based), or None to leave it as it is (a parameter no rank had a
        gradient for, :mod:`parallel.zero.unused`: Adam8bit skips a ``grad=None`` piece); its codes are
        re-quantized from their own dequantized values, which gives them back unchanged."""
        views = self.views(x)
        p = views[0]
        m, v = self._dequantize(views)
        b1, b2 = betas
        grad = grad.reshape(-1).float()
        runs = [(0, self.n, t)] if steps is None else \
            [(off, off + L, k) for (off, L), k in zip(self.segs, steps) if k is not None]
        for a, z, k in runs:
            g, pa, ma, va = grad[a:z], p[a:z], m[a:z], v[a:z]
            if weight_decay and not decoupled:
                g = g.add(pa, alpha=weight_decay)
            ma.mul_(b1).add_(g, alpha=1 - b1)
            va.mul_(b2).addcmul_(g, g, value=1 - b2)
            if weight_decay and decoupled:
                pa.mul_(1 - lr * weight_decay)
            denom = (va / (1 - b2 ** k)).sqrt_().add_(eps)
            pa.add_(ma / denom, alpha=-lr / (1 - b1 ** k))
        self._quantize(views, m, v)
        return p
