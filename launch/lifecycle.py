"""A worker's start and end around the training loop: who owns the checkpoint directory, and how
a job stopped by a signal ends.

* :func:`own_checkpoint_dir`: rank 0 makes the job the owner of ``train.checkpoint.dir``
  (:mod:`parallel.checkpoint.owner`) before any rank builds the model; another live job's directory
  is refused (``CheckpointDirOwned`` naming that job), a stale owner file is reported and taken over.
* :func:`finish`: after the loop, rank 0 releases the directory; when the ranks stopped on a signal
  of ``train.save_on_signal`` (:mod:`parallel.reliability.signals`) every rank writes a ``signal``
  failure record (:mod:`launch.failures`) saying what was saved, rank 0 prints it, and the exit
  status is 128 + the signal number (143 for SIGTERM).
* :func:`quiesce` and :func:`shutdown`: a clean exit (below).

**Clean exit.** A ProcessGroupGloo owns worker threads (``pt_gloo_runloop``) and its device a socket
loop (``gloo_tcp_loop``); only its destructor joins them, and ``destroy_process_group`` merely
unregisters the groups: while any Python object still holds a group, its threads stay alive into
interpreter finalization and C++ static destruction, where a peer's exit (closing its sockets) or a
late work release wakes them to touch state being torn down: ``terminate called without an active
exception`` (SIGABRT, exit −6) or SIGSEGV, after every step was trained (torch PR 179291 describes the
same race). The engine's parameter gradient hooks held its groups in exactly such a place (a cycle
through C++ autograd metadata the garbage collector cannot follow), so every job exited with three
live groups. The order here: a barrier on the world group while the watchdog still guards it (no rank
tears down while a peer still communicates), then the engine's hooks removed and every reference
dropped, then ``destroy_process_group`` and a collection, which destroy the groups and join their
threads while the interpreter is whole. Should a gloo thread still be alive after that (a group held
elsewhere, e.g. by the user's model), the process flushes and leaves with ``os._exit(code)``, skipping
the finalization that would race with it.
"""
from __future__ import annotations

import gc
import os
import sys

import torch.distributed as dist

from launch import failures
from parallel.checkpoint import owner as ownership
from parallel.mesh import release_meshes
from parallel.reliability.signals import signal_name
from parallel.reliability.watchdog import terminate

GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


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


def quiesce(mesh) -> None:
    """Every rank has finished all its communication: a barrier on the world group (gloo's barrier
    also waits for the works issued before it)."""
    if mesh.world_size > 1 and dist.is_initialized():
        dist.barrier(group=mesh.group("world").pg)


def gloo_threads() -> int | None:
    """The number of gloo threads alive in this process (Linux: /proc/self/task names; else None)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    n = 0
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                n += f.read().strip().startswith(GLOO_THREADS)
        except OSError:
            pass
    return n


def release(result: dict | None) -> None:
    """Remove the engine's hooks and empty ``result`` (the caller then drops its own references)."""
    if result:
        engine = result.get("engine")
        if engine is not None:
            engine.close()
        result.clear()


def shutdown(code: int, rank: int, print_fn=print, exit_fn=os._exit) -> int:
    """After :func:`release` and the caller's ``del`` of its mesh: collect, destroy every process group,
    collect again; returns ``code``, or leaves the process with it (``exit_fn``) when gloo threads survive."""
    release_meshes()                               # the cached mesh groups (parallel/mesh.py)
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
    left = gloo_threads()
    if left:
        if rank == 0 or os.environ.get("P3D_DEBUG_EXIT") == "1":       # once per job, not once per rank
            print_fn(f"rank {rank}: {left} gloo threads still alive after destroy_process_group (a process group "
                     f"is still referenced); exiting {code} without interpreter finalization", file=sys.stderr,
                     flush=True)
        terminate(code, "", exit_fn)
    return code
