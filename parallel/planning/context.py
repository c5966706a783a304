"""The planner's model of context parallelism (parallel/context_parallel): what a cp rank holds and sends.

Memory. Each cp rank runs the model on n = s/cp tokens (its zig-zag shard), so every activation term of
:mod:`parallel.planning.peak` is the one-process term at sequence n: the planner evaluates the peak with
the *local* model spec (:func:`local_spec`, seq = n; the parameters — the learned position embedding's
s·h included — stay those of the full spec). Ring attention keeps exactly what one process keeps at n
(q, k, v, the output, the log-sum-exp; tests/test_context_parallel.py asserts gpt_layer_bytes(n)); Ulysses
keeps one more attention output per block, β·n·(h/t)·b, and its two (s,) int64 index orders
(:func:`block_extra`). Each cp rank also gets its shard's position ids (β, n) int64 — the learned position
embedding's output is then (β, n, h), not (n, h) — and holds its dp share of the batch whole next to the
shards (x, y, positions: 24 bytes a token; the pipeline shards every micro-batch up front).

Wire bytes per rank per step (axis "cp"; ring and Ulysses as :func:`parallel.context_parallel.ring_wire_bytes`
and :func:`~parallel.context_parallel.ulysses_wire_bytes` state them, per block forward and backward, × the
stage's blocks × m micro-batches, + one forward per block activation checkpointing recomputes):
* ring, M = β·(h_kv/t)·n·d·b: forward cp−1 sends of K‖V (2M each); backward cp−1 of K‖V and cp−1 of the
  fp32 dK‖dV accumulators (2M·4/b each);
* Ulysses: 4 all-to-alls each way — q and the output β·n·(h/t)·d·b, k and v β·n·(h_kv'/t)·d·b with the kv
  heads repeated to h_kv' = lcm(h_kv/t, cp)·t — each on the wire for (cp−1)/cp of its payload.
Gradients and ZeRO go over dp × cp (axis "dp_cp"): N = dp·cp in every ZeRO formula.
With sequence parallel (tp > 1) the cp shard is split again over tp between the tp regions, so every SP term
(activations n/t outside the regions, the all-gathers and reduce-scatters of b·n·h) is the one-process SP term at
n; the attention still sees the whole shard with h/t heads (the ring's M and Ulysses' payloads above). One
difference: the learned position embedding's output, all-gathered once per micro-batch, is (β, n, h) — its
position ids are per sequence under cp — not (n, h) (:func:`parallel.planning.cost.tp_per_micro`).
tests/test_context_parallel_sp_plan.py: states and bytes = measured at cp2 × tp2 + SP, peaks within 2 %.

Step time (:func:`cp_seconds`, per micro-batch of a stage; F = peak FLOP/s, a send costs latency + bytes / bw):
* ring: each of the cp − 1 steps of a block's forward computes one key block — 4·β·n·n·h/t FLOPs (the
  attention share of 12·h·s per token, :mod:`parallel.planning.cost`, over cp steps) — while the next K‖V
  (2M bytes) travels (ring.py posts the send before the block's compute), so a step costs max(compute,
  send) and the transfer shows only by what exceeds the compute: (cp−1)·max(0, t(2M) − c). The backward's
  steps compute 2c under the K‖V and the fp32 dK‖dV accumulator sends: (cp−1)·max(0, t(2M) + t(2M·4/b) − 2c);
  a recomputed forward as a forward. (The ring's compute itself is in the block's 12·h·s·cp FLOPs.)
* Ulysses: its all-to-alls block the attention (nothing to overlap with): all of their time shows.
"""
from __future__ import annotations

import dataclasses
import math

from parallel.planning.spec import Layout, ModelSpec, TrainSpec, element_bytes

__all__ = ["local_spec", "block_extra", "cp_per_step", "check_cp", "cp_seconds"]


