"""The module order of a forward, recorded once and replayed: what makes prefetching possible.

Stage 3 (:class:`parallel.zero.stage3.Stage3Params`) and streamed inference
(:class:`parallel.zero.inference.StreamedInference`) both learn the order in which hooked modules
run from a trace of the first forward (as DeepSpeed and FSDP record it): the root's pre-hook calls
:meth:`TracedOrder.start`, each hooked module's pre-hook :meth:`TracedOrder.visit`, the root's
post-hook :meth:`TracedOrder.finish`. In later forwards ``visit`` returns the module's position
i in the trace, and :meth:`TracedOrder.ahead` lists the modules at i + k·step (k = 1..depth;
step = −1 walks backward), whose units a caller reads or gathers ahead of use. A forward that
departs from the trace (another branch taken) gets :data:`OFF`, so nothing is fetched ahead.
"""
from __future__ import annotations

__all__ = ["OFF", "TracedOrder"]

OFF = -2          # off the trace; OFF ± 1 is still outside it, so a prefetch at pos ± 1 does nothing


class TracedOrder:
    """The order of hooked modules in the first forward, and positions in later ones."""

    def __init__(self):
        self.modules: list = []
        self.tracing = True
        self._cursor = 0

    def __len__(self) -> int:
        return len(self.modules)

    def start(self) -> None:
        """A forward begins (the root's pre-hook)."""
        self._cursor = 0

    def finish(self) -> None:
        """A forward ended (the root's post-hook): the trace, if still being recorded, is complete."""
        self.tracing = False

    def visit(self, m) -> int:
        """Module ``m`` is about to run: its position in the trace, or :data:`OFF` when this forward
        departs from it. While tracing, ``m`` is appended and its new position returned."""
        pos = self._cursor
        self._cursor += 1
        if self.tracing:
            self.modules.append(m)
        elif pos >= len(self.modules) or self.modules[pos] is not m:
            return OFF
        return pos

    def ahead(self, pos: int, depth: int, step: int = 1) -> list:
        """The traced modules at ``pos + k·step`` for k = 1..depth that exist (none while tracing or
        when ``pos`` itself is outside the trace, e.g. :data:`OFF`)."""
        n = len(self.modules)
        if self.tracing or not 0 <= pos < n:
            return []
        return [self.modules[q] for q in (pos + k * step for k in range(1, depth + 1)) if 0 <= q < n]
