"""``python -m launch.consolidate CHECKPOINT OUT_DIR`` — one ordinary state_dict from a sharded checkpoint.

Reads every ``model/<name>`` tensor of a parallel3d checkpoint (whatever layout wrote it), builds
the unmodified model from the factory recorded in the checkpoint, loads the weights with
``strict=True`` and writes

    OUT_DIR/pytorch_model.pt       torch.save(state_dict)
    OUT_DIR/model.safetensors      the same tensors (tied weights stored once)
    OUT_DIR/config.json ...        for a transformers model: save_pretrained, so
                                   AutoModelForCausalLM.from_pretrained(OUT_DIR) opens it.

Runs in one process; peak memory is the model's size. With ``--sharded`` it streams instead, tensor by
tensor, into sharded safetensors as transformers writes them (``model-0000k-of-0000n.safetensors`` +
``model.safetensors.index.json``, at most ``--max-shard-size`` each, plus config.json):
peak memory about one tensor (:mod:`parallel.checkpoint.hf_export`).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn

from parallel.checkpoint.hf_export import export_sharded
from parallel.checkpoint.integrity import CheckpointError, verify_files
from parallel.checkpoint.sharded import latest, load_full, read_meta
from parallel.config import ConfigError, import_object


def consolidated_model(path: str) -> nn.Module:
    """The unmodified model with the checkpoint's weights (fp32 masters). ``path``: a checkpoint folder (step_N)
    or a ``train.checkpoint.dir``, whose newest complete checkpoint is used (as ``python -m launch.consolidate``
    does; the directory the README names gave "... is not a complete parallel3d checkpoint (no meta.json)")."""
    if not os.path.isfile(os.path.join(path, "meta.json")) and os.path.isdir(path):
        path = latest(path) or path
    meta = read_meta(path)
    verify_files(path, meta, collective=False)       # a resume refuses altered bytes: so does an export
    factory = import_object(meta["model"]["factory"], "model.factory")
    model = factory(**meta["model"]["kwargs"])       # real buffers (rotary tables, masks); weights replaced
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    keys = sorted({f"model/{names[id(p)]}" for p in model.parameters()})
    full = load_full(path, keys, meta)
    sd = model.state_dict(keep_vars=True)
    for key, t in list(sd.items()):
        if isinstance(t, nn.Parameter):
            sd[key] = full[f"model/{names[id(t)]}"].view(t.shape).to(t.dtype)
    model.load_state_dict(sd, strict=True)
    return model


def consolidate(path: str, out_dir: str) -> list[str]:
    """Write the consolidated model under ``out_dir``; returns the files written."""
    model = consolidated_model(path)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    sd = model.state_dict()
    pt = os.path.join(out_dir, "pytorch_model.pt")
    torch.save(sd, pt)
    written.append(pt)
    if hasattr(model, "save_pretrained"):                 # transformers: config.json + model.safetensors
        model.save_pretrained(out_dir)
        written += [os.path.join(out_dir, f) for f in ("config.json", "model.safetensors")]
    else:
        try:
            from safetensors.torch import save_model
        except ImportError:
            print("safetensors is not installed: wrote pytorch_model.pt only (pip install safetensors)",
                  file=sys.stderr)
        else:
            st = os.path.join(out_dir, "model.safetensors")
            save_model(model, st)                          # handles tied weights (stored once)
            written.append(st)
    return written


def _size(text: str) -> int:
    """"5GB" → 5·10⁹ bytes, "500MiB" → 500·2²⁰ (transformers' max_shard_size units); a plain number is bytes."""
    t = text.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                       ("B", 1)):
        if t.endswith(unit):
            return int(float(t[:-len(unit)]) * mult)
    return int(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.consolidate", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint folder (step_N) or a train.checkpoint.dir (newest is used)")
    ap.add_argument("out_dir")
    ap.add_argument("--sharded", action="store_true", help="stream into sharded safetensors (never the whole model)")
    ap.add_argument("--max-shard-size", default="5GB", help="with --sharded: bytes per shard (e.g. 5GB, 500MB)")
    ap.add_argument("--dtype", default=None, help="with --sharded: cast to float32, bfloat16 or float16")
    a = ap.parse_args(argv)
    if a.sharded:
        try:
            size, dtype = _size(a.max_shard_size), getattr(torch, a.dtype) if a.dtype else None
        except (ValueError, AttributeError):
            print(f"--max-shard-size {a.max_shard_size!r} / --dtype {a.dtype!r}: give a size such as 5GB or 500MB "
                  f"and a dtype such as bfloat16", file=sys.stderr)
            return 2
    try:                           # a damaged checkpoint, a factory that does not import, an unwritable out_dir
        path = a.checkpoint if os.path.isfile(os.path.join(a.checkpoint, "meta.json")) else latest(a.checkpoint)
        if path is None:
            print(f"no complete checkpoint at {a.checkpoint!r}", file=sys.stderr)
            return 2
        files = export_sharded(path, a.out_dir, size, dtype) if a.sharded else consolidate(path, a.out_dir)
    except (CheckpointError, ConfigError, OSError) as e:
        hint = (" (the checkpoint's model.factory is imported: run from the directory that holds it, or put that "
                "directory on PYTHONPATH)" if isinstance(e, ConfigError) else "")
        print(f"python -m launch.consolidate: {type(e).__name__}: {e}{hint}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
