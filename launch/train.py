"""The per-rank training entry point: ``torchrun --nproc_per_node N -m launch.train --config X.yaml [k=v ...]``.

Follows the parity contract of DESIGN.md: seed torch with train.seed right before the model
factory (every layout starts from the weights one process would build), global batch t is the
dataset positions [t·G, (t+1)·G), the loss is the mean over the global batch. Rank 0 appends one
JSON object per step to train.metrics_file and prints a progress line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn

from launch.metrics import MetricsLog
from parallel import checkpoint, comm
from parallel.config import Config, ConfigError, import_object, load_config
from parallel.data import check_dataset, rank_batch
from parallel.engine import parallelize
from parallel.mesh import Mesh, init_distributed


def build_model(cfg: Config) -> nn.Module:
    factory = import_object(cfg.model.factory, "model.factory")
    torch.manual_seed(cfg.train.seed)
    try:
        model = factory(**cfg.model.kwargs)
    except Exception as e:
        raise RuntimeError(f"model.factory {cfg.model.factory!r} raised {type(e).__name__}: {e} "
                           f"(check model.kwargs={cfg.model.kwargs})") from e
    if not isinstance(model, nn.Module):
        raise TypeError(f"model.factory {cfg.model.factory!r} returned {type(model).__name__}, not an nn.Module")
    return model


def build_dataset(cfg: Config):
    factory = import_object(cfg.data.factory, "data.factory")
    try:
        ds = factory(**cfg.data.kwargs)
    except Exception as e:
        raise RuntimeError(f"data.factory {cfg.data.factory!r} raised {type(e).__name__}: {e} "
                           f"(check data.kwargs={cfg.data.kwargs})") from e
    check_dataset(ds, cfg.data.global_batch_size)
    return ds


def run(cfg: Config, mesh: Mesh, print_fn=print) -> dict:
    """Train ``cfg.train.steps`` steps on an existing mesh; returns {"losses": [...], "engine": engine}."""
    model = build_model(cfg)
    dataset = build_dataset(cfg)
    engine = parallelize(model, cfg, mesh)
    del model
    ck = cfg.train.checkpoint
    if cfg.train.resume:
        path = checkpoint.latest(ck.dir)
        if path is not None:
            meta = engine.load(path)
            if mesh.rank == 0:
                print_fn(f"resumed from {path} (step {meta['step']}, saved as {meta['layout']})", flush=True)
    metrics = MetricsLog(cfg, mesh, print_fn, append=engine.step_count > 0)
    dp, dp_rank = mesh.size("dp"), mesh.local_rank("dp")
    losses = []
    for step in range(engine.step_count, cfg.train.steps):
        t0 = time.perf_counter()
        before = mesh.stats.snapshot()
        batch = rank_batch(dataset, step, cfg.data.global_batch_size, dp, dp_rank, cfg.train.seed, cfg.data.shuffle)
        loss = engine.train_step(batch)
        step_s = time.perf_counter() - t0
        losses.append(loss)
        metrics.log(step, loss, step_s, comm.CommStats.diff(mesh.stats.snapshot(), before), engine)
        if ck.every and engine.step_count % ck.every == 0:
            engine.save(checkpoint.step_dir(ck.dir, engine.step_count))
    if cfg.train.finish:
        finish = import_object(cfg.train.finish, "train.finish")
        full = engine.full_model()                     # collective: every rank takes part
        if mesh.rank == 0:
            finish(full, cfg)
    return {"losses": losses, "engine": engine, "dataset": dataset}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="launch.train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML config file")
    ap.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config mapped onto the YAML config")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides, deepspeed=args.deepspeed).validate(world)
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"config error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    device = None if cfg.device == "auto" else torch.device(cfg.device)
    if device is not None and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    device = init_distributed(device, cfg.train.timeout_s)
    mesh = Mesh(pp=cfg.parallel.pp, dp=cfg.parallel.dp, tp=cfg.parallel.tp, device=device)
    try:
        run(cfg, mesh)
    finally:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
