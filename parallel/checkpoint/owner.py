"""One live job per checkpoint directory: an owner file that rank 0 creates atomically.

``<train.checkpoint.dir>/OWNER.json`` holds ``{"job", "host", "launcher_pid", "launcher_start",
"pid", "time"}``: the job id (``$TORCHELASTIC_RUN_ID``, the same for every torchrun restart of a
job), the host name, the pid of the worker's parent (torchrun's agent: the ``python -m launch``
process itself), that process's start time (``/proc/<pid>/stat`` field 22, so a reused pid is not
mistaken for the owner), rank 0's pid and the unix time it was written.

:func:`acquire` creates it with ``O_CREAT | O_EXCL`` (of two jobs racing, exactly one wins). An
existing file is

* this job's own (same job id, host and launcher: a torchrun restart): taken over, silently;
* another live job's (its launcher pid is alive on this host with the same start time, or the file
  names another host, whose processes cannot be checked from here): :class:`CheckpointDirOwned`
  naming that job, its host, pid and start time, and the fix;
* stale (its launcher is gone from this host): reported through ``report`` and taken over — the
  stale file is renamed aside first, so two jobs taking it over at once still end with one owner.

:func:`release` removes the file at a clean exit (only while it is still ours). A job that dies
leaves it behind; the next job finds it stale.
"""
from __future__ import annotations

import json
import os
import socket
import time

NAME = "OWNER.json"


class CheckpointDirOwned(RuntimeError):
    """Another live job owns the checkpoint directory."""


def _start_ticks(pid: int):
    """The process's start time since boot in clock ticks (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[19])      # field 3 is the state, 22 the start time
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int, start=None) -> bool:
    """Whether ``pid`` runs on this host (not a zombie), and is the process that started at ``start``."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                             # someone else's process: it exists
    if os.path.exists(f"/proc/{pid}/stat"):
        ticks = _start_ticks(pid)
        return ticks is not None and (start is None or ticks == start)
    return True


def identity(environ=os.environ) -> dict:
    ppid = os.getppid()
    return {"job": environ.get("TORCHELASTIC_RUN_ID") or f"launcher-{ppid}", "host": socket.gethostname(),
            "launcher_pid": ppid, "launcher_start": _start_ticks(ppid), "pid": os.getpid(), "time": time.time()}


def _read(path: str):
    for _ in range(20):                                  # a file being written: its writer is a moment away
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


def describe(rec: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("time", 0)))
    return (f"job {rec.get('job', '?')} on host {rec.get('host', '?')} (launcher pid {rec.get('launcher_pid', '?')}, "
            f"started {when})")


def _same_job(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("job", "host", "launcher_pid"))


def owner_elsewhere(root: str) -> str | None:
    """The launcher's pre-flight check: a message when ``root`` is owned by a live job on this host or by one on
    another host (then its processes cannot be checked); None when free or the owner file is stale."""
    path = os.path.join(root, NAME)
    rec = _read(path) if os.path.exists(path) else None
    if not rec:
        return None
    if rec.get("host") == socket.gethostname() and not alive(rec.get("launcher_pid", -1), rec.get("launcher_start")):
        return None
    return (f"train.checkpoint.dir={root!r} is in use by {describe(rec)} ({path}): wait for that job to end, stop "
            f"it, or give this job another train.checkpoint.dir. If that job is gone, delete {path}")


def acquire(root: str, report=None, environ=os.environ) -> dict:
    """Make this job the owner of ``root`` (created if missing); returns the record written."""
    os.makedirs(root, exist_ok=True)
    path, me = os.path.join(root, NAME), identity(environ)
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            rec = _read(path)
            if rec is None:
                continue                                 # removed meanwhile: try again
            if _same_job(rec, me):                       # a torchrun restart of this job
                _write(path, me)
                return me
            if rec.get("host") != me["host"] or alive(rec.get("launcher_pid", -1), rec.get("launcher_start")):
                other = "another host: its processes cannot be checked from here" if rec.get("host") != me["host"] \
                    else "its launcher is still running"
                raise CheckpointDirOwned(
                    f"train.checkpoint.dir={root!r} is in use by {describe(rec)}; {other} ({path}). Two jobs writing "
                    f"one checkpoint directory overwrite each other's checkpoints: wait for that job to end, stop it, "
                    f"or give this job another train.checkpoint.dir. If that job is gone, delete {path}") from None
            aside = f"{path}.stale-{me['pid']}"
            try:
                os.rename(path, aside)                   # atomic: of two jobs taking it over, one renames it
            except FileNotFoundError:
                continue
            if _read(aside) != rec:                      # we moved a fresh owner's file: put it back
                try:
                    os.link(aside, path)
                except OSError:
                    pass
                os.remove(aside)
                continue
            os.remove(aside)
            if report is not None:
                report(f"train.checkpoint.dir={root!r}: taking over from a stale owner file left by {describe(rec)}, "
                       f"which is no longer running on this host")
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return me
    raise CheckpointDirOwned(f"train.checkpoint.dir={root!r}: could not create {path} (other jobs keep replacing "
                             f"it): make sure only one job uses this directory")


def _write(path: str, rec: dict) -> None:
    tmp = f"{path}.{rec['pid']}.tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, path)


def release(root: str, rec: dict) -> bool:
    """Remove the owner file of ``root`` if it is still ``rec``'s; True when removed."""
    path = os.path.join(root, NAME)
    cur = _read(path)
    if cur and _same_job(cur, rec) and cur.get("pid") == rec.get("pid"):
        try:
            os.remove(path)
            return True
        except FileNotFoundError:
            pass
    return False
