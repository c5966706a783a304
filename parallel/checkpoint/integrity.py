"""What a checkpoint promises, and the checks a resume makes before loading it.

A checkpoint's ``meta.json`` records, besides the layout and step:

* ``files``: for every file of the folder but meta.json itself (each rank's DCP shards
  ``__R_k.distcp`` and ``rank_R.pt``, rank 0's DCP ``.metadata``), its size and BLAKE2b digest.
  Each rank hashes the files it wrote; rank 0 gathers them before it commits the folder.
* ``model``: the factory and kwargs, the unmodified model's tensors (name → shape) and its
  parameter count Ψ = Σ numel. The unmodified model's, not a layout's: a checkpoint loads into any
  dp/tp/pp layout or ZeRO stage, and these stay the same.
* ``data``: the data contract. Global batch t reads the dataset positions [t·G, (t+1)·G) mod n,
  permuted per epoch by (seed, epoch) when shuffled (parallel.data), so the position a resume
  continues from, step·G, means the same samples only with the same G, n, shuffle, seed and data
  source (factory and kwargs).

A resume refuses any difference (a ``ValueError`` for the model, a :class:`CheckpointError` for
the data, each naming both values and the fix) and treats a missing, short or altered file as
damage (``CheckpointError(damaged=True)``), which ``train.checkpoint.fallback`` may step over.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch.distributed as dist

_CHUNK = 4 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or resumed; the message names the folder and the fix.
    ``damaged``: its files are missing, short or altered (not merely another model or data)."""

    def __init__(self, msg: str, damaged: bool = False):
        super().__init__(msg)
        self.damaged = damaged


def digest_file(path: str) -> dict:
    h, n = hashlib.blake2b(digest_size=32), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return {"bytes": n, "blake2b": h.hexdigest()}


def own_files(folder: str, rank: int) -> list[str]:
    """The files rank ``rank`` writes into a checkpoint folder (DCP names its shards ``__R_k.distcp``)."""
    names = [n for n in os.listdir(folder) if n.startswith(f"__{rank}_") or n == f"rank_{rank}.pt"]
    return sorted(names + ([".metadata"] if rank == 0 and os.path.isfile(os.path.join(folder, ".metadata")) else []))


def digest_own(folder: str, rank: int) -> dict:
    return {n: digest_file(os.path.join(folder, n)) for n in own_files(folder, rank)}


def _check_file(path: str, name: str, want: dict) -> str | None:
    f = os.path.join(path, name)
    if not os.path.isfile(f):
        return f"file {name} is missing"
    size = os.path.getsize(f)
    if size != want["bytes"]:
        how = "truncated" if size < want["bytes"] else "altered"
        return f"file {name} has {size} bytes but meta.json records {want['bytes']} ({how})"
    if digest_file(f)["blake2b"] != want["blake2b"]:
        return f"file {name} does not match its checksum in meta.json (blake2b; its bytes were altered)"
    return None


def verify_files(path: str, meta: dict, collective: bool = True) -> None:
    """Collective when a process group is up: the ranks hash disjoint shares of the files and every
    rank raises the same ``CheckpointError(damaged=True)`` naming the first bad file. A checkpoint
    without recorded digests (format parallel3d-1) passes. ``collective=False``: this process hashes
    every file (consolidation, which one process may run inside a job)."""
    files = meta.get("files")
    if not files:
        return
    rank, world = (dist.get_rank(), dist.get_world_size()) if collective and dist.is_initialized() else (0, 1)
    names = sorted(files)
    bad = [e for n in names[rank::world] if (e := _check_file(path, n, files[n]))]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, bad)
        bad = sorted(e for part in every for e in part)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"checkpoint {path} is damaged: {bad[0]}{more}", damaged=True)


# --- the model's structure ------------------------------------------------------------------------

def model_structure(template) -> dict:
    """{"tensors": {name: shape}, "parameters": Ψ} of the unmodified model (tied tensors once)."""
    tensors = {n: list(p.shape) for n, p in template.named_parameters()}
    return {"tensors": tensors, "parameters": sum(p.numel() for p in template.parameters())}


