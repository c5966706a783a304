"""``python -m launch --dry-run``: the resolved config and layout, without starting workers."""
from __future__ import annotations

import yaml

from parallel.config import Config


def describe(cfg: Config) -> str:
    p = cfg.parallel
    lines = ["# resolved config", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "",
             f"# mesh: pp={p.pp} × dp={p.dp} × tp={p.tp} = {cfg.world_size} ranks (tp innermost)"]
    for r in range(cfg.world_size):
        tp = r % p.tp
        dp = (r // p.tp) % p.dp
        pp = r // (p.tp * p.dp)
        lines.append(f"rank {r}: pp={pp} dp={dp} tp={tp}")
    lines.append(f"# micro-batches per dp rank per step: {cfg.micro_batches} "
                 f"(global batch {cfg.data.global_batch_size}, micro-batch {cfg.data.micro_batch_size})")
    return "\n".join(lines)
