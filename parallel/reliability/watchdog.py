"""Never hang: a per-rank watchdog, bounded exits and one clear report per failure.

Every rank keeps a :class:`Progress` — step, phase (setup, data, forward, backward, optimizer,
checkpoint, metrics, finish), pipeline action and last collective — updated by the training loop,
the engine's phase and action callbacks (:meth:`Progress.follow`) and the comm recorder of
:mod:`parallel.reliability.fingerprint`.
The :class:`Watchdog` thread fires when one phase has made no progress for ``train.timeout_s``:
it prints the rank's state and the main thread's Python stack, asks every rank for its collective
fingerprints (through the rendezvous store, which still works while the process groups are
blocked) when ``train.check_collectives`` is on, and exits the process with :data:`EXIT_TIMEOUT`.

Failures end the job everywhere within a bound (the contract of ``launch/train.py``):

* the rank whose own code raised prints ``rank R failed at step S (phase):`` and its traceback —
  once per job: when several ranks raise the same error, the first to claim the store key
  ``p3d/fail`` prints the traceback and the rest print one line;
* a rank whose collective then breaks (gloo/NCCL: connection reset, timeout) prints one line,
  ``rank R stopping at step S (phase): peer failure (...)``;
* each exits at once with ``os._exit`` after flushing (no rank waits in destroy_process_group);
  under torchrun the agent then tears down or restarts the job.

Process groups time out too (:func:`group_timeout_s`, a little after the watchdog, so its report
comes first): the backstop when the watchdog cannot run.
"""
from __future__ import annotations

import datetime
import os
import re
import sys
import threading
import time
import traceback

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

EXIT_FAILURE = 1
EXIT_TIMEOUT = 3
_EXIT_LOCK = threading.Lock()
_PEER = re.compile(r"Connection (reset|closed) by peer|Connection refused|Broken pipe|Timed out|timed out|"
                   r"[Tt]imeout|pair\.cc|ProcessGroupGloo|NCCL (error|communicator)|ncclRemoteError|"
                   r"Socket|ECONNRESET|EPIPE")


def group_timeout_s(timeout_s: float) -> float:
    """Process-group timeout for a watchdog timeout: later than the watchdog, so it reports first."""
    return timeout_s + min(30.0, max(5.0, timeout_s / 2))


def set_default_group_timeout(seconds: float) -> None:
    """Make process groups created from now on (torch's DeviceMesh sub-groups included, which
    otherwise get torch's 30-minute default) time out after ``seconds``."""
    c10d.default_pg_timeout = datetime.timedelta(seconds=seconds)


class Progress:
    """What this rank is doing: read by the watchdog and by failure messages."""

    def __init__(self, rank: int):
        self.rank = rank
        self.step: int | None = None
        self.phase = "setup"
        self.action: str | None = None          # pipeline action (F/B/I/W micro-batch, stage)
        self.last_call: str | None = None       # last collective / p2p call issued (Recorder)
        self.since = time.monotonic()           # start of the current phase
        self.active = True                      # the watchdog only times active phases
        self.checker = None                     # fingerprint.Checker, for the timeout report

    def set_phase(self, phase: str) -> None:
        self.phase, self.since = phase, time.monotonic()

    def begin_step(self, step: int) -> None:
        self.step, self.action = step, None
        self.set_phase("data")

    def set_action(self, action: str) -> None:
        self.action, self.since = action, time.monotonic()

    def follow(self, engine):
        """Track ``engine``'s phases (its phase callbacks) and pipeline actions (its executor's action
        callback); returns a function that stops following."""
        removers = [engine.add_callback(self._on_phase)]
        if engine.executor is not None:
            removers.append(engine.executor.add_action_callback(self._on_action))

        def stop():
            for r in removers:
                r()
        return stop

    def _on_phase(self, phase: str, step: int) -> None:
        if phase != "checkpoint_written":                  # still the checkpoint phase
            self.set_phase(phase)

    def _on_action(self, a) -> None:
        self.set_action(f"{a.kind} micro-batch {a.microbatch} stage {a.stage}")

    def where(self) -> str:
        return f"step {self.step} ({self.phase})" if self.step is not None else self.phase

    def details(self) -> list[str]:
        out = []
        if self.action:
            out.append(f"  pipeline action: {self.action}")
        out.append(f"  last collective: {self.last_call or '(none recorded)'}")
        return out


