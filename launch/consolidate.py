"""``python -m launch.consolidate CHECKPOINT OUT_DIR`` — one ordinary state_dict from a sharded checkpoint.

Reads every ``model/<name>`` tensor of a parallel3d checkpoint (whatever layout wrote it), builds
the unmodified model from the factory recorded in the checkpoint, loads the weights with
``strict=True`` and writes

    OUT_DIR/pytorch_model.pt       torch.save(state_dict)
    OUT_DIR/model.safetensors      the same tensors (tied weights stored once)
    OUT_DIR/config.json ...        for a transformers model: save_pretrained, so
                                   AutoModelForCausalLM.from_pretrained(OUT_DIR) opens it.

Runs in one process; peak memory is the model's size.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn

from parallel.checkpoint.sharded import latest, load_full, read_meta
from parallel.config import import_object


def consolidated_model(path: str) -> nn.Module:
    """The unmodified model with the checkpoint's weights (fp32 masters)."""
    meta = read_meta(path)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.consolidate", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint folder (step_N) or a train.checkpoint.dir (newest is used)")
    ap.add_argument("out_dir")
    a = ap.parse_args(argv)
    path = a.checkpoint if os.path.isfile(os.path.join(a.checkpoint, "meta.json")) else latest(a.checkpoint)
    if path is None:
        print(f"no complete checkpoint at {a.checkpoint!r}", file=sys.stderr)
        return 2
    for f in consolidate(path, a.out_dir):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
