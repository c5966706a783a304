"""ZeroOptimizer's write-back: the updated masters become the parameters every rank computes with — a cast
copy into the owned slice of each flat bucket, then (stages 1–2) the all-gather of the slices over dp
(Rajbhandari et al., arXiv 1910.02054, §5.1: stage 1–2 all-gather Ψ parameters after the update, the
(N−1)/N·Ψ·b bytes the planner counts); a stage-3 unit's shard is all there is, so nothing travels.
With ``overlap_param_gather`` the gathers stay in flight and each module's pre-hook waits for its own."""
from __future__ import annotations

import torch

from parallel.comm import all_gather_into

__all__ = ["WriteBackMixin"]


class WriteBackMixin:
    """Needs ``_all`` (buckets), ``stage``, ``group``, ``_opt_off``, ``_par_off``, ``overlap_param_gather``,
    ``_pending`` and ``wait_param_gather`` from :class:`parallel.zero.optimizer.ZeroOptimizer`."""

    @torch.no_grad()
    def _write_back(self) -> None:
        """Updated masters → the parameters every rank computes with (cast; all-gather stages 1–2)."""
        self.wait_param_gather()
        works = []
        fresh = self._opt_off is None or self._opt_off.materialized    # else step() wrote the params itself
        for b in reversed(self._all):                          # forward order: first needed, first sent
            if b.shard_param is not None:                      # stage 3 unit: the shard is all there is
                if fresh and self._par_off is not None:
                    self._par_off.update(b, b.master)
                elif fresh and b.shard_param is not b.master:
                    b.shard_param.copy_(b.master)
                continue
            own = b.flat_param[b.lo:b.hi]
            if fresh and own.data_ptr() != b.master.data_ptr():
                own.copy_(b.master)
            if self.stage > 0:
                works.append((b, all_gather_into(b.flat_param, own, b.group or self.group, async_op=True)))
        self._settle_gathers(works)

    def _settle_gathers(self, works: list) -> None:
        """The parameter all-gathers just posted: left in flight (``overlap_param_gather``: each module's
        pre-hook waits for its own buckets) or waited for here."""
        if self.overlap_param_gather:
            self._pending.update((b, w) for b, w in works if w is not None)
            return
        for _, w in works:
            if w is not None:
                w.wait()
