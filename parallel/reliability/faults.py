"""Fault injection: make one rank fail at a chosen step and phase, on purpose.

A fault is ``{rank, step, phase, kind[, attempt]}``, from the config key ``train.fault`` or the
environment (``P3D_FAULT="rank=1,step=3,phase=backward,kind=kill"``; the config wins). Both are
honoured only under the test switch ``P3D_ENABLE_FAULTS=1``: without it ``train.fault`` is a config
error and ``$P3D_FAULT`` is ignored with a one-line warning, so no production run fails on purpose.

    phase    forward     when this rank's first stage forward of step ``step`` starts
             backward    when the first gradient of a stage output arrives in step ``step``
             optimizer   when the update of step ``step`` begins
             checkpoint  during the checkpoint write after step ``step``: after this rank has written
                         its shards into ``.tmp-step_N``, before the folder is committed
    kind     raise       RuntimeError (InjectedFault)      oom     torch.OutOfMemoryError
             kill        SIGKILL to this process           hang    sleep forever (the watchdog's case)
             nan         forward: the stage output becomes NaN; backward: the output's gradient does
             enospc      OSError(ENOSPC) "no space left on device" (checkpoint phase only)
    attempt  the torchrun restart (``TORCHELASTIC_RESTART_COUNT``) it fires in; default 0, so a
             restarted job does not fail again at the same step

``step`` is the 0-based index of the global batch (the ``step`` of the metrics file). Each fault
fires once per process and announces itself on stderr first, with the wall-clock time, so tests
can bound the time from the fault to the last process exit.

:meth:`Injector.attach` hooks the injector to the engine's phase callbacks
(:meth:`parallel.engine.Engine.add_callback`; the checkpoint fault fires at ``checkpoint_written``,
the engine's write hook on the save), the same extension point the watchdog's
:meth:`parallel.reliability.watchdog.Progress.follow` uses; nothing of the engine is replaced.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import time

import torch

from parallel.config import Config
from parallel.config.faults import ENABLE_ENV, FaultSpec, faults_enabled, parse_fault

ENV = "P3D_FAULT"


class InjectedFault(RuntimeError):
    """The exception a ``kind: raise`` fault throws."""


def fault_from(cfg: Config, environ=os.environ, warn=None) -> FaultSpec | None:
    """The fault of this job: ``train.fault``, else ``$P3D_FAULT``, else None; None (and ``warn`` called
    with one line, when given) without the test switch ``$P3D_ENABLE_FAULTS=1``. ``train.fault`` got
    that far only with the switch: Config.validate refuses it otherwise."""
    if cfg.train.fault is not None:
        return parse_fault(cfg.train.fault)
    if environ.get(ENV):
        if not faults_enabled(environ):
            if warn is not None:
                warn(f"warning: ${ENV}={environ[ENV]!r} is ignored: fault injection is for tests and needs "
                     f"{ENABLE_ENV}=1; unset {ENV}")
            return None
        return parse_fault(environ[ENV], ENV)
    return None


def restart_attempt(environ=os.environ) -> int:
    return int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


class Injector:
    """Fires ``spec`` once on its rank (and restart attempt) when the hooks report its phase."""

    def __init__(self, spec: FaultSpec, rank: int, attempt: int | None = None):
        self.spec, self.rank = spec, rank
        self.armed = rank == spec.rank and (restart_attempt() if attempt is None else attempt) == spec.attempt

    def __call__(self, phase: str, step):
        """Called at ``phase`` of ``step``; returns a tensor transform for kind=nan, else None."""
        s = self.spec
        if not (self.armed and phase == s.phase and step == s.step):
            return None
        self.armed = False
        msg = f"injected fault: {s.describe()}"
        print(f"rank {self.rank}: {msg} [unix time {time.time():.3f}]", file=sys.stderr, flush=True)
        if s.kind == "raise":
            raise InjectedFault(msg)
        if s.kind == "oom":
            raise torch.OutOfMemoryError(msg)
        if s.kind == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device ({msg})")
        if s.kind == "kill":
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if s.kind == "hang":
            while True:
                time.sleep(3600)
        return lambda t: t * float("nan")                     # kind == "nan"

    def attach(self, engine):
        """Fire from ``engine``'s phase callbacks; returns a function that detaches it."""
        return engine.add_callback(self._on_phase)

    def _on_phase(self, phase: str, step: int):
        if phase == "checkpoint":                             # the save begins: wait for its shards
            return None
        return self("checkpoint" if phase == "checkpoint_written" else phase, step)