def check_model(meta: dict, factory: str, kwargs: dict, structure: dict) -> None:
    """ValueError naming the first difference between the checkpoint's model and this one."""
    saved, kwargs = meta.get("model", {}), _j(kwargs)
    tensors = saved.get("tensors") or {k[len("model/"):]: v for k, v in meta.get("shapes", {}).items()
                                       if k.startswith("model/")}
    mine = structure["tensors"]
    extra, missing = sorted(set(tensors) - set(mine)), sorted(set(mine) - set(tensors))
    if extra or missing:
        def some(names):
            return f"{names[:4]}{' ...' if len(names) > 4 else ''}"
        parts = ([f"{len(extra)} this model lacks {some(extra)}"] if extra else []) + \
                ([f"it lacks {len(missing)} of this model's {some(missing)}"] if missing else [])
        raise ValueError(f"the checkpoint's model has other tensors: {', '.join(parts)} (another structure, e.g. "
                         f"more or fewer layers)")
    for name in mine:
        if list(tensors[name]) != list(mine[name]):
            raise ValueError(f"checkpoint tensor 'model/{name}' has shape {tuple(tensors[name])} but this model's is "
                             f"{tuple(mine[name])}: the checkpoint comes from a different model configuration")
    if "parameters" in saved and saved["parameters"] != structure["parameters"]:
        raise ValueError(f"the checkpoint's model has {saved['parameters']} parameters, this one "
                         f"{structure['parameters']}")
    if saved.get("factory") != factory or saved.get("kwargs") != kwargs:
        diff = sorted(k for k in set(saved.get("kwargs") or {}) | set(kwargs)
                      if (saved.get("kwargs") or {}).get(k) != kwargs.get(k))
        what = (f"model.factory {saved.get('factory')!r} vs {factory!r}" if saved.get("factory") != factory else
                "model.kwargs " + ", ".join(f"{k}: {(saved.get('kwargs') or {}).get(k)!r} saved vs {kwargs.get(k)!r} "
                                            f"now" for k in diff))
        raise ValueError(f"the checkpoint's model was built differently ({what}); its tensors have the same "
                         f"shapes, but they would mean something else in this model")


# --- the data contract ----------------------------------------------------------------------------

def _j(x):
    """As meta.json holds it (tuples become lists)."""
    return json.loads(json.dumps(x, default=str))


def data_contract(cfg, dataset_len: int) -> dict:
    d = cfg.data
    return _j({"global_batch_size": d.global_batch_size, "dataset_len": int(dataset_len), "shuffle": bool(d.shuffle),
               "seed": cfg.train.seed, "factory": d.factory, "kwargs": d.kwargs})


_KEYS = {"global_batch_size": "data.global_batch_size", "dataset_len": "the dataset's length",
         "shuffle": "data.shuffle", "seed": "train.seed", "factory": "data.factory", "kwargs": "data.kwargs"}


def check_data(path: str, meta: dict, contract: dict) -> None:
    """CheckpointError when the samples after the checkpoint's step would not be the ones an
    uninterrupted run trains on (a checkpoint without a recorded contract passes)."""
    saved = meta.get("data")
    if not saved:
        return
    for k, key in _KEYS.items():
        if k == "seed" and not (saved.get("shuffle") or contract["shuffle"]):
            continue                                   # the seed orders the data only when it is shuffled
        if k in saved and saved[k] != contract[k]:
            pos = meta.get("step", 0) * saved.get("global_batch_size", 0)
            raise CheckpointError(
                f"cannot resume from {path}: it was trained with {key}={saved[k]!r}, this job has {contract[k]!r}. "
                f"The data position is step × global batch ({meta.get('step')} × {saved.get('global_batch_size')} = "
                f"{pos} samples), so resuming would skip or repeat samples: resume with {key}={saved[k]!r}, "
                f"or point train.checkpoint.dir at an empty directory to start afresh")
