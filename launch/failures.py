"""Failure records: each worker says how it failed; the launcher names the first failing rank last.

**Worker side** (:func:`write_record`). Under torchrun every worker has an error file
(``$TORCHELASTIC_ERROR_FILE``, torch.distributed.elastic's reply file, one per local rank and
restart attempt). A failing rank writes it once, in torchrun's own JSON layout (so torchrun's
failure table shows the traceback) plus a ``"p3d"`` entry::

    {"rank": R, "where": "setup (build model)" | "step 3 (forward)" | ..., "kind": K,
     "reason": "<ExceptionType>: <first line of the message>", "time": unix seconds (float),
     "exit": the exit status it is about to return}

with kind ``error`` (this rank's own exception), ``peer`` (a collective broke because another
rank failed: :func:`parallel.watchdog.is_peer_failure`), ``timeout`` (its watchdog fired; ``time``
is when its phase began, the moment it stopped making progress), ``config``, ``interrupt`` or
``signal`` (it stopped on a signal of ``train.save_on_signal``, ``reason`` says what it saved).

**Launcher side** (:func:`summarize`). When torchrun returns a ``ChildFailedError`` its
``failures`` hold every local rank that exited non-zero: exit status (negative: the signal),
error file data. The first failing rank is chosen in this order of evidence:

1. a rank that died by a signal it did not get from torchrun's teardown (SIGKILL, SIGSEGV,
   SIGBUS, SIGABRT, ...) and left no record: it could not report, and everything else followed it;
2. ranks with an own record (error, timeout, config, interrupt): the earliest ``time``;
3. ranks that exited non-zero without a record (they failed before their handler was set up),
   and, when the whole job runs on this node, ranks stopped by SIGTERM/SIGINT/SIGHUP from outside
   (a peer failure here must then have a cause here);
4. ranks with a ``peer`` record (the real cause is on another node): the earliest;
5. anything else (ranks torchrun tore down with SIGTERM after the first failure).

A healthy rank torn down afterwards (SIGTERM, or a peer-failure line) is therefore never named
while a rank with a cause of its own exists. The summary's last line is
``launch: rank R failed at <where> (exit N): <reason>``.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import traceback

ENV = "TORCHELASTIC_ERROR_FILE"
OWN = ("error", "timeout", "config", "interrupt")
_TEARDOWN = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_lock = threading.Lock()
_written: set = set()                # error files this process has written (the first record wins)


def reason_of(exc: BaseException) -> str:
    """``<ExceptionType>: <first non-empty line of the message>`` (at most 400 characters); a first line that
    ends in ':' introduces a list, so the list's first item follows it and the count of the others."""
    lines = [s.strip() for s in str(exc).strip().splitlines() if s.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text += " " + lines[1].lstrip("-*• ")
        text += f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return f"{type(exc).__name__}: {text[:400]}"


def write_record(rank: int, where: str, kind: str, reason: str, exit_code: int, detail: str = "",
                 when: float | None = None, environ=os.environ) -> str | None:
    """Write this process's failure record into ``$TORCHELASTIC_ERROR_FILE`` (once per process:
    the first caller wins). Returns the path, or None when there is no error file (not under
    torchrun) or it cannot be written. Never raises: it runs on the way out of a failing process."""
    path = environ.get(ENV)
    if not path:
        return None
    with _lock:
        if path in _written:
            return None
        _written.add(path)
    t = time.time() if when is None else when
    data = {"message": {"message": reason, "extraInfo": {"py_callstack": detail or reason, "timestamp": str(int(t))}},
            "p3d": {"rank": rank, "where": where, "kind": kind, "reason": reason, "time": t, "exit": exit_code}}
    try:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
        return path
    except Exception:
        return None


def record_exception(exc: BaseException, rank: int, where: str, peer: bool, exit_code: int) -> str | None:
    kind = "peer" if peer else "interrupt" if isinstance(exc, KeyboardInterrupt) else "error"
    detail = "".join(traceback.format_exception(exc))
    return write_record(rank, where, kind, reason_of(exc), exit_code, detail)


def record_timeout(rank: int, progress, text: str, exit_code: int) -> str | None:
    """The watchdog's record: ``time`` is when the stalled phase began (``progress.since``), so of
    several ranks whose watchdogs fire, the one that stopped progressing first sorts first."""
    first = text.splitlines()[0] if text else "watchdog fired"
    reason = first.split(": ", 1)[1] if first.startswith(f"rank {rank}: ") else first
    reason = reason.split(f" at {progress.where()}")[0]
    return write_record(rank, progress.where(), "timeout", reason, exit_code, text,
                        when=time.time() - (time.monotonic() - progress.since))


# --- the launcher's side ---------------------------------------------------------------------------

def _record(failure) -> dict | None:
    data = getattr(failure, "error_file_data", None)
    rec = data.get("p3d") if isinstance(data, dict) else None
    return rec if isinstance(rec, dict) and "kind" in rec else None


def _signal(exitcode: int):
    try:
        return signal.Signals(-exitcode) if exitcode < 0 else None
    except ValueError:
        return None


def _status(exitcode: int) -> str:
    sig = _signal(exitcode)
    return f"{sig.name} (exit {exitcode})" if sig else f"exit {exitcode}"


def first_failure(failures: dict, single_node: bool = False) -> tuple[int, int]:
    """(global rank, evidence class 1..5 of the module docstring) of the first failing rank; with
    ``single_node`` a record-less SIGTERM/SIGINT/SIGHUP death outranks peer records (class 3): a
    peer failure then has its cause on this node, and no rank here has an own error."""
    def key(item):                              # (class, tie-break within class 3, time, rank)
        rank, f = item
        rec, sig, ts = _record(f), _signal(f.exitcode), float(getattr(f, "timestamp", 0))
        if rec is None and sig is not None and sig not in _TEARDOWN:
            return (1, 0, ts, rank)
        if rec is not None and rec["kind"] in OWN:
            return (2, 0, float(rec.get("time", 0)), rank)
        if rec is None and f.exitcode > 0:
            return (3, 0, ts, rank)
        if rec is None and sig is not None and single_node:
            return (3, 1, ts, rank)
        if rec is not None:
            return (4, 0, float(rec.get("time", 0)), rank)
        return (5, 0, ts, rank)
    best = min(failures.items(), key=key)
    return best[0], key(best)[0]


def summarize(failures: dict, single_node: bool = False) -> tuple[list[str], int]:
    """The launcher's closing lines for torchrun's ``ChildFailedError.failures`` ({global rank:
    ProcessFailure}) and its exit status: the first failing rank's status when it is 2 (config) or
    3 (watchdog), else 1. The last line names the first failing rank, where it was and why.
    ``single_node``: the whole job ran under this launcher (see :func:`first_failure`)."""
    recs = {r: _record(f) for r, f in failures.items()}
    stopped = sorted(r for r, rec in recs.items() if rec and rec["kind"] == "signal")
    if stopped and all(r in stopped or _signal(failures[r].exitcode) in _TEARDOWN for r in failures):
        rec = recs[stopped[0]]                  # stopped on a save signal (sent to a worker): no failure
        return [f"launch: the job stopped at {rec['where']}: {rec['reason']}"], failures[stopped[0]].exitcode
    rank, cls = first_failure(failures, single_node)
    f = failures[rank]
    rec = _record(f)
    others = []
    for r in sorted(failures):
        if r == rank:
            continue
        o, orec = failures[r], _record(failures[r])
        why = ("stopped: peer failure" if orec["kind"] == "peer" else f"also failed: {orec['reason'][:80]}") if orec \
            else "stopped by torchrun" if _signal(o.exitcode) in _TEARDOWN else "no record"
        others.append(f"rank {r}: {_status(o.exitcode)}, {why}")
    lines = [f"launch: job failed; other ranks: {'; '.join(others)}" if others else "launch: job failed"]
    status = f"exit {f.exitcode}" if _signal(f.exitcode) is None else _status(f.exitcode)
    if cls == 1:
        sig = _signal(f.exitcode)
        hint = " (the kernel's OOM killer or kill -9? see dmesg)" if sig == signal.SIGKILL else ""
        lines.append(f"launch: rank {rank} was killed by {sig.name} (exit {f.exitcode}){hint}; it left no error "
                     f"record; the other ranks stopped after it")
    elif rec is not None and rec["kind"] == "timeout":
        lines.append(f"launch: rank {rank} stopped making progress at {rec['where']} ({status}): {rec['reason']}")
    elif rec is not None and rec["kind"] == "peer":
        lines.append(f"launch: no rank on this node failed by itself; rank {rank} stopped first, at {rec['where']} "
                     f"({status}): {rec['reason']} (look for the cause in the other nodes' logs)")
    elif rec is not None:
        lines.append(f"launch: rank {rank} failed at {rec['where']} ({status}): {rec['reason']}")
    elif cls == 3 and f.exitcode < 0:
        lines.append(f"launch: rank {rank} was stopped by {_status(f.exitcode)} from outside the job (no error of its "
                     f"own); the other ranks stopped after it")
    elif cls == 3:
        lines.append(f"launch: rank {rank} exited with status {f.exitcode} before it could report where "
                     f"(an error outside the training loop: see its output above)")
    else:
        lines.append(f"launch: rank {rank} ended with {_status(f.exitcode)}, with no error record")
    code = f.exitcode if f.exitcode in (2, 3) else 1
    return lines, code
