"""Fault injection and phase hooks: make one rank fail at a chosen step and phase, on purpose.

A fault is ``{rank, step, phase, kind[, attempt]}``, from the config key ``train.fault`` or the
environment (``P3D_FAULT="rank=1,step=3,phase=backward,kind=kill"``; the config wins):

    phase    forward     when this rank's first stage forward of step ``step`` starts
             backward    when the first gradient of a stage output arrives in step ``step``
             optimizer   when ``engine.zero.step()`` is entered in step ``step``
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

:class:`StepHooks` is the instrument both this module and the watchdog use: module forward
hooks, output-tensor gradient hooks and wrappers around ``engine.zero.step`` / ``engine.save`` /
the pipeline executor's actions report the phase of the step as it runs, without editing the
engine.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import time

import torch
import torch.distributed.checkpoint as dcp

from parallel.config import Config
from parallel.config.faults import FaultSpec, parse_fault

ENV = "P3D_FAULT"


class InjectedFault(RuntimeError):
    """The exception a ``kind: raise`` fault throws."""


def fault_from(cfg: Config, environ=os.environ) -> FaultSpec | None:
    """The fault of this job: ``train.fault``, else ``$P3D_FAULT``, else None."""
    if cfg.train.fault is not None:
        return parse_fault(cfg.train.fault)
    if environ.get(ENV):
        return parse_fault(environ[ENV], ENV)
    return None


def restart_attempt(environ=os.environ) -> int:
    return int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


class Injector:
    """Fires ``spec`` once on its rank (and restart attempt) when the hooks report its phase."""

    def __init__(self, spec: FaultSpec, rank: int, attempt: int | None = None):
        self.spec, self.rank = spec, rank
        self.armed = rank == spec.rank and (restart_attempt() if attempt is None else attempt) == spec.attempt

    def wants(self, phase: str) -> bool:
        return self.armed and self.spec.phase == phase

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


def _map_first_tensor(out, fn):
    """Apply ``fn`` to the first floating tensor of a module output (tensor, tuple, dict/ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return fn(out) if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                items = list(out)
                items[i] = fn(v)
                return items if isinstance(out, list) else tuple(items)
        return out
    if isinstance(out, dict):
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                out[k] = fn(v)
                break
    return out


class StepHooks:
    """Report each phase of a step to ``progress`` (a :class:`parallel.reliability.watchdog.Progress`) and to an
    optional :class:`Injector`, from hooks around the engine's parts.

    forward    forward pre-hook of every stage module (one call per micro-batch and stage)
    backward   a gradient hook on each stage output (fires when its gradient arrives)
    optimizer  a wrapper around ``engine.zero.step``
    checkpoint a wrapper around ``engine.save``; the injector's checkpoint fault fires inside
               ``torch.distributed.checkpoint.save`` after this rank's shards are written
    pipeline   wrappers around the executor's F/B/I/W actions set ``progress.action``
    """

    def __init__(self, engine, progress, injector: Injector | None = None):
        self.engine, self.progress, self.injector = engine, progress, injector
        self._handles, self._pending = [], None
        for st in engine.stages:
            self._handles.append(st.register_forward_pre_hook(self._pre_forward))
            self._handles.append(st.register_forward_hook(self._post_forward))
        self._restore = []
        self._wrap(engine.zero, "step", self._optimizer)
        self._wrap(engine, "save", self._save)
        if engine.executor is not None:
            for kind in ("F", "B", "I", "W"):
                if hasattr(engine.executor, "_" + kind):
                    self._wrap(engine.executor, "_" + kind, self._action)

    def _wrap(self, obj, name, wrapper):
        real = getattr(obj, name)
        setattr(obj, name, lambda *a, **k: wrapper(real, *a, **k))
        self._restore.append((obj, name))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for obj, name in self._restore:
            obj.__dict__.pop(name, None)
        self._handles, self._restore = [], []

    def _notify(self, phase: str):
        self.progress.set_phase(phase)
        return self.injector(phase, self.progress.step) if self.injector is not None else None

    def _pre_forward(self, module, args):
        self._pending = self._notify("forward")

    def _post_forward(self, module, args, out):
        fn, self._pending = self._pending, None
        if fn is not None:
            out = _map_first_tensor(out, fn)
        if torch.is_grad_enabled():
            _map_first_tensor(out, self._watch_grad)
        return out

    def _watch_grad(self, t):
        if t.requires_grad:
            t.register_hook(self._on_grad)
        return t

    def _on_grad(self, g):
        fn = self._notify("backward")
        return fn(g) if fn is not None else None

    def _optimizer(self, real, *a, **k):
        self._notify("optimizer")
        return real(*a, **k)

    def _save(self, real, *a, **k):
        self.progress.set_phase("checkpoint")
        if self.injector is None or not self.injector.wants("checkpoint"):
            return real(*a, **k)
        dcp_save = dcp.save

        def save_then_fault(*a2, **k2):         # this process only, for the duration of this save
            out = dcp_save(*a2, **k2)
            self.injector("checkpoint", self.progress.step)
            return out
        dcp.save = save_then_fault
        try:
            return real(*a, **k)
        finally:
            dcp.save = dcp_save

    def _action(self, real, a, *rest):
        self.progress.set_action(f"{a.kind} micro-batch {a.microbatch} stage {a.stage}")
        return real(a, *rest)
