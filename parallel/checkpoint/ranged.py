"""Reading a checkpoint in proportion to what a rank holds: only the byte ranges of its own elements.

A parallel3d checkpoint stores each logical tensor (``model/<name>``, ``optim/<name>/<state>``) flattened, as
the 1-D runs its owners wrote (DCP items: one ``torch.save`` zip per run inside the ``__R_k.distcp`` files,
located by DCP's ``.metadata``). A loading rank needs the set U of positions its pieces cover (a ZeRO
partition, a tp shard, a stage's parameters). DCP's own reader loads every stored item that overlaps U
*whole*, and the former loader read whole logical tensors, so IO per rank grew with the checkpoint, not
the shard. Here:

1. plan — U's runs [s, s + n) are intersected with the stored items' [c, c + m) (both sorted): each
   overlap is a range of one item, and the ranges of every item are exact, so the data bytes read are
   |U| · element size — the rank's shard — whatever layout wrote the checkpoint;
2. locate — an item is a zip (``torch.save``): its end record and central directory (at the item's end,
   ≈ 0.5 KB) give the storage record ``archive/data/0`` and its local header, hence the storage's first
   byte; an item this reader cannot parse that way (compressed, several storages, another layout) is read
   whole with ``torch.load`` and counted as ``fallback``;
3. read — each range with one ``seek`` + ``read`` into the positions of U it fills.

:class:`ReadStats` counts every byte read (data, headers, fallback, metadata), and what whole logical
tensors would have cost. :func:`plan_bytes` gives the data bytes of a load without any checkpoint — the
simulated ranks of :mod:`launch.simulate` use it.
"""
from __future__ import annotations

import bisect
import io
import os
import struct
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

from parallel.checkpoint.integrity import CheckpointError

__all__ = ["ReadStats", "needed", "plan_bytes", "read_pieces"]

_LOCAL = b"PK\x03\x04"


@dataclass
class ReadStats:
    data: int = 0             # bytes of the elements the pieces need (exact ranges)
    headers: int = 0          # zip directories and headers read to find the items' storages
    fallback: int = 0         # whole items read with torch.load (an item not parsed)
    metadata: int = 0         # DCP's .metadata
    items: int = 0            # stored items touched
    whole_tensors: int = 0    # what reading every touched logical tensor whole would have read

    @property
    def total(self) -> int:
        return self.data + self.headers + self.fallback + self.metadata


class _Counted:
    def __init__(self, f, stats: ReadStats, field: str):
        self.f, self.stats, self.field = f, stats, field

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        setattr(self.stats, self.field, getattr(self.stats, self.field) + len(b))
        return b


def needed(pieces) -> dict:
    """{key: sorted unique positions (int64)} that ``pieces`` cover (padding, −1, excluded)."""
    by_key: dict = {}
    for p in pieces:
        by_key.setdefault(p.key, []).append(p.index.reshape(-1))
    out = {}
    for k, idx in by_key.items():
        u = torch.unique(torch.cat(idx))
        out[k] = u[u >= 0]
    return out


def _runs(u: torch.Tensor) -> list:
    """[(start, length, position in u)] of the consecutive runs of sorted unique ``u``."""
    if u.numel() == 0:
        return []
    br = (torch.nonzero(u[1:] != u[:-1] + 1).flatten() + 1).tolist()
    starts, ends = [0] + br, br + [u.numel()]
    return [(int(u[a]), b - a, a) for a, b in zip(starts, ends)]


def plan_bytes(pieces) -> dict:
    """{"data": bytes a load of ``pieces`` reads (|U| · element size per key), "runs": U's runs,
    "whole_tensors": what whole logical tensors would cost} — without a checkpoint."""
    dtypes = {p.key: (p.local.dtype, p.full_shape) for p in pieces}
    out = {"data": 0, "runs": 0, "whole_tensors": 0}
    for k, u in needed(pieces).items():
        es = torch.empty((), dtype=dtypes[k][0]).element_size()
        out["data"] += u.numel() * es
        out["runs"] += len(_runs(u))
        out["whole_tensors"] += torch.Size(dtypes[k][1]).numel() * es
    return out