def local_spec(spec: ModelSpec, lay: Layout) -> ModelSpec:
    """The spec one cp rank's activations follow: seq = s/cp."""
    return spec if lay.cp == 1 else dataclasses.replace(spec, seq=spec.seq // lay.cp)


def check_cp(spec: ModelSpec, lay: Layout) -> str | None:
    """Why cp cannot split this model (None when it can)."""
    if lay.cp == 1:
        return None
    if spec.seq % (2 * lay.cp):
        return f"seq = {spec.seq} is not divisible by 2·cp = {2 * lay.cp} (the zig-zag split)"
    if lay.cp_algorithm not in ("ring", "ulysses"):
        return f"cp_algorithm {lay.cp_algorithm!r} is not ring or ulysses"
    if lay.cp_algorithm == "ulysses" and (spec.heads // lay.tp) % lay.cp:
        return f"Ulysses needs the {spec.heads // lay.tp} heads per tp rank divisible by cp = {lay.cp}"
    return None


def block_extra(local: ModelSpec, lay: Layout, mode: str, mb: int, t: int, e: int) -> float:
    """Bytes a block keeps beyond the one-process block at n tokens (Ulysses, policy none)."""
    if lay.cp == 1 or lay.cp_algorithm != "ulysses" or mode not in ("none", "offload"):
        return 0.0
    return mb * local.seq * local.hidden * e / t + 2 * local.seq * lay.cp * 8


def _op(out: dict, op: str, calls: int, payload: float, wire: float) -> None:
    if calls <= 0:
        return
    c = out.setdefault("cp", {}).setdefault(op, {"calls": 0, "payload_bytes": 0, "wire_bytes": 0.0})
    c["calls"] += calls
    c["payload_bytes"] += int(payload)
    c["wire_bytes"] += wire


def cp_per_step(local: ModelSpec, lay: Layout, tr: TrainSpec, own: list, bounds: list, mb: int,
                recomputed=lambda a, z: 0) -> dict:
    """{"cp": {op: {calls, payload_bytes, wire_bytes}}} of one rank per step (module docstring); ``local``:
    :func:`local_spec` (seq = n = s/cp); ``recomputed(a, z)``: block forwards activation checkpointing
    re-runs per micro-batch in blocks [a, z)."""
    C, t, m = lay.cp, lay.tp, lay.micro_batches
    if C == 1:
        return {}
    e = element_bytes(tr)[0]
    n, d = local.seq, local.hidden // local.heads
    hq, hk = local.heads // t, (local.kv_heads or local.heads) // t
    fwd = sum(m * (z - a + recomputed(a, z)) for a, z in (bounds[k] for k in own))
    bwd = sum(m * (z - a) for a, z in (bounds[k] for k in own))
    out: dict = {}
    if lay.cp_algorithm == "ring":
        kv = 2 * mb * hk * n * d * e
        acc = 2 * mb * hk * n * d * 4
        calls = fwd * (C - 1) + bwd * (C - 1)
        payload = fwd * (C - 1) * kv + bwd * (C - 1) * kv
        _op(out, "send", calls + bwd * (C - 1), payload + bwd * (C - 1) * acc, payload + bwd * (C - 1) * acc)
    else:
        hk_rep = hk * (C // math.gcd(hk, C))
        per = mb * n * d * e * (2 * hq + 2 * hk_rep)
        _op(out, "all_to_all", 4 * (fwd + bwd), (fwd + bwd) * per, (fwd + bwd) * per * (C - 1) / C)
    return out


def cp_seconds(local: ModelSpec, lay: Layout, tr: TrainSpec, own: list, bounds: list, mb: int, hw,
               recomputed=lambda a, z: 0) -> float:
    """Exposed cp seconds of one micro-batch through the stages ``own`` (module docstring); ``hw``: a
    :class:`parallel.planning.spec.Hardware`; ``recomputed`` as in :func:`cp_per_step`."""
    C, t = lay.cp, lay.tp
    if C == 1:
        return 0.0
    one = dataclasses.replace(lay, micro_batches=1)
    if lay.cp_algorithm != "ring":
        ops = cp_per_step(local, one, tr, own, bounds, mb, recomputed).get("cp", {})
        return sum(c["calls"] * hw.lat(op) + c["wire_bytes"] / hw.bw(op) for op, c in ops.items())
    e = element_bytes(tr)[0]
    n, d = local.seq, local.hidden // local.heads
    hk = (local.kv_heads or local.heads) // t
    kv = 2 * mb * hk * n * d * e
    send = lambda nbytes: hw.lat("send") + nbytes / hw.bw("send")        # noqa: E731
    c = 4 * mb * n * n * local.hidden / t / hw.peak_flops
    fwd = sum(z - a + recomputed(a, z) for a, z in (bounds[k] for k in own))
    bwd = sum(z - a for a, z in (bounds[k] for k in own))
    return (C - 1) * (fwd * max(0.0, send(kv) - c) + bwd * max(0.0, send(kv) + send(kv * 4 / e) - 2 * c))
