"""The fault-injection spec of ``train.fault``: parsed and checked with the rest of the config.

Injection itself is :mod:`parallel.reliability.faults`; this holds only what validation needs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from parallel.config.errors import ConfigError

if TYPE_CHECKING:
    from parallel.config.schema import Config

__all__ = ["PHASES", "KINDS", "ENABLE_ENV", "FaultSpec", "faults_enabled", "parse_fault", "check_fault"]

PHASES = ("forward", "backward", "optimizer", "checkpoint")
KINDS = ("raise", "kill", "hang", "nan", "oom", "enospc")
ENABLE_ENV = "P3D_ENABLE_FAULTS"          # the test switch: faults are honoured only when it is "1"


def faults_enabled(environ=None) -> bool:
    """True when ``$P3D_ENABLE_FAULTS`` is ``1`` (the test suite sets it; a production run never should)."""
    return (os.environ if environ is None else environ).get(ENABLE_ENV) == "1"


@dataclass(frozen=True)
class FaultSpec:
    rank: int
    step: int
    phase: str
    kind: str
    attempt: int = 0

    def describe(self) -> str:
        return f"{self.kind} on rank {self.rank} at step {self.step} ({self.phase})"


def parse_fault(value, key: str = "train.fault") -> FaultSpec:
    """A FaultSpec from a mapping or a ``"rank=1,step=3,phase=forward,kind=raise"`` string."""
    if isinstance(value, str):
        d = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            if "=" not in part:
                raise ConfigError(f"{key}={value!r}: {part!r} is not name=value; write e.g. "
                                  f"rank=1,step=3,phase=forward,kind=raise")
            k, v = part.split("=", 1)
            d[k.strip()] = v.strip()
        value = d
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r} must be a mapping {{rank, step, phase, kind[, attempt]}}")
    fields = ("rank", "step", "phase", "kind", "attempt")
    unknown = sorted(set(value) - set(fields))
    missing = [f for f in fields[:4] if f not in value]
    if unknown or missing:
        raise ConfigError(f"{key}: " + (f"unknown fields {unknown}; " if unknown else "")
                          + (f"missing {missing}; " if missing else "") + "give {rank, step, phase, kind[, attempt]}")
    out = {}
    for f in ("rank", "step", "attempt"):
        if f in value:
            try:
                out[f] = int(value[f])
            except (TypeError, ValueError):
                raise ConfigError(f"{key}.{f}={value[f]!r} must be an integer") from None
            if out[f] < 0:
                raise ConfigError(f"{key}.{f}={out[f]} must be 0 or more")
    phase, kind = str(value["phase"]), str(value["kind"])
    if phase not in PHASES:
        raise ConfigError(f"{key}.phase={phase!r} is not one of {list(PHASES)}")
    if kind not in KINDS:
        raise ConfigError(f"{key}.kind={kind!r} is not one of {list(KINDS)}")
    if kind == "nan" and phase not in ("forward", "backward"):
        raise ConfigError(f"{key}: kind=nan applies to phase forward or backward (got {phase}); use kind=raise "
                          f"for other phases")
    if kind == "enospc" and phase != "checkpoint":
        raise ConfigError(f"{key}: kind=enospc simulates a full disk during a save: use phase=checkpoint")
    return FaultSpec(out["rank"], out["step"], phase, kind, out.get("attempt", 0))


def check_fault(cfg: Config, world_size: int | None) -> FaultSpec:
    """Validate ``train.fault`` against the rest of the config (called from Config.validate); a fault
    is an error unless the test switch ``$P3D_ENABLE_FAULTS=1`` is set."""
    if not faults_enabled():
        raise ConfigError(f"train.fault={cfg.train.fault!r} injects a failure on purpose and is honoured only in "
                          f"tests, with {ENABLE_ENV}=1 in the environment: remove train.fault from this config "
                          f"(or set {ENABLE_ENV}=1 to test failure handling)")
    spec = parse_fault(cfg.train.fault)
    world = world_size if world_size is not None else cfg.world_size
    if spec.rank >= world:
        raise ConfigError(f"train.fault.rank={spec.rank} does not exist: the job has {world} ranks (0..{world - 1})")
    if spec.step >= cfg.train.steps:
        raise ConfigError(f"train.fault.step={spec.step} is never reached: train.steps={cfg.train.steps} "
                          f"(steps are 0..{cfg.train.steps - 1})")
    every = cfg.train.checkpoint.every
    if spec.phase == "checkpoint" and (not every or (spec.step + 1) % every):
        raise ConfigError(f"train.fault: phase=checkpoint at step {spec.step} never fires: no checkpoint is written "
                          f"after step {spec.step} (train.checkpoint.every={every}); pick a step s with "
                          f"(s + 1) a multiple of train.checkpoint.every")
    return spec