def _chunks(md, key: str) -> list:
    """The stored items of ``key``, sorted: [(start, length, _StorageInfo)]."""
    out = []
    for ch in md.state_dict_metadata[key].chunks:
        info = md.storage_data[MetadataIndex(key, torch.Size(ch.offsets))]
        out.append((int(ch.offsets[0]), int(ch.sizes[0]), info))
    return sorted(out, key=lambda c: c[0])


def _plan(runs: list, chunks: list, key: str, path: str) -> list:
    """[(item index in chunks, lo, hi, dst)]: element range [lo, hi) of an item → U positions [dst, …)."""
    starts = [c[0] for c in chunks]
    out = []
    for s, n, pos in runs:
        a, e = s, s + n
        j = max(bisect.bisect_right(starts, a) - 1, 0)
        while a < e:
            if j >= len(chunks) or chunks[j][0] > a or a >= chunks[j][0] + chunks[j][1]:
                raise CheckpointError(f"checkpoint {path} is damaged: no stored item of {key!r} holds element {a} "
                                      f"(its .metadata does not cover the tensor)", damaged=True)
            c0, m, _ = chunks[j]
            hi = min(e, c0 + m)
            out.append((j, a - c0, hi - c0, pos + a - s))
            a, j = hi, j + 1
    return out


def _u(fmt: str, b: bytes, at: int):
    return struct.unpack_from(fmt, b, at)[0]


def _zip64_sizes(extra: bytes, want: list) -> list:
    """Values of the zip64 extra field (tag 1) for the fields whose 32-bit value was 0xFFFFFFFF, in order."""
    i = 0
    while i + 4 <= len(extra):
        tag, sz = struct.unpack_from("<HH", extra, i)
        if tag == 1:
            vals, j = [], i + 4
            for w in want:
                if w:
                    vals.append(_u("<Q", extra, j))
                    j += 8
                else:
                    vals.append(None)
            return vals
        i += 4 + sz
    return [None] * len(want)


def _storage_offset(f, off: int, length: int, nbytes: int, stats: ReadStats) -> int | None:
    """File offset of the storage bytes of the ``torch.save`` zip at [off, off + length), or None.
    PyTorch's writer streams (sizes in data descriptors), so the central directory at the zip's end is read:
    its end record (22 bytes; zip64: its locator and record too), the directory (an entry per record), then
    the storage's local header."""
    if length < 22:
        return None
    cf = _Counted(f, stats, "headers")
    f.seek(off + length - 22)
    eocd = cf.read(22)
    if eocd[:4] != b"PK\x05\x06":
        return None
    cd_size, cd_off = _u("<I", eocd, 12), _u("<I", eocd, 16)
    if cd_size == 0xFFFFFFFF or cd_off == 0xFFFFFFFF:
        f.seek(off + length - 22 - 20)
        loc = cf.read(20)
        if loc[:4] != b"PK\x06\x07":
            return None
        f.seek(off + _u("<Q", loc, 8))
        rec = cf.read(56)
        if rec[:4] != b"PK\x06\x06":
            return None
        cd_size, cd_off = _u("<Q", rec, 40), _u("<Q", rec, 48)
    if cd_off + cd_size > length:
        return None
    f.seek(off + cd_off)
    cd = cf.read(cd_size)
    i = 0
    while i + 46 <= len(cd) and cd[i:i + 4] == b"PK\x01\x02":
        method, csize, usize = _u("<H", cd, i + 10), _u("<I", cd, i + 20), _u("<I", cd, i + 24)
        n, m, k, lho = _u("<H", cd, i + 28), _u("<H", cd, i + 30), _u("<H", cd, i + 32), _u("<I", cd, i + 42)
        name = cd[i + 46:i + 46 + n]
        if name.endswith(b"/data/0"):
            want = [usize == 0xFFFFFFFF, csize == 0xFFFFFFFF, lho == 0xFFFFFFFF]
            z = _zip64_sizes(cd[i + 46 + n:i + 46 + n + m], want) if any(want) else [None] * 3
            csize = z[1] if z[1] is not None else csize
            lho = z[2] if z[2] is not None else lho
            if method != 0 or csize != nbytes:
                return None
            f.seek(off + lho)
            h = cf.read(30)
            if h[:4] != _LOCAL:
                return None
            return off + lho + 30 + _u("<H", h, 26) + _u("<H", h, 28)
        if b"/data/" in name:
            return None
        i += 46 + n + m + k
    return None