def main_stack() -> str:
    """The main thread's Python stack, most recent call last."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    return "".join(traceback.format_stack(frame)) if frame is not None else "  (main thread not found)\n"


def terminate(code: int, text: str = "", exit_fn=os._exit) -> None:
    """Print ``text`` to stderr, flush, exit the process with ``code`` — once per process: a second
    caller (the main thread's failure handler while the watchdog reports) waits here until the
    first has exited the process."""
    _EXIT_LOCK.acquire()
    try:
        if text:
            sys.stderr.write(text.rstrip("\n") + "\n")
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
    finally:
        exit_fn(code)
        _EXIT_LOCK.release()                  # reached only when exit_fn returns (tests)


def default_store():
    """The job's rendezvous store (None when there is none)."""
    try:
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:
        return None


def claim(store, key: str) -> bool:
    """True for the first process to claim ``key`` in the store (or when there is no store)."""
    if store is None:
        return True
    try:
        return int(store.add(key, 1)) == 1
    except Exception:
        return True


def is_peer_failure(exc: BaseException) -> bool:
    """A distributed error that follows another rank's failure or hang (its connection closed, a
    collective timed out), as opposed to this rank's own bug or bad input."""
    text = str(exc)
    if "mismatch" in text.lower():                 # TORCH_DISTRIBUTED_DEBUG=DETAIL's report: a real error
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return type(exc) is RuntimeError and bool(_PEER.search(text))      # gloo raises plain RuntimeErrors


def failure_report(exc: BaseException, progress: Progress, store=None, key: str = "p3d/fail") -> str:
    """The text a failing rank prints (see the module docstring)."""
    r, where = progress.rank, progress.where()
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    if is_peer_failure(exc):
        return f"rank {r} stopping at {where}: peer failure or hang elsewhere ({type(exc).__name__}: {first_line})"
    if claim(store, key):
        return f"rank {r} failed at {where}:\n" + "".join(traceback.format_exception(exc))
    return (f"rank {r} failed at {where}: {type(exc).__name__}: {first_line} "
            f"(the same failure's traceback is printed by another rank)")


class Watchdog:
    """A daemon thread that ends the process when ``progress`` stays in one phase longer than
    ``timeout_s``, or when its parent is no longer ``parent_pid`` (re-parented: the launcher died;
    the fallback of :func:`parallel.reliability.signals.die_with_parent`); on the way it answers
    peers' fingerprint requests (``progress.checker``)."""

    def __init__(self, progress: Progress, timeout_s: float, poll_s: float | None = None, exit_fn=os._exit,
                 parent_pid: int | None = None):
        self.progress, self.timeout_s, self.exit_fn = progress, float(timeout_s), exit_fn
        self.parent_pid = parent_pid            # end the process when its parent (the launcher) is gone
        self.poll_s = poll_s if poll_s is not None else min(1.0, max(0.05, self.timeout_s / 20))
        self.fired: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="p3d-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            chk = self.progress.checker
            if chk is not None:
                try:
                    chk.serve()
                except Exception:
                    pass
            p = self.progress
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self.fired = (f"rank {p.rank}: the launcher (pid {self.parent_pid}) is gone: stopping at {p.where()} "
                              f"(a worker never outlives its launcher)")
                terminate(EXIT_FAILURE, self.fired, self.exit_fn)
                return
            if p.active and time.monotonic() - p.since > self.timeout_s:
                self.fire()
                return

    def fire(self) -> None:
        p = self.progress
        lines = [f"rank {p.rank}: watchdog: no progress for {time.monotonic() - p.since:.1f} s "
                 f"(train.timeout_s={self.timeout_s:g}) at {p.where()}", *p.details(),
                 "  stack of the main thread (most recent call last):", main_stack().rstrip("\n")]
        if p.checker is not None:
            try:
                lines.append(p.checker.report_on_timeout())
            except Exception as e:                    # the report is best effort; the exit is not
                lines.append(f"  (collective fingerprints unavailable: {type(e).__name__}: {e})")
        self.fired = "\n".join(lines)
        terminate(EXIT_TIMEOUT, self.fired, self.exit_fn)
