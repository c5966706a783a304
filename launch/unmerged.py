"""The launcher's one retry of a DeepSpeed-configured job whose ZeRO-3 regions refused merged units.

DeepSpeed's ``stage3_prefetch_bucket_size`` (absent: its default 5e7 elements) becomes ``zero.unit_mb``
(parallel/config/deepspeed_zero.py): consecutive stage-3 units merged into one gather. A model that calls modules a
data-dependent number of times (transformers' DBRX runs its expert GLU once per hit expert: a ZeRO-3 region,
parallel/zero/regions.py) cannot hold a merged unit in a region, and every rank refuses it at the first forward,
before any backward or update (:func:`parallel.zero.regions.refuse_merged_regions`). In DeepSpeed that key only sets
how far parameters are fetched ahead; it does not change what a step computes, and unmerged units give the same
numbers (tests/test_zero3_unit_budget.py). So when the DeepSpeed file (not the YAML, not an override, not "auto")
set ``zero.unit_mb`` and a rank refused for that reason (no other rank failed for another), the launcher runs the
job once more with the override ``zero.unit_mb=0`` and says so, instead of failing a config DeepSpeed itself would
run. The retry costs the job's start-up once (processes, model build); nothing was trained or saved by the refused
attempt.
"""
from __future__ import annotations

import os
import re
import socket

from launch.failures import _record
from parallel.checkpoint import owner as ownership
from parallel.config.deepspeed_zero import KEPT
from parallel.zero.regions import MERGED_REGIONS

__all__ = ["retry_unmerged", "release_refused_owner"]

_FROM_JSON = re.compile(r'^zero_optimization\.(stage3_)?prefetch_bucket_size = (?!"auto")(.*?) -> zero\.unit_mb = ')


def retry_unmerged(failures: dict, report: list, overrides: list, nnodes: int = 1) -> str | None:
    """The launcher's line announcing the retry, or None when this failure is not one to retry: ``failures`` is
    torchrun's {rank: ProcessFailure}, ``report`` the DeepSpeed mapping's lines, ``overrides`` the key=value words.
    Single node only (``nnodes`` 1): each node's launcher decides from its own ranks' records, with no agreement, so a
    node whose ranks were stopped before refusing (a pipeline stage without the region) would exit while another
    retried, and the retry's rendezvous would wait out its timeout for the missing node."""
    if nnodes != 1:
        return None
    if any(o.split("=", 1)[0].strip() == "zero.unit_mb" for o in overrides):
        return None                               # the user's own value: refuse as asked
    src = next((h for line in report if not line.endswith(KEPT) and (h := _FROM_JSON.match(line))), None)
    if src is None:
        return None
    recs = [_record(f) or {} for f in failures.values()]
    refused = [r for r in recs if r.get("kind") == "error" and MERGED_REGIONS in r.get("reason", "")]
    own = [r for r in recs if r.get("kind") in ("error", "config", "timeout") and r not in refused]
    if not refused or own:      # ranks torchrun stopped after the first refusal (no record, peer, signal) are fine
        return None
    key = f"zero_optimization.{src.group(1) or ''}prefetch_bucket_size"
    return (f"launch: the ranks refused merged ZeRO-3 units in a region at the first forward (nothing was "
            f"trained); zero.unit_mb came from the DeepSpeed config's {key} = {src.group(2)}, which in DeepSpeed "
            f"only sets how far parameters are fetched ahead: running the job again with zero.unit_mb=0 (the same "
            f"numbers, one unit per module; set {key}: 0 in the JSON to skip this retry)")


def release_refused_owner(root: str | None) -> bool:
    """Remove ``root``'s owner file when the refused attempt (this launcher's own workers, all exited) wrote it: the
    retry is a new torchrun run id, which :func:`parallel.checkpoint.owner.acquire` would take for another live job
    (its launcher, this process, is alive). True when removed."""
    if not root:
        return False
    rec = ownership._read(os.path.join(root, ownership.NAME)) if os.path.exists(os.path.join(root, ownership.NAME)) \
        else None
    if not rec or rec.get("launcher_pid") != os.getpid() or rec.get("host") != socket.gethostname():
        return False
    return ownership.release(root, rec)
