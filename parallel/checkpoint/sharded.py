"""Sharded, atomic, reshardable checkpoints on torch.distributed.checkpoint (DCP).

Every tensor a rank holds — a tensor-parallel shard of a weight, a ZeRO partition of Adam's
``exp_avg``, a pipeline stage's bias — is a set of elements of one *logical* tensor of the
unmodified model (``model/<name>``, ``optim/<name>/<state>``). A :class:`Piece` pairs the local
values with ``index``: for each local element, its position in the flattened logical tensor. The
index comes from running the same sharding on a model whose values are their own positions
(``parallel.layout``), so it covers every layout (fused QKV split by heads, row/column splits,
ZeRO flat partitions, pipeline stages) without a case per layout.

Saving: the one rank that *owns* an element writes it (owners are disjoint and cover the tensor);
runs of consecutive indices become the 1-D shards of a DCP ShardedTensor, so each rank writes only
its own shards. Loading into any layout: each rank reads exactly the byte ranges of the elements its
pieces cover, from whatever shards were saved (:mod:`parallel.checkpoint.ranged`): IO and memory in
proportion to its shard, not to the checkpoint.

A checkpoint is complete or absent: ranks write ``<dir>/.tmp-step_N`` and hash the files they wrote;
rank 0 gathers the digests, writes ``meta.json`` with them (:mod:`parallel.checkpoint.integrity`)
and renames the folder to ``<dir>/step_N`` (rename is atomic on POSIX). A ``step_N`` already
there is never deleted: it is renamed to ``step_N.replaced-<time>``. A ``.tmp-step_N`` left by an
earlier failed save of that step (never a checkpoint) is removed first.
``save_pieces(..., on_written=fn)`` calls ``fn()`` on each rank between the two: every rank's shards
and rank file are written (a barrier), nothing is committed (where a test injects a checkpoint-phase fault).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

from parallel.checkpoint.integrity import CheckpointError, digest_own
from parallel.checkpoint.ranged import ReadStats, read_pieces

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Piece:
    key: str                 # logical tensor name
    full_shape: tuple        # its shape in the unmodified model
    local: torch.Tensor      # this rank's values (any shape; filled in place on load)
    index: torch.Tensor      # int64, local.numel() entries: positions in the flattened logical tensor
    owner: bool              # this rank writes these elements (exactly one owner per element)
    scatter: object = None   # (tensor, mask): ``local`` is a copy of tensor[mask], written back after a load


def _runs(index: torch.Tensor):
    """Sort positions; return (order, [(start, length, at), ...]) of consecutive runs. ``order`` is None when
    the positions are already increasing (a ZeRO piece of a whole or row-split parameter): no sort."""
    idx = index.reshape(-1)
    if idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all()):
        order, s = None, idx
    else:
        order = torch.argsort(idx)
        s = idx[order]
    if s.numel() == 0:
        return order, []
    breaks = torch.nonzero(s[1:] != s[:-1] + 1).flatten() + 1
    starts = torch.cat([torch.tensor([0]), breaks]).tolist()
    ends = torch.cat([breaks, torch.tensor([s.numel()])]).tolist()
    return order, [(int(s[a]), b - a, a) for a, b in zip(starts, ends)]


def _sharded(key_runs_all: dict, key: str, parts: list, rank: int):
    """``parts``: [(start, n, values)] — each run's own copy (a snapshot; torch.save writes just its n values)."""
    numel, dtype, all_runs = key_runs_all[key]
    shards = [Shard(v, ShardMetadata([start], [n], f"rank:{rank}/cpu")) for start, n, v in parts]
    md = ShardedTensorMetadata([ShardMetadata([s], [n], f"rank:{r}/cpu") for r, s, n in all_runs],
                               torch.Size([numel]), TensorProperties(dtype=dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ShardedTensor._init_from_local_shards_and_global_metadata(shards, md)


def _all_runs(local: dict, world: int) -> tuple[dict, dict]:
    """Collective: every rank's runs of every logical tensor, {key: [numel, dtype, [(rank, start,
    length)]]}, and the tensors' shapes; checks that the owners cover each tensor exactly."""
    summary = {k: (e[0], e[1], e[2], [(s, n) for s, n, _ in e[4]]) for k, e in local.items()}
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, summary)
    else:
        gathered = [summary]
    key_runs_all, shapes = {}, {}
    for r, summ in enumerate(gathered):
        for k, (numel, dtype, shape, runs) in summ.items():
            ent = key_runs_all.setdefault(k, [numel, dtype, []])
            ent[2].extend((r, s, n) for s, n in runs)
            shapes[k] = shape
    for k, (numel, _, runs) in key_runs_all.items():
        covered = sum(n for _, _, n in runs)
        if covered != numel:
            raise RuntimeError(f"checkpoint: logical tensor {k!r} has {numel} elements but the owners cover {covered}; "
                               f"this is a bug in the layout's ownership")
    return key_runs_all, shapes


def stage_pieces(pieces: list[Piece], path: str) -> dict:
    """Collective (the default group): the first half of a save. Rank 0 makes the temporary folder;
    every rank copies its owned elements to host memory, sorted into runs, and the ranks exchange their
    runs (each logical tensor's owners must cover it exactly). Returns what :func:`save_pieces` (or a
    background writer, :mod:`parallel.checkpoint.async_save`) writes: {"state", "shapes", "tmp", "final",
    "rank", "world"} — a snapshot: the pieces may change afterwards."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    parent, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(parent, f".tmp-{name}")
    if rank == 0:
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    local = {}
    for p in pieces:
        if not p.owner:
            continue
        order, runs = _runs(p.index)
        flat = p.local.detach().reshape(-1)
        vals = flat if order is None else flat[order]
        e = local.setdefault(p.key, [int(torch.Size(p.full_shape).numel()), vals.dtype, list(p.full_shape), [], []])
        for st, n, a in runs:                         # one copy per run, on the host: the snapshot
            e[4].append((st, n, None))
            e[3].append((st, n, vals[a:a + n].to("cpu", copy=True)))
    key_runs_all, shapes = _all_runs(local, world)
    state = {k: _sharded(key_runs_all, k, e[3], rank) for k, e in local.items()}
    if world > 1:
        dist.barrier()
    return {"state": state, "shapes": shapes, "tmp": tmp, "final": os.path.join(parent, name), "rank": rank,
            "world": world}


def save_pieces(pieces: list[Piece], path: str, meta: dict, rank_meta: dict | None = None, on_written=None) -> str:
    """Collective: write this rank's owned elements of every piece under ``path`` atomically.

    ``meta`` (layout, step, data position, ...) is written by rank 0; ``rank_meta`` (e.g. RNG
    state) by every rank; ``on_written()``, when given, runs once every rank has written into the
    temporary folder (a barrier) and before the commit. Returns the final folder."""
    st = stage_pieces(pieces, path)
    state, shapes, tmp, rank, world = st["state"], st["shapes"], st["tmp"], st["rank"], st["world"]
    parent, name = os.path.split(st["final"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=tmp, no_dist=world == 1)
    with open(os.path.join(tmp, f"rank_{rank}.pt"), "wb") as f:
        torch.save(rank_meta or {}, f)
    mine = digest_own(tmp, rank)
    if world > 1:                  # every rank's files are complete: a failing hook may remove the folder safely
        dist.barrier()
    if on_written is not None:
        on_written()
    files = [mine]
    if world > 1:
        files = [None] * world
        dist.all_gather_object(files, mine)
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "shapes": shapes, "world_size": world,
                       "files": {n: d for part in files for n, d in sorted(part.items())}}, f, indent=1)
        final = os.path.join(parent, name)
        if os.path.exists(final):                     # not ours to delete: keep it, out of the way
            os.replace(final, f"{final}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(tmp, final)
    if world > 1:
        dist.barrier()
    return os.path.join(parent, name)


def read_meta(path: str) -> dict:
    meta_file = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_file):
        raise FileNotFoundError(f"{path!r} is not a complete parallel3d checkpoint (no meta.json)")
    try:
        with open(meta_file) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: file meta.json cannot be read ({type(e).__name__}: "
                              f"{e})", damaged=True) from None


def tmp_dir(path: str) -> str:
    """Where :func:`save_pieces` stages the checkpoint ``path`` until it commits it."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".tmp-{name}")


def _short_file(path: str, md) -> str | None:
    """The first file the DCP metadata ``md`` points into that is missing or shorter than it says."""
    need: dict = {}
    for info in (getattr(md, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel:
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, n in sorted(need.items()):
        f = os.path.join(path, rel)
        if not os.path.isfile(f):
            return f"file {rel} is missing"
        if os.path.getsize(f) < n:
            return f"file {rel} has {os.path.getsize(f)} bytes but its shards end at byte {n} (truncated)"
    return None


def _dcp_metadata(path: str):
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except Exception as e:                            # UnpicklingError, EOFError, FileNotFoundError, ...
        raise CheckpointError(f"checkpoint {path} is damaged: file .metadata (DCP's index of the shards) cannot be "
                              f"read ({type(e).__name__}: {str(e)[:200]})", damaged=True) from e


def load_full(path: str, keys: list[str], meta: dict | None = None) -> dict:
    """Read whole logical tensors ``keys`` (flattened) from a checkpoint, in any process layout."""
    meta = meta or read_meta(path)
    full_md = _dcp_metadata(path)
    md = full_md.state_dict_metadata
    out = {}
    for k in keys:
        if k not in md:
            raise KeyError(f"checkpoint {path!r} has no tensor {k!r}: it was saved from a different model "
                           f"(it holds e.g. {sorted(md)[:3]})")
        out[k] = torch.empty(md[k].size, dtype=md[k].properties.dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(out, checkpoint_id=path, no_dist=True)
    except BaseException as e:                        # DCP's CheckpointException is a BaseException
        if not isinstance(e, Exception) and type(e).__name__ != "CheckpointException":
            raise
        bad = _short_file(path, full_md)
        raise CheckpointError(f"checkpoint {path} is damaged: " + (bad or f"reading its shards failed "
                              f"({type(e).__name__}: {str(e)[:300]})"), damaged=True) from e
    return out


def load_pieces(pieces: list[Piece], path: str, stats: ReadStats | None = None) -> dict:
    """Fill every piece's ``local`` from the checkpoint at ``path``; returns its meta.

    Each rank reads on its own (no collectives), and only the byte ranges of the elements its pieces
    cover (:mod:`parallel.checkpoint.ranged`); ``stats`` counts the bytes read."""
    meta = read_meta(path)
    shapes = meta["shapes"]
    for p in pieces:
        if p.key not in shapes:
            raise KeyError(f"checkpoint {path!r} has no tensor {p.key!r}: it comes from a different model or "
                           f"optimizer (load with the model and optimizer.name it was saved with)")
        if list(shapes[p.key]) != list(p.full_shape):
            raise ValueError(f"checkpoint tensor {p.key!r} has shape {tuple(shapes[p.key])} but this model's is "
                             f"{tuple(p.full_shape)}: the checkpoint comes from a different model configuration")
    stats = stats if stats is not None else ReadStats()
    md = _dcp_metadata(path)
    stats.metadata += os.path.getsize(os.path.join(path, ".metadata"))
    bad = _short_file(path, md)                       # sizes only (stat): a missing or short file, named
    if bad:
        raise CheckpointError(f"checkpoint {path} is damaged: {bad}", damaged=True)
    read_pieces(path, md, pieces, stats)
    return meta


def latest(root: str) -> str | None:
    """The newest complete checkpoint under ``root`` (``step_N`` folders with meta.json), or None."""
    if not root or not os.path.isdir(root):
        return None
    steps = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "meta.json")):
            steps.append((int(m.group(1)), name))
    return os.path.join(root, max(steps)[1]) if steps else None


def step_folders(root: str) -> list[str]:
    """Every ``step_N`` folder under ``root``, newest first, complete or not (a resume says why it
    skips one; :func:`latest` silently takes the newest with a meta.json)."""
    if not root or not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(root) if (m := _STEP_DIR.match(n))]
    return [os.path.join(root, n) for _, n in sorted(found, reverse=True)]


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")
