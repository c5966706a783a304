"""Per-step metrics: rank 0 appends one JSON object per step to train.metrics_file and prints a
progress line; every rank joins the max-RSS reduction."""
from __future__ import annotations

import json
import os
import resource

import torch

from parallel.config import Config
from parallel.mesh import Mesh


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MetricsLog:
    """Rank 0's JSONL file and console line; other ranks only join the max-RSS reduction."""

    def __init__(self, cfg: Config, mesh: Mesh, print_fn=print, append: bool = False):
        self.cfg, self.mesh, self.print = cfg, mesh, print_fn
        self.path = cfg.train.metrics_file if mesh.rank == 0 else None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if not append:                      # a resumed run continues the same file
                open(self.path, "w").close()

    def log(self, step: int, loss: float, step_s: float, comm_step: dict, engine=None) -> dict:
        rss = torch.tensor([peak_rss_bytes()], dtype=torch.int64)
        # control traffic, deliberately not counted in CommStats
        torch.distributed.all_reduce(rss, op=torch.distributed.ReduceOp.MAX, group=self.mesh.group("world").pg)
        rec = {"step": step, "loss": loss, "step_s": step_s,
               "samples_per_s": self.cfg.data.global_batch_size / step_s if step_s > 0 else None,
               "peak_rss_bytes": int(rss.item()), "comm": comm_step}
        if self.mesh.rank == 0:
            if self.path:
                with open(self.path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if step % max(self.cfg.train.log_every, 1) == 0 or step == self.cfg.train.steps - 1:
                self.print(f"step {step + 1:>5}/{self.cfg.train.steps}  loss {loss:.5f}  {step_s * 1000:7.1f} ms/step  "
                           f"{rec['samples_per_s']:8.1f} samples/s  rss {rss.item() / 2**20:6.0f} MiB", flush=True)
        return rec


