"""Sharded Hugging Face export and import, tensor by tensor: no process holds the whole model.

Export (:func:`export_sharded`): the unmodified model is built on the meta device (its names, shapes,
dtypes and config, no memory); its parameters — each distinct tensor once, under its first name, as
``save_pretrained`` drops tied copies — are assigned in state_dict order to shards of at most
``max_shard_bytes`` (a tensor larger than that gets a shard of its own), named as transformers names
them: ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json`` ({"metadata":
{"total_size"}, "weight_map": {name: file}}), or one ``model.safetensors`` when a single shard holds
everything. A shard's safetensors header (8-byte little-endian length, then JSON with each tensor's
dtype, shape and [begin, end) byte offsets) is known before any value is read, so each shard is written
as header + one tensor at a time, each read from the parallel3d checkpoint with the ranged reader
(:mod:`parallel.checkpoint.ranged`) and freed before the next: peak memory about one tensor (and its
cast), never the model. With ``world`` processes, process ``rank`` writes shards rank, rank + world, …

Import (:func:`import_into_engine`): every rank reads only the byte ranges of its own pieces (its ZeRO
partition of its tp shard of its stages' parameters) from the safetensors files — their headers say where
each tensor starts — and the masters are written back to the parameters; the optimizer starts fresh.
"""
from __future__ import annotations

import json
import os
import struct

import torch

from parallel.checkpoint.engine_state import _pieces
from parallel.checkpoint.integrity import CheckpointError, verify_files
from parallel.checkpoint.ranged import ReadStats, _chunks, _Counted, _read_item, _runs, needed
from parallel.checkpoint.sharded import _dcp_metadata, read_meta
from parallel.config import import_object

__all__ = ["export_sharded", "import_into_engine", "plan_shards", "shard_name"]

INDEX = "model.safetensors.index.json"
_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
       torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH = {v: k for k, v in _ST.items()}


