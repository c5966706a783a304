"""The per-rank training entry point: ``torchrun --nproc_per_node N -m launch.train --config X.yaml [k=v ...]``.

Follows the parity contract of DESIGN.md: seed torch with train.seed right before the model
factory (every layout starts from the weights one process would build), global batch t is the
dataset positions [t·G, (t+1)·G), the loss is the mean over the global batch. Rank 0 appends one
JSON object per step to train.metrics_file and prints a progress line.

Failures (docs/failures.md): a rank that fails prints ``rank R failed at step S (phase):`` with its
traceback (once per job), ranks that then lose their peers print one line, and every process
exits non-zero at once; a watchdog ends a rank stuck in one phase for train.timeout_s
(:mod:`parallel.reliability.watchdog`). Each failing rank also writes a one-line record (rank, phase, reason)
into torchrun's error file, from which the launcher names the first failing rank
(:mod:`launch.failures`). A worker that torchrun restarts (TORCHELASTIC_RESTART_COUNT > 0)
resumes from the newest complete checkpoint in train.checkpoint.dir, data position and RNG
included, and the metrics file keeps one line per step. train.on_nonfinite decides what a
non-finite gradient does (stop: end the job naming the step; skip: skip that update);
train.check_collectives compares collective fingerprints every step (:mod:`parallel.reliability.fingerprint`);
train.fault / $P3D_FAULT injects a fault under P3D_ENABLE_FAULTS=1 (:mod:`parallel.reliability.faults`).
Workers die with their launcher, rank 0 owns train.checkpoint.dir, and train.save_on_signal stops
every rank after one step with a checkpoint, exit 128 + signal (:mod:`launch.lifecycle`).
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import os
import re
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from launch import failures, lifecycle
from launch.evaluate import Evaluator
from launch.metrics import RANKS_FILE, MetricsLog
from launch.preflight import check_config
from launch.resume import (  # noqa: F401  (importable from here as before)
    CheckpointError,
    check_writable,
    resume,
    save_checkpoint,
    truncate_metrics,
)
from parallel import checkpoint, comm
from parallel.checkpoint.async_save import AsyncSaver
from parallel.checkpoint.integrity import data_contract
from parallel.checkpoint.retention import Retention, job_id
from parallel.config import Config, ConfigError, import_object, load_config
from parallel.config.deepspeed import deepspeed_hint
from parallel.data import check_dataset, global_indices, rank_batch
from parallel.engine import parallelize
from parallel.mesh import Mesh, backend_for, default_device, init_distributed
from parallel.prefetch import Prefetcher
from parallel.reliability.faults import Injector, fault_from, restart_attempt
from parallel.reliability.fingerprint import Checker, Recorder
from parallel.reliability.signals import StopRequest, die_with_parent
from parallel.reliability.watchdog import (
    EXIT_FAILURE,
    Progress,
    Watchdog,
    default_store,
    failure_report,
    group_timeout_s,
    is_peer_failure,
    set_default_group_timeout,
    terminate,
)
from parallel.zero import NonFiniteError  # noqa: F401  (raised by the engine; importable from here as before)


class DataError(ValueError):
    """A batch could not be formed from the dataset."""


_CONFIG_KEY = re.compile(r"\b(parallel|zero|data|optimizer|scheduler|train|model)\.[a-z_]+|\b(precision|loss)=")


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
    if getattr(ds, "streaming", False) and cfg.data.shuffle:
        raise ConfigError(f"data.shuffle=true permutes a dataset of known length; {cfg.data.factory!r} returns a "
                          f"stream (parallel.stream.StreamDataset): set data.shuffle=false and give it shuffle_buffer")
    check_dataset(ds, cfg.data.global_batch_size)
    return ds


# --- bad input: clear errors ----------------------------------------------------------------------

def _shapes(sample):
    if isinstance(sample, torch.Tensor):
        return tuple(sample.shape)
    if isinstance(sample, (tuple, list)):
        return tuple(_shapes(s) for s in sample)
    if isinstance(sample, dict):
        return tuple((k, _shapes(v)) for k, v in sorted(sample.items()))
    return type(sample).__name__


def input_vocab(model: nn.Module) -> int | None:
    """The size of the input embedding (HF's get_input_embeddings(), else the largest nn.Embedding):
    integer inputs must lie in [0, vocab)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except Exception:                       # e.g. NotImplementedError of a model without one
        emb = None
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(sizes) if sizes else None


def load_batch(dataset, step: int, cfg: Config, dp: int, dp_rank: int, vocab: int | None = None):
    """This rank's share of global batch ``step``; a DataError naming the samples when they cannot
    be stacked (different shapes: the micro-batches' activations would change shape) or when an
    integer input holds a token id outside [0, vocab) (one max and min over the batch)."""
    per = cfg.data.global_batch_size // dp

    def indices():
        return global_indices(step, cfg.data.global_batch_size, len(dataset), cfg.train.seed,
                              cfg.data.shuffle)[dp_rank * per:(dp_rank + 1) * per]
    try:
        batch = rank_batch(dataset, step, cfg.data.global_batch_size, dp, dp_rank, cfg.train.seed, cfg.data.shuffle)
    except (RuntimeError, TypeError, ValueError) as e:
        idx = indices()
        shapes = {i: _shapes(dataset[i]) for i in idx}
        kinds = sorted(set(shapes.values()), key=lambda s: -list(shapes.values()).count(s))
        if len(kinds) > 1:
            odd = [f"index {i}: {s}" for i, s in shapes.items() if s != kinds[0]][:4]
            raise DataError(f"step {step}: the samples of global batch {step} have different shapes ({kinds[0]} for "
                            f"most; {', '.join(odd)}), so its micro-batches cannot be stacked: make data.factory "
                            f"return one shape per sample (pad or crop)") from e
        raise DataError(f"step {step}: forming the batch from dataset indices {idx[:8]} failed: "
                        f"{type(e).__name__}: {e}") from e
    x = batch[0] if isinstance(batch, (tuple, list)) else batch.get("input_ids") if isinstance(batch, dict) else None
    if vocab and isinstance(x, torch.Tensor) and x.numel() and not x.is_floating_point() and x.dtype != torch.bool:
        hi, lo = int(x.max()), int(x.min())
        if hi >= vocab or lo < 0:
            bad = int(((x >= vocab) | (x < 0)).reshape(x.shape[0], -1).any(1).nonzero()[0])
            row = x[bad]
            tok = int(row.max()) if int(row.max()) >= vocab else int(row.min())
            raise DataError(f"step {step}: dataset index {indices()[bad]} holds token id {tok}, "
                            f"outside the model's vocabulary of {vocab} (ids 0..{vocab - 1}; this batch's ids span "
                            f"{lo}..{hi}): encode the data with the model's tokenizer, or raise the model's vocab_size")
    return batch


def train_step(engine, batch, progress: Progress, print_fn, rank: int) -> float:
    """One step; the engine applies train.on_nonfinite (stop: NonFiniteError naming the step; skip:
    the update is dropped, the step counts and its loss is NaN), announced here on rank 0."""
    loss = engine.train_step(batch)
    if engine.last_result.nonfinite_skip and rank == 0:
        print_fn(f"step {progress.step}: non-finite gradient, update skipped (train.on_nonfinite=skip)", flush=True)
    return loss


# --- the loop -------------------------------------------------------------------------------------

def _instrument(cfg: Config, mesh: Mesh, progress: Progress, watched: bool):
    """The comm recorder (fingerprints when train.check_collectives; else, under a watchdog, just
    the last call) and the fingerprint checker on its own gloo group."""
    checker = None
    if (cfg.train.check_collectives or os.environ.get("P3D_CHECK_COLLECTIVES") == "1") and mesh.world_size > 1:
        rec = mesh.stats.recorder = Recorder(mesh.rank, progress, fingerprint=True)
        checker = Checker(rec, mesh.rank, mesh.world_size, pg=dist.new_group(backend="gloo"), store=default_store())
        progress.checker = checker
    elif watched:
        mesh.stats.recorder = Recorder(mesh.rank, progress, fingerprint=False)
    return checker


def run(cfg: Config, mesh: Mesh, print_fn=print, progress: Progress | None = None,
        stop: StopRequest | None = None) -> dict:
    """Train ``cfg.train.steps`` steps on an existing mesh; returns {"losses", "engine", "dataset",
    "stopped": a save signal's number or 0, "saved": the checkpoint saved at that stop or None}.
    ``progress`` (main passes its watchdog's) gets the step and phase; with ``stop`` the ranks agree at
    each step boundary on a save signal, then save (with train.checkpoint.dir) and stop together."""
    watched = progress is not None
    progress = progress or Progress(mesh.rank)
    checker = _instrument(cfg, mesh, progress, watched)
    progress.set_phase("setup (build model)")
    model = build_model(cfg)
    vocab = input_vocab(model)
    progress.set_phase("setup (build dataset)")
    dataset = build_dataset(cfg)
    evaluator = Evaluator(cfg)
    ck = cfg.train.checkpoint
    if ck.every:
        check_writable(ck.dir)
    progress.set_phase("setup (parallelize)")
    sample = None
    if cfg.parallel.pp > 1:                  # one input for the pipeline split's probe forward (CNNs, pp_balance)
        first = rank_batch(dataset, 0, 1, 1, 0)
        sample = first[0] if isinstance(first, (tuple, list)) else None
    try:
        engine = parallelize(model, cfg, mesh, sample=sample)
    except ValueError as e:      # a config that does not fit this model (e.g. more pipeline stages than blocks)
        if isinstance(e, ConfigError) or not _CONFIG_KEY.search(str(e)):
            raise
        raise ConfigError(f"{e} (model.factory={cfg.model.factory!r})") from e
    del model
    if mesh.rank == 0 and engine.compiled is not None:     # compile.enabled: the first forward compiles
        print_fn(f"{engine.compiled.describe()}; the first step compiles (with inductor tens of seconds or more), "
                 f"within train.timeout_s={cfg.train.timeout_s:g}: raise it if the watchdog stops that step")
    spec = fault_from(cfg, warn=(lambda line: print_fn(line, file=sys.stderr, flush=True)) if mesh.rank == 0 else None)
    detach = [progress.follow(engine)] + ([Injector(spec, mesh.rank).attach(engine)] if spec else [])
    progress.set_phase("setup (resume)")
    resume(engine, cfg, mesh.rank, print_fn, len(dataset))
    if mesh.rank == 0 and engine.step_count > 0 and cfg.train.metrics_file:   # the steps to redo are logged anew
        truncate_metrics(cfg.train.metrics_file, engine.step_count)
        truncate_metrics(os.path.join(os.path.dirname(os.path.abspath(cfg.train.metrics_file)), RANKS_FILE),
                         engine.step_count)
    metrics = MetricsLog(cfg, mesh, print_fn, append=engine.step_count > 0)
    dp, dp_rank = mesh.size("dp"), mesh.local_rank("dp")
    keep = Retention(ck.dir, ck.keep_last, job_id())
    saved_meta = {"data": data_contract(cfg, len(dataset)), "job": job_id()}
    losses, stopped, saved = [], 0, None
    # batches loaded ahead in the steps' order by a background thread (parallel/prefetch.py)
    loader = Prefetcher(lambda s: load_batch(dataset, s, cfg, dp, dp_rank, vocab), engine.step_count,
                        cfg.train.steps, cfg.data.prefetch)
    detach.append(loader.close)
    saver = AsyncSaver(engine, max(cfg.train.timeout_s, 1800.0)) if ck.async_ and ck.dir else None
    for step in range(engine.step_count, cfg.train.steps):
        progress.begin_step(step)
        t0 = time.perf_counter()
        before = mesh.stats.snapshot()
        batch, data_s, waited = loader.get(step)          # data_s: this rank waited for its batch
        loss = train_step(engine, batch, progress, print_fn, mesh.rank)
        step_s = time.perf_counter() - t0
        losses.append(loss)
        progress.set_phase("metrics")
        extra = {"data_wait_s": data_s, "data_waited": int(waited),
                 **(evaluator.run(engine, dp, dp_rank) if evaluator.due(step) else {})}
        metrics.log(step, loss, step_s, comm.CommStats.diff(mesh.stats.snapshot(), before), engine, extra)
        if checker is not None:
            checker.check(f"at the end of step {step}")
        stopped = stop.agree(mesh) if stop is not None else 0
        if (ck.every and engine.step_count % ck.every == 0) or (stopped and ck.dir):
            path = checkpoint.step_dir(ck.dir, engine.step_count)
            if saver is not None:                   # train.checkpoint.async: written in the background
                saver.save(path, saved_meta, on_done=lambda p: _retain(keep, p, mesh.rank, print_fn))
                saved = saver.wait() if stopped else path
            else:
                saved = save_checkpoint(engine, path, ck.dir, saved_meta)
                _retain(keep, saved, mesh.rank, print_fn)
        if stopped:
            break
    if saver is not None:
        saver.wait()                                # the last background save is committed everywhere
    progress.step = None
    if cfg.train.finish and not stopped:
        progress.set_phase("finish")
        finish = import_object(cfg.train.finish, "train.finish")
        full = engine.full_model()                     # collective: every rank takes part
        if mesh.rank == 0:
            finish(full, cfg)
    metrics.close()
    for d in detach:
        d()
    mesh.stats.recorder, progress.checker = None, None
    if checker is not None:
        torch.distributed.destroy_process_group(checker.pg)
    return {"losses": losses, "engine": engine, "dataset": dataset, "stopped": stopped,
            "saved": saved if stopped else None}


def _retain(keep: Retention, path: str, rank: int, print_fn) -> None:
    for gone in (keep.saved(path) if rank == 0 else []):
        print_fn(f"removed {gone} (train.checkpoint.keep_last={keep.keep_last})", flush=True)


def init_job(device, timeout_s: float):
    """init_distributed, keeping each torchrun attempt's keys apart: torchrun's agent shares one store
    across restarts, so a restarted worker could read a dead peer's gloo address from the attempt
    before (pytorch/pytorch#135712); each attempt gets its own key prefix."""
    if not dist.is_initialized() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dev = device or default_device()
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        td = datetime.timedelta(seconds=timeout_s)
        base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=td)
        store = dist.PrefixStore(f"p3d/attempt_{restart_attempt()}/default_pg", base)
        dist.init_process_group(backend_for(dev), store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=td)
    return init_distributed(device, timeout_s)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="launch.train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML config file")
    ap.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config mapped onto the YAML config")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    parent = die_with_parent()                     # no orphans: SIGKILL when the launcher dies (Linux)
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    report: list = []                              # the DeepSpeed mapping's lines: which JSON key set what
    try:
        cfg = load_config(args.config, args.overrides, deepspeed=args.deepspeed, report=report).validate(world)
        check_config(cfg)
    except ConfigError as e:
        e.args = (f"{e}{deepspeed_hint(str(e), report)}",)
        if rank == 0:
            print(f"config error: {e}", file=sys.stderr)
        failures.write_record(rank, "config", "config", f"config error: {e}", 2)
        return 2
    faulthandler.enable()
    stop = StopRequest(cfg.train.save_on_signal, cfg.train.timeout_s, rank) if cfg.train.save_on_signal else None
    progress = Progress(rank)
    progress.set_phase("setup (init process group)")
    if cfg.train.check_collectives:                # torch checks op and shape before each collective too
        os.environ.setdefault("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
        torch.distributed.set_debug_level_from_env()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    device = None if cfg.device == "auto" else torch.device(cfg.device)
    if device is not None and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    watchdog, owner = None, None

    def watchdog_exit(code):                       # the watchdog fired: record it, then exit
        failures.record_timeout(rank, progress, (watchdog.fired or "") if watchdog else "", code)
        os._exit(code)
    try:
        pg_timeout = group_timeout_s(cfg.train.timeout_s)
        set_default_group_timeout(pg_timeout)      # DeviceMesh's sub-groups too, not torch's 30 minutes
        device = init_job(device, pg_timeout)
        progress.set_phase("setup")
        watchdog = Watchdog(progress, cfg.train.timeout_s, exit_fn=watchdog_exit, parent_pid=parent).start()
        owner = lifecycle.own_checkpoint_dir(cfg, rank, progress)
        mesh = Mesh(pp=cfg.parallel.pp, dp=cfg.parallel.dp, tp=cfg.parallel.tp, device=device, ep=cfg.parallel.ep,
                    cp=cfg.parallel.cp)
        result = run(cfg, mesh, progress=progress, stop=stop)
        progress.set_phase("shutdown (final barrier)")
        lifecycle.quiesce(mesh)                    # every rank's communication finished (lifecycle: clean exit)
    except KeyboardInterrupt as e:
        failures.record_exception(e, rank, progress.where(), False, 130)
        terminate(130, f"rank {rank}: interrupted at {progress.where()}")
    except BaseException as e:                     # report once, exit now: never wait on dead peers
        if isinstance(e, ConfigError):             # raised by the run (a ZeRO-3 region ...): name the JSON key
            e.args = (f"{e}{deepspeed_hint(str(e), report)}",)
        failures.record_exception(e, rank, progress.where(), is_peer_failure(e), EXIT_FAILURE)
        text = failure_report(e, progress, default_store(), f"p3d/fail/{restart_attempt()}")
        if progress.checker is not None and "mismatch" in str(e).lower():     # DETAIL's report: add call sites
            try:
                text += "\n" + progress.checker.report_on_timeout()
            except Exception:
                pass
        terminate(EXIT_FAILURE, text)
    progress.active = False
    watchdog.stop()
    code = lifecycle.finish(cfg, rank, result, owner)
    lifecycle.release(result)                      # then no reference to a process group is left ...
    del result, mesh
    return lifecycle.shutdown(code, rank)          # ... and destroying them joins gloo's threads here


if __name__ == "__main__":
    sys.exit(main())
