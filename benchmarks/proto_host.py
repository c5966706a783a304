"""Host work per call, calibrated (benchmarks/proto_calib.py) and charged per counted call (benchmarks/proto_report.py):
what a step pays on the CPU besides its FLOPs, bytes and collectives.

Counted (``python benchmarks/proto_pair.py --size 5m --rows ... --count``: one step under a TorchDispatchMode, the
same on both ranks where the row is symmetric):

* plain aten calls per step at 5M: local 1402, zero1 1416 / 1383 (rank 0 / 1), zero3 2180 / 1883, fsdp2 1910,
  fsdp2_ring 2060, pp_1f1b_m8 2996 / 3248, tp_ours 1627; at 50M tp_ours 4051. At ``host.op_s`` (a tiny in-place
  aten call: 0.9–2.8 µs loaded on this machine) the calls beyond local's are ≤ 2.2 ms of a 5M step — not the
  16–33 ms the session-9 5M rows missed (those were the per-call wait: proto_report.calib_mean). Recorded for
  the record, not charged: the planner's compute rate (``train_flops``) is a forward + backward timed whole,
  its own calls included.
* torch's DTensor TP row (``tp_dtensor``, benchmarks/proto_rows_mp.py): 768 calls on a DTensor at 5M (L = 6),
  2048 at 50M (L = 16): 128 per block = :data:`DTENSOR_PARAMS_PER_BLOCK` (8: qkv, attention proj, fc, MLP proj,
  weight and bias each, as ColwiseParallel / RowwiseParallel make them) × :data:`ADAMW_CALLS_PER_PARAM` (8: torch's
  single-tensor AdamW — mul_, lerp_, mul_, addcmul_, sqrt, div, add_, addcdiv_) + :data:`DTENSOR_FB_CALLS_PER_BLOCK`
  (64) in forward and backward;
* torch's FSDP2 rows (fsdp2, fsdp2_prefetch, fsdp2_ring): 608 DTensor calls at 5M = 76 parameters (12L + 4: every
  parameter of the GPT, sharded Shard(0) by fully_shard) × 8, all in the update — FSDP2 unshards to plain tensors
  for forward and backward. In situ (5M, loaded, load 16) FSDP2's AdamW step took 108.6 ms more than a plain AdamW
  over the same local shards: 1.43 ms a parameter (1.05 calibrated alongside). Idle, fsdp2 − zero3 measured
  37 ms at 5M and 358 ms at 50M (session 9's record). Each call runs
  DTensor's sharding propagation and redistribution checks in Python before its local op: measured (loaded, load
  7–10) a tiny Shard(0) ``add_`` 5.6–19.6 µs against 0.9 µs plain, a scalar ``mul_`` 57–61 µs, and one DTensor
  parameter's AdamW step 1213 µs against 49 µs plain.

Figures (``calibrate_host``; seconds):

* ``host.op_s``: one tiny in-place aten call (``add_`` of 16 elements), per call;
* ``host.dtensor_op_s``: the same call on DTensors sharded Shard(0) over the world's 1-D mesh (no communication:
  the local op plus DTensor's dispatch), per call — the forward/backward's DTensor calls;
* ``host.dtensor_adamw_s``: torch.optim.AdamW's step (single-tensor, as it runs on CPU) per DTensor parameter
  minus per plain parameter, on tiny parameters (no bytes to speak of): the update's host work per DTensor
  parameter beyond what the bytes cost (those the planner charges at the memory bandwidth).

Charged (:func:`dtensor_host_seconds`): L · (8 · ``host.dtensor_adamw_s`` + 64 · ``host.dtensor_op_s``) on the
tp_dtensor row, (12L + 4) · ``host.dtensor_adamw_s`` on the FSDP2 rows. Records without the figures (all before
session 10) get 0, and say so by its None. In situ (5M, loaded, load 17–18, a script pairing the row's own
optimizer with a plain AdamW over the same local shards): tp_dtensor's DTensor update took 49.6 ms more over its
48 DTensor parameters, 1.03 ms each, against 0.88 ms calibrated at the same time; at 50M 275.5 ms over 128, 2.15 ms
each, against 2.05 calibrated (load 17).

The rest of what the DTensor row does differently from our layout, which the planner is given
(:func:`dtensor_tp_seconds`; T = the global batch's tokens, which every tp rank runs, b·T·h = one activation):

* its collectives: the 4 all-reduces per block of ColwiseParallel / RowwiseParallel only — not our vocabulary-
  parallel embedding's forward and head's backward (b·T·h each) nor the loss's two (3·T·4 bytes): 4 calls fewer
  per step, each at its latency + wire / bandwidth + the per-call wait (parallel/planning/time_terms.py, tp_waits);
* its replicated tied head: every rank multiplies the whole V × h head (6·V·h FLOPs per token, ours V·h/t each),
  (1 − 1/t) · 6·V·h·T FLOPs more at the tp-split rate; the replicated embedding's and norms' update bytes are in
  the row's owned elements already.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["DTENSOR_PARAMS_PER_BLOCK", "DTENSOR_FB_CALLS_PER_BLOCK", "ADAMW_CALLS_PER_PARAM", "FSDP2_ROWS",
           "calibrate_host",
           "dtensor_host_seconds", "dtensor_tp_seconds"]

DTENSOR_PARAMS_PER_BLOCK = 8
DTENSOR_FB_CALLS_PER_BLOCK = 64
ADAMW_CALLS_PER_PARAM = 8           # torch's single-tensor AdamW: the calls on the parameter and its states
FSDP2_ROWS = ("fsdp2", "fsdp2_prefetch", "fsdp2_ring")


def _per_call(fn, calls: int, reps: int) -> float:
    """Median over ``reps`` of the slowest rank's seconds per call of ``fn`` (which makes ``calls`` calls)."""
    from benchmarks.proto_calib import _timed  # proto_calib imports this module: a late import
    return _timed(fn, reps) / calls


