"""A worker's start and end around the training loop: who owns the checkpoint directory, and how
a job stopped by a signal ends.

* :func:`own_checkpoint_dir`: rank 0 makes the job the owner of ``train.checkpoint.dir``
  (:mod:`parallel.checkpoint.owner`) before any rank builds the model; another live job's directory
  is refused (``CheckpointDirOwned`` naming that job), a stale owner file is reported and taken over.
* :func:`finish`: after the loop, rank 0 releases the directory; when the ranks stopped on a signal
  of ``train.save_on_signal`` (:mod:`parallel.reliability.signals`) every rank writes a ``signal``
  failure record (:mod:`launch.failures`) saying what was saved, rank 0 prints it, and the exit
  status is 128 + the signal number (143 for SIGTERM).
"""
from __future__ import annotations

import os
import sys

from launch import failures
from parallel.checkpoint import owner as ownership
from parallel.reliability.signals import signal_name


def own_checkpoint_dir(cfg, rank: int, progress, print_fn=print) -> dict | None:
    """Rank 0, when train.checkpoint.dir is set: the owner record written (None elsewhere)."""
    root = cfg.train.checkpoint.dir
    if rank != 0 or not root:
        return None
    progress.set_phase("setup (checkpoint directory owner)")
    return ownership.acquire(root, report=lambda line: print_fn(f"rank 0: {line}", file=sys.stderr, flush=True))


def stop_message(signum: int, step: int, saved: str | None) -> str:
    name = signal_name(signum)
    if saved:
        return (f"saved {os.path.basename(saved)} ({saved}, after step {step - 1}) on {name}; resume with "
                f"train.resume=true")
    return f"stopped after step {step - 1} on {name}; nothing saved: train.checkpoint.dir is not set"


def finish(cfg, rank: int, result: dict, owner: dict | None, print_fn=print) -> int:
    """Release the checkpoint directory; the exit status: 0, or 128 + the signal the ranks stopped on."""
    if owner is not None:
        ownership.release(cfg.train.checkpoint.dir, owner)
    signum = result.get("stopped") or 0
    if not signum:
        return 0
    step = result["engine"].step_count
    msg = stop_message(signum, step, result.get("saved"))
    if rank == 0:
        print_fn(f"rank 0: {msg}", file=sys.stderr, flush=True)
    failures.write_record(rank, f"step {step - 1} (stopped)", "signal", msg, 128 + signum)
    return 128 + signum
