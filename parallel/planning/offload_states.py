"""What the optimizer store holds per rank when ``zero.offload.optimizer`` is cpu or nvme (planner, --dry-run).

The offloaded optimizer (:mod:`parallel.zero.optimizer_offload`) keeps the fp32 master and Adam's moments of
the rank's owned pieces (n_p elements each, Σ n_p = n) in a store on the host or on disk, none of it in device
memory; every step reads and writes the whole store once:

    fp32 moments                  12n                          (master, exp_avg, exp_avg_sq)
    int8 moments (state_dtype)    4n + Σ_p 2(n_p + 4⌈n_p/256⌉)  (master; uint8 codes + an fp32 scale per
                                                               256-element block, per moment: the store cuts
                                                               sub-groups at pieces and at whole blocks,
                                                               parallel/zero/offload_int8.py)

so the moments shrink 3.94× and a step's store traffic (NVMe bytes read = written) about 2×.
"""
from __future__ import annotations

__all__ = ["offload_state_bytes"]


def offload_state_bytes(tr, flat: list) -> int:
    """Store bytes of one rank whose owned pieces have ``flat`` elements each (adam/adamw)."""
    if getattr(tr, "state_dtype", "fp32") == "int8":
        return sum(4 * s + 2 * (s + 4 * -(-s // 256)) for s in flat)
    return 12 * sum(flat)
