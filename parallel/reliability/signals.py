"""Stopping cleanly: save on SIGTERM / SIGUSR1, and never outlive the launcher.

**Save on a signal** (``train.save_on_signal``, default ``[SIGTERM, SIGUSR1]``). :class:`StopRequest`
installs a handler that only notes the signal; the training loop calls :meth:`StopRequest.agree` at
every step boundary, an all-reduce(max) of the signal number over all ranks on the world group
(one int64, counted as control traffic under ``control:world``, not in any axis' counts). A rank that
got the signal thus tells the others, and every rank stops after the same step ``s``: the loop saves
``step_{s+1}`` (the step just finished is not lost), prints what it saved, and the process exits
``128 + signal number`` (143 for SIGTERM, 138 for SIGUSR1). A signal that arrives during step ``s``
costs the rest of step ``s`` plus the save; torchrun's agent forwards SIGTERM (and, as the launcher
configures it, the other save signals) to the workers and waits ``--shutdown-timeout`` seconds before
SIGKILL. The stop is bounded here too: a process that has not exited ``deadline_s`` (train.timeout_s)
after the signal — no step boundary came, e.g. torchrun's SIGTERM teardown after a peer failed while
this rank waits on it — exits 128 + n without saving, and so does one that gets the signal twice.

**Parent death**. torchrun starts each worker in a session of its own, so a launcher killed with
SIGKILL (the OOM killer, ``kill -9``) would leave the workers training. :func:`die_with_parent`
asks the Linux kernel to SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``;
the parent is torchrun's agent, which is the ``python -m launch`` process itself); elsewhere the
watchdog thread compares ``os.getppid()`` with the parent it started under
(:class:`parallel.reliability.watchdog.Watchdog`, ``parent_pid``).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from parallel import comm
from parallel.reliability.watchdog import terminate

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> int:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux; elsewhere nothing
    happens and the watchdog's check remains); returns the parent's pid at the time of the call. A
    parent already gone right after the call (re-parented) ends the process at once."""
    parent = os.getppid()
    if not sys.platform.startswith("linux"):
        return parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return parent
    except (OSError, AttributeError):
        return parent
    if os.getppid() != parent:               # it died between the two calls: the signal will not come
        os.kill(os.getpid(), sig)
    return parent


def _exit(code: int, text: str) -> None:
    terminate(code, text)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopRequest:
    """Notes the save signals this process receives; :meth:`agree` makes the ranks agree on it."""

    def __init__(self, names=("SIGTERM", "SIGUSR1"), deadline_s: float | None = None, rank: int = 0, exit_fn=None):
        self.signum, self.deadline_s, self.rank = 0, deadline_s, rank
        self.exit_fn = exit_fn or _exit
        self._previous = {}
        for n in names:
            sig = getattr(signal, n)
            self._previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum, frame):                   # in the main thread, between two bytecodes
        if self.signum:                               # the second one: stop now
            self.exit_fn(128 + signum, f"rank {self.rank}: {signal_name(signum)} again: stopping without saving")
            return
        self.signum = signum
        if self.deadline_s:
            t = threading.Timer(self.deadline_s, self.exit_fn, (128 + signum, (
                f"rank {self.rank}: {signal_name(signum)}: no step boundary within {self.deadline_s:g} s "
                f"(train.timeout_s): stopping without saving")))
            t.daemon = True
            t.start()

    def agree(self, mesh) -> int:
        """All ranks: the largest signal number any rank has noted (0: none); collective on the world."""
        if mesh.world_size == 1 or not dist.is_initialized():
            return self.signum
        t = torch.tensor([self.signum], dtype=torch.int64, device=mesh.device)
        comm.all_reduce(t, mesh.group("world").control(), op="max")
        return int(t.item())

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}
