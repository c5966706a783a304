"""ZeroPartition: whole-tensor reductions and gathers for optimizers over ZeRO's pieces.

The protocol is :mod:`parallel.optim.tensorwise`. ZeroOptimizer gives the optimizer one 1-D piece
per parameter (part) this rank owns: piece j is elements [a, e) of bucket b's flat layout, i.e.
elements [a − o, e − o) of parameter i's (tp-local) flattened tensor (o: its offset in the bucket).
A rank owns at most one piece of a parameter (its shard is contiguous).

``sum_sq``: Σ x² per piece into a float64 vector indexed by (slot, parameter) — the same layout on
every rank — then one all-reduce over dp (stages 1–3: the pieces are on different ranks) and one
over tp, where a tp-split parameter's shards add up (a replicated kv head's copies, ``tp_duplicate``,
add 0) and a replicated parameter counts from tp rank 0 only. Payload 8·slots·P bytes per axis.

``gather``: for each bucket holding a selected parameter (chosen by its full shape, so every dp rank
picks the same buckets), this rank's pieces go into a zeroed padded flat buffer that is all-gathered
over dp ((N−1)/N · 4·padded bytes; stage 0 holds whole parameters and sends nothing); then each
selected tp-split parameter this rank holds is all-gathered over tp ((T−1)/T · 4·T·local bytes) and
put back in unsplit order: fused sections reassembled, replicated copies dropped, tp padding cut
(:func:`parallel.tensor_parallel.layers.shard_tensor` is the inverse ``local`` applies).
"""
from __future__ import annotations

import torch

from parallel import comm
from parallel.parameters import param_info
from parallel.tensor_parallel.layers import shard_tensor

__all__ = ["ZeroPartition"]


class ZeroPartition:
    def __init__(self, piece_list, buckets, dp_group, partitioned: bool, tp_group=None):
        self.dp, self.partitioned = dp_group, partitioned
        self.tp = tp_group if tp_group is not None and tp_group.size > 1 else None
        self.buckets = list(buckets)
        index, self.infos, self._first = {}, [], {}
        for b in self.buckets:
            self._first[b] = len(self.infos)
            for i, p in enumerate(b.params):
                index[(b, i)] = len(self.infos)
                self.infos.append(param_info(p))
        self.P = len(self.infos)
        # (bucket, param index in bucket, key, first element in the param, end, local shape)
        self.pieces = [(b, i, index[(b, i)], a - b.offsets[i], e - b.offsets[i], b.shapes[i])
                       for b, i, a, e, _ in piece_list]
        self.full_shapes = [self._full_shape(b.shapes[i], self.infos[index[(b, i)]])
                            for b in self.buckets for i in range(len(b.params))]
        keep = torch.zeros(self.P, dtype=torch.float64)
        for k, info in enumerate(self.infos):
            split = info.tp_split and self.tp is not None
            keep[k] = 0.0 if (split and info.tp_duplicate) or (not split and self.tp is not None and self.tp.rank) \
                else 1.0
        self._tp_keep = keep.to(self.buckets[0].master.device)

    def _full_shape(self, local: tuple, info) -> tuple:
        if not info.tp_split or self.tp is None:
            return tuple(local)
        shape = list(local)
        d = info.tp_dim % len(shape)
        shape[d] = shape[d] * (self.tp.size // info.tp_replicas) - info.tp_pad
        return tuple(shape)

    def shape(self, j: int) -> tuple:
        return self.full_shapes[self.pieces[j][2]]

    # --- norms ------------------------------------------------------------------------------------
    def sum_sq(self, *lists) -> list:
        """``lists``: lists of one tensor per piece (e.g. params, updates); returns, for each, the
        list of Σ x² over each tensor's whole parameter (float64 scalars)."""
        J = len(self.pieces)
        for lst in lists:
            if len(lst) != J:
                raise ValueError(f"sum_sq: got {len(lst)} tensors for the {J} pieces this rank holds")
        vec = torch.zeros(len(lists), self.P, dtype=torch.float64, device=self._tp_keep.device)
        for s, lst in enumerate(lists):
            for pc, x in zip(self.pieces, lst):
                vec[s, pc[2]] += torch.linalg.vector_norm(x).double() ** 2
        if self.partitioned:
            comm.all_reduce(vec, self.dp)
        if self.tp is not None:
            vec.mul_(self._tp_keep)
            comm.all_reduce(vec, self.tp)
        return [[vec[s, pc[2]] for pc in self.pieces] for s in range(len(lists))]

    # --- whole tensors ----------------------------------------------------------------------------
    def gather(self, tensors, select) -> dict:
        """{j: full tensor of piece j's parameter} for the pieces whose parameter's full shape passes
        ``select``; ``tensors[j]`` is read for those pieces only."""
        chosen = {k for k, s in enumerate(self.full_shapes) if select(s)}
        flats = {}
        for b in self.buckets:
            if not any(k in chosen for k in range(self._first[b], self._first[b] + len(b.params))):
                continue
            flat = torch.zeros(b.padded, dtype=torch.float32, device=b.master.device)
            for j, (pb, i, k, a, e, _) in enumerate(self.pieces):
                if pb is b and k in chosen:
                    flat[b.offsets[i] + a:b.offsets[i] + e].copy_(tensors[j].reshape(-1))
            if self.partitioned:
                comm.all_gather_into(flat, flat[b.lo:b.hi], self.dp)
            flats[b] = flat
        out = {}
        for j, (b, i, k, _, _, shape) in enumerate(self.pieces):
            if k in chosen:
                local = flats[b][b.offsets[i]:b.offsets[i] + b.sizes[i]].view(shape)
                out[j] = self._unsplit(local, self.infos[k])
        return out

    def _unsplit(self, local: torch.Tensor, info) -> torch.Tensor:
        if not info.tp_split or self.tp is None:
            return local
        d = info.tp_dim % local.dim()
        T, R = self.tp.size, info.tp_replicas
        if info.sections is not None and info.tp_pad:
            raise NotImplementedError("gathering a tp-split parameter with both fused sections and tp padding "
                                      "is not supported: use a plan without padding for fused projections")
        chunks = comm.all_gather(local.contiguous(), self.tp, dim=d).chunk(T, d)[::R]
        if info.sections is None:
            full = torch.cat(chunks, d)
        else:
            per = [s // (T // R) for s in info.sections]
            parts = [c.split(per, d) for c in chunks]
            full = torch.cat([parts[r][s] for s in range(len(per)) for r in range(len(parts))], d)
        return full.narrow(d, 0, full.shape[d] - info.tp_pad).contiguous()

    def local(self, j: int, full: torch.Tensor) -> torch.Tensor:
        """Piece j of the full tensor of its parameter (the inverse of ``gather``: no traffic)."""
        b, i, k, a, e, shape = self.pieces[j]
        info = self.infos[k]
        if info.tp_split and self.tp is not None:
            R = info.tp_replicas
            full = shard_tensor(full, info.tp_dim % full.dim(), self.tp.size // R, self.tp.rank // R,
                                info.sections, info.tp_pad)
        return full.reshape(-1)[a:e]