def _adamw_per_param(params: list, reps: int, steps: int = 10) -> float:
    for p in params:
        p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=False)

    def run():
        for _ in range(steps):
            opt.step()
    return _per_call(run, steps * len(params), reps)


def calibrate_host(dtensor: bool, reps: int = 5, calls: int = 2000, params: int = 32) -> dict:
    """The module docstring's figures: ``host.op_s`` always, the DTensor ones when ``dtensor`` (tp rows run; needs an
    initialised process group: the mesh spans its world)."""
    n = dist.get_world_size() if dist.is_initialized() else 1
    x, y = torch.zeros(16 * n), torch.zeros(16 * n)

    def plain():
        for _ in range(calls):
            x.add_(y)
    out = {"host.op_s": _per_call(plain, calls, reps)}
    if not dtensor:
        return out
    if not dist.is_initialized():
        raise RuntimeError("calibrate_host(dtensor=True) needs an initialised process group (the DTensor mesh spans "
                           "its ranks): call it from benchmarks/proto_calib.calibrate inside the protocol's ranks")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (n,))
    dx, dy = (distribute_tensor(t, mesh, [Shard(0)]) for t in (x, y))

    def shard():
        for _ in range(calls // 4):
            dx.add_(dy)
    out["host.dtensor_op_s"] = _per_call(shard, calls // 4, reps)
    plain_p = [torch.nn.Parameter(torch.zeros(16 * n)) for _ in range(params)]
    dt_p = [torch.nn.Parameter(distribute_tensor(torch.zeros(16 * n), mesh, [Shard(0)])) for _ in range(params)]
    out["host.dtensor_adamw_s"] = max(0.0, _adamw_per_param(dt_p, reps) - _adamw_per_param(plain_p, reps))
    return out


def dtensor_host_seconds(cal: dict, n_layer: int, name: str = "tp_dtensor") -> float | None:
    """Row ``name``'s DTensor host work per step (module docstring): tp_dtensor's beyond our layout's, an FSDP2 row's
    update; 0 for other rows, None when ``cal`` lacks the figures (records before them)."""
    if "host.dtensor_adamw_s" not in cal or "host.dtensor_op_s" not in cal:
        return None
    if name in FSDP2_ROWS:
        return (12 * n_layer + 4) * cal["host.dtensor_adamw_s"]
    if name != "tp_dtensor":
        return 0.0
    return n_layer * (DTENSOR_PARAMS_PER_BLOCK * cal["host.dtensor_adamw_s"]
                      + DTENSOR_FB_CALLS_PER_BLOCK * cal["host.dtensor_op_s"])


def dtensor_tp_seconds(rec: dict, cal: dict, hw) -> float:
    """Seconds the tp_dtensor row of record ``rec`` takes beyond the planner's step for our tp layout (module
    docstring): its per-call host work, its replicated head, minus the 4 collectives it does not make. ``hw``: the
    planner's Hardware of that row (proto_report.hardware)."""
    from parallel.planning.cost import seconds
    from parallel.planning.time_terms import tp_waits
    kw, t = rec["model"], rec["world"]
    tokens, h, V = rec["per_rank_batch"] * t * kw["seq_len"], kw["n_embd"], kw["vocab_size"]
    fewer = {"all_reduce": {"calls": 4, "wire_bytes": 2 * (t - 1) / t * (2 * tokens * h * 4 + 3 * tokens * 4)}}
    head = (1 - 1 / t) * 6 * V * h * tokens / hw.rate(tokens, t)
    host = dtensor_host_seconds(cal, kw["n_layer"]) or 0.0
    return host + head - seconds(fewer, hw) - tp_waits(fewer, hw)
