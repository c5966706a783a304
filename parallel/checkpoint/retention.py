"""Which checkpoints a job may delete: ``train.checkpoint.keep_last``.

A checkpoint belongs to this job when this process committed it, or when its meta.json carries this
job's id (``$P3D_JOB_ID``, else torchrun's ``$TORCHELASTIC_RUN_ID`` when it is not the default
"none"; the same in every restart of one job, so a restarted worker prunes what the attempt before
it wrote). After each successful save, of the checkpoints of this job all but the newest
``keep_last`` are removed; another job's checkpoints (the one this job resumed from, say) are
never touched. ``keep_last: null`` (the default) keeps all. A removal first renames the folder to
``.del-step_N``, so a crash half-way leaves nothing that looks like a damaged checkpoint.
"""
from __future__ import annotations

import os
import shutil

from parallel.checkpoint.sharded import read_meta, step_folders


def job_id() -> str | None:
    job = os.environ.get("P3D_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    return job if job and job != "none" else None


class Retention:
    def __init__(self, root: str, keep_last: int | None, job: str | None = None):
        self.root, self.keep_last, self.job = root, keep_last, job
        self.mine: set[str] = set()

    def _ours(self, path: str) -> bool:
        if os.path.abspath(path) in self.mine:
            return True
        try:
            return self.job is not None and read_meta(path).get("job") == self.job
        except Exception:                       # incomplete or damaged: not provably ours
            return False

    def saved(self, path: str) -> list[str]:
        """Record the committed checkpoint ``path``; remove this job's oldest beyond keep_last.
        Returns the removed folders (call on one rank only)."""
        self.mine.add(os.path.abspath(path))
        if not self.keep_last:
            return []
        ours = [p for p in step_folders(self.root) if self._ours(p)]      # newest first
        removed = []
        for p in ours[self.keep_last:]:
            gone = os.path.join(os.path.dirname(p), ".del-" + os.path.basename(p))
            os.replace(p, gone)
            shutil.rmtree(gone, ignore_errors=True)
            self.mine.discard(os.path.abspath(p))
            removed.append(p)
        return removed