def shard_name(k: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"


def meta_model(meta: dict):
    """The checkpoint's unmodified model on the meta device (factory and kwargs from meta.json)."""
    factory = import_object(meta["model"]["factory"], "model.factory")
    with torch.device("meta"):
        return factory(**meta["model"]["kwargs"])


def _tensors(model, meta: dict) -> list:
    """[(export name, checkpoint key, shape, dtype)]: each distinct parameter once (first name), then the
    persistent buffers the checkpoint holds, in state_dict order."""
    first: dict = {}
    for n, p in model.named_parameters():
        first.setdefault(id(p), n)
    params = dict(model.named_parameters(remove_duplicate=False))
    shapes, out, seen = meta.get("shapes", {}), [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name in params:
            canon = first[id(params[name])]
            if canon in seen:
                continue
            seen.add(canon)
            out.append((canon, f"model/{canon}", tuple(t.shape), t.dtype))
        elif f"buffer/{name}" in shapes:
            out.append((name, f"buffer/{name}", tuple(t.shape), t.dtype))
    return out


def plan_shards(tensors: list, max_shard_bytes: int, dtype=None) -> list:
    """Greedy, in order: [[(name, key, shape, dtype), ...] per shard]."""
    shards, cur, size = [], [], 0
    for name, key, shape, dt in tensors:
        dt = dtype or dt
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, key, shape, dt))
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def _header(shard: list) -> tuple[bytes, list]:
    h, off, sizes = {"__metadata__": {"format": "pt"}}, 0, []
    for name, _, shape, dt in shard:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        h[name] = {"dtype": _ST[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
        sizes.append(n)
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


def _read_whole(path: str, md, key: str, stats: ReadStats) -> torch.Tensor:
    tmd = md.state_dict_metadata[key]
    out = torch.empty(tmd.size.numel(), dtype=tmd.properties.dtype)
    chunks = _chunks(md, key)
    by_file: dict = {}
    for c0, m, info in chunks:
        by_file.setdefault(info.relative_path, []).append((c0, m, info))
    for rel, items in by_file.items():
        try:
            with open(os.path.join(path, rel), "rb") as f:
                for c0, m, info in sorted(items, key=lambda c: int(c[2].offset)):
                    _read_item(f, info, m, [(0, m, c0)], out.dtype, out, stats)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} is damaged: file {rel} is missing", damaged=True) from None
    return out


def export_sharded(path: str, out_dir: str, max_shard_bytes: int = 5 * 2**30, dtype=None, rank: int = 0,
                   world: int = 1, stats: ReadStats | None = None) -> list[str]:
    """Write ``path``'s model as sharded safetensors under ``out_dir`` (see the module docstring); returns
    the files this process wrote. ``dtype``: cast every tensor (default: the model's own dtypes)."""
    meta = read_meta(path)
    verify_files(path, meta, collective=False)       # altered bytes would be exported as weights
    md = _dcp_metadata(path)
    stats = stats if stats is not None else ReadStats()
    model = meta_model(meta)
    shards = plan_shards(_tensors(model, meta), max_shard_bytes, dtype)
    os.makedirs(out_dir, exist_ok=True)
    written, n = [], len(shards)
    for k in range(rank, n, world):
        fn = os.path.join(out_dir, shard_name(k + 1, n))
        head, sizes = _header(shards[k])
        tmp = fn + ".tmp"
        with open(tmp, "wb") as f:
            f.write(head)
            for (name, key, _shape, dt), size in zip(shards[k], sizes):
                t = _read_whole(path, md, key, stats).to(dt)
                raw = t.view(torch.uint8) if t.numel() else t
                if raw.numel() != size:
                    raise RuntimeError(f"export: {name} has {raw.numel()} bytes, its header says {size}")
                f.write(raw.numpy().data)             # the tensor's own bytes, no copy
                del t, raw
        os.replace(tmp, fn)
        written.append(fn)
    if rank == 0:
        if n > 1:
            total = sum(sum(_header(s)[1]) for s in shards)
            index = {"metadata": {"total_size": total},
                     "weight_map": {name: shard_name(k + 1, n) for k, s in enumerate(shards) for name, *_ in s}}
            with open(os.path.join(out_dir, INDEX), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
            written.append(os.path.join(out_dir, INDEX))
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "save_pretrained"):
            cfg.save_pretrained(out_dir)
            written.append(os.path.join(out_dir, "config.json"))
    return written


def _st_headers(src: str, stats: ReadStats) -> dict:
    """{tensor name: (file, data start, dtype, shape)} of a safetensors directory (index or one file)."""
    idx = os.path.join(src, INDEX)
    if os.path.isfile(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        stats.metadata += os.path.getsize(idx)
    elif os.path.isfile(os.path.join(src, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{src!r} holds neither {INDEX} nor model.safetensors: export it with "
                                f"python -m launch.consolidate CHECKPOINT OUT_DIR --sharded")
    out = {}
    for fn in files:
        with open(os.path.join(src, fn), "rb") as f:
            cf = _Counted(f, stats, "metadata")
            (n,) = struct.unpack("<Q", cf.read(8))
            h = json.loads(cf.read(n))
        for name, e in h.items():
            if name != "__metadata__":
                out[name] = (fn, 8 + n + e["data_offsets"][0], _TORCH[e["dtype"]], tuple(e["shape"]))
    return out


def import_into_engine(engine, src: str) -> ReadStats:
    """Load the weights of a safetensors directory (sharded or not) into ``engine``, in any layout: each
    rank reads the byte ranges of its own pieces only. Collective (the final write-back all-gathers)."""
    stats = ReadStats()
    heads = _st_headers(src, stats)
    aliases: dict = {}
    for n, p in engine.template.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    by_canon = {names[0]: names for names in aliases.values()}
    with engine.zero.materialized(write_back=True):
        pieces = _pieces(engine, with_optim=False)[0]
        need = needed(pieces)
        for key, u in need.items():
            canon = key[len("model/"):]
            name = next((a for a in by_canon.get(canon, [canon]) if a in heads), None)
            if name is None:
                raise KeyError(f"{src!r} has no tensor {canon!r} (nor a tied alias): it holds another model")
            fn, start, dt, shape = heads[name]
            want = next(p.full_shape for p in pieces if p.key == key)
            if tuple(shape) != tuple(want):
                raise ValueError(f"{src}: {name} has shape {tuple(shape)} but this model's is {tuple(want)}")
            es = torch.empty((), dtype=dt).element_size()
            vals = torch.empty(u.numel(), dtype=dt)
            with open(os.path.join(src, fn), "rb") as f:
                cf = _Counted(f, stats, "data")
                for s, n, pos in _runs(u):
                    f.seek(start + s * es)
                    vals[pos:pos + n] = torch.frombuffer(bytearray(cf.read(n * es)), dtype=dt)
            stats.whole_tensors += torch.Size(shape).numel() * es
            for p in pieces:
                if p.key == key:
                    with torch.no_grad():
                        p.local.copy_(vals[torch.searchsorted(u, p.index.reshape(-1))].view(p.local.shape)
                                      .to(p.local.dtype))
                        if p.scatter is not None:
                            t, mask = p.scatter
                            t[mask] = p.local.reshape(-1).to(t.dtype)
        engine.zero._write_back()
    return stats