def _read_item(f, info, c_len: int, ranges: list, dtype, out: torch.Tensor, stats: ReadStats) -> None:
    es = torch.empty((), dtype=dtype).element_size()
    stats.items += 1
    start = _storage_offset(f, int(info.offset), int(info.length), c_len * es, stats)
    if start is None:                                 # read the item whole
        f.seek(int(info.offset))
        raw = _Counted(f, stats, "fallback").read(int(info.length))
        t = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True).reshape(-1)
        for lo, hi, dst in ranges:
            out[dst:dst + hi - lo] = t[lo:hi].to(dtype)
        return
    cf = _Counted(f, stats, "data")
    for lo, hi, dst in sorted(ranges):
        f.seek(start + lo * es)
        raw = cf.read((hi - lo) * es)
        if len(raw) != (hi - lo) * es:
            raise EOFError(f"short read at byte {start + lo * es}")
        out[dst:dst + hi - lo] = torch.frombuffer(bytearray(raw), dtype=dtype)


def read_pieces(path: str, md, pieces, stats: ReadStats) -> None:
    """Fill every piece's ``local`` from checkpoint ``path`` (DCP metadata ``md``), reading only its ranges."""
    by_key: dict = {}
    for p in pieces:
        if bool((p.index < 0).any()):
            raise ValueError(f"checkpoint piece {p.key!r}: positions < 0 (padding) must be left out of a piece")
        by_key.setdefault(p.key, []).append(p)
    for key, u in needed(pieces).items():
        tmd = md.state_dict_metadata[key]
        dtype = tmd.properties.dtype
        stats.whole_tensors += tmd.size.numel() * torch.empty((), dtype=dtype).element_size()
        chunks = _chunks(md, key)
        vals = torch.empty(u.numel(), dtype=dtype)
        by_item: dict = {}
        for j, lo, hi, dst in _plan(_runs(u), chunks, key, path):
            by_item.setdefault(j, []).append((lo, hi, dst))
        by_file: dict = {}
        for j in by_item:
            by_file.setdefault(chunks[j][2].relative_path, []).append(j)
        for rel, items in sorted(by_file.items()):
            fn = os.path.join(path, rel)
            try:
                with open(fn, "rb") as f:
                    for j in sorted(items, key=lambda j: int(chunks[j][2].offset)):
                        _read_item(f, chunks[j][2], chunks[j][1], by_item[j], dtype, vals, stats)
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint {path} is damaged: file {rel} is missing", damaged=True) from None
            except (EOFError, RuntimeError, ValueError, OSError) as e:
                size = os.path.getsize(fn) if os.path.isfile(fn) else 0
                raise CheckpointError(f"checkpoint {path} is damaged: reading file {rel} ({size} bytes) failed "
                                      f"({type(e).__name__}: {str(e)[:200]}; truncated?)", damaged=True) from e
        for p in by_key[key]:
            idx = p.index.reshape(-1)
            pos = torch.searchsorted(u, idx)
            with torch.no_grad():
                p.local.copy_(vals[pos].view(p.local.shape).to(p.local.dtype))
                if p.scatter is not None:                 # a copy of the kept elements: write them back
                    t, mask = p.scatter
                    t[mask] = p.local.reshape(-1).to(t.dtype)
