"""The vocabulary of pipeline schedules: a compute action (F, B, I or W of micro-batch i on stage s)
and the error a malformed schedule raises (:mod:`parallel.pipeline.schedules` builds lists of them)."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KINDS", "Action", "ScheduleError"]

KINDS = ("F", "B", "I", "W")


class ScheduleError(ValueError):
    """A schedule is malformed or cannot run; the message carries the step × rank grid."""


@dataclass(frozen=True, order=True)
class Action:
    """One compute action: ``kind`` ∈ {F, B, I, W} of ``microbatch`` on global ``stage``."""

    kind: str
    microbatch: int
    stage: int

    def label(self, v: int = 1) -> str:
        """Grid label: ``F3`` (v = 1) or ``F3.1`` (micro-batch 3 on stage 1, v > 1)."""
        return f"{self.kind}{self.microbatch}" + (f".{self.stage}" if v > 1 else "")
