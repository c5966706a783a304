"""The planner's cost model: communication bytes per rank and step, and step time.

Communication per rank and step (ring model, parallel/comm; DESIGN.md), per micro-batch m:
* dp: stage 0 all-reduce 2(N−1)/N·(Ψ+1)b (the last bucket carries the unused-parameter flag of
  parallel/zero/unused.py); 1–2 reduce-scatter + all-gather of the padded buckets; 3 reduce-scatter + two
  all-gathers per unit per micro-batch (a tied head gathers the embedding once more in forward); stages ≥ 1
  add a 24-byte grad-norm all-reduce (also over tp and pp; over dp 32 bytes,
  carrying the count of parameters without a gradient, parallel/zero/unused.py, and the step's loss: 40,
  parallel/zero/norm_carry.py);
* tp per micro-batch: 4 all-reduces of b·s·h per block, the embedding's forward, the head's
  backward and the loss's two (3·b·s·4 bytes); sequence parallel: the same b·s·h as all-gathers +
  reduce-scatters and small all-reduces of the sequence-sharded norm/bias gradients; a block that
  activation checkpointing recomputes runs its forward's two again (:func:`recomputed_blocks`);
* pp: b·s·h (SP: b·s·h/t) per micro-batch each way per stage boundary; the tied embedding's
  gradient V·h·b/t once per step between the end ranks (axis "pp_tied").

Step time (cost model): each stage's micro-batch F+B = its FLOPs (6N + 12Lhs per token, 1/t of it;
plus one block forward per block activation checkpointing recomputes, :func:`recomputed_blocks`)
/ the rate at the micro-batch's token count (``Hardware.rate``: measured there — at the tp-split shapes under
tp where calibrated — else the peak), plus its
tp traffic at the given latency and bandwidth, plus on CPU ranks a wait per blocking tp collective
(:func:`parallel.planning.time_terms.tp_waits`) (MoE: the ep all-to-alls and the routing's blocking control
collectives, :func:`parallel.planning.moe.routing_control_per_micro`); the schedule is simulated with
F:B:I:W = 1:2:1:1 (parallel/pipeline/simulate.py; I and W × the calibrated split's cost where
``Hardware.split_frac`` has the micro-batch's size: :func:`_split_frac`); pp messages add to their
actions (latency + bytes / bandwidth + ``Hardware.p2p_wait_s`` on CPU ranks: time_terms); the dp traffic that
shows (:func:`parallel.planning.time_terms.exposed_dp`: the last bucket's
reduction always, the rest what does not hide under backward — on CPU ranks sharing their core with gloo, at least the
core's own copying). With a measured memory bandwidth (``Hardware.mem_bandwidth``) the optimizer's
update adds the bytes torch's update really moves per owned element
(:data:`parallel.planning.time_terms.OPT_MOVED`, 88 for AdamW) and the engine's gradient
bookkeeping (copy 12 bytes per local gradient element — none at stage 0 over one rank —, the division 8 per
divided one, 12 more per further micro-batch: time_terms) plus the norm's 4 per owned one.
"""
from __future__ import annotations

import dataclasses

from parallel.pipeline.schedules import get_schedule
from parallel.pipeline.simulate import simulate
from parallel.planning.context import cp_seconds
from parallel.planning.flops import gpt_matmul_params
from parallel.planning.moe import all_to_all_per_micro, mlp_matmul_params, routing_control_per_micro, tp_moe_per_micro
from parallel.planning.optim_states import add_optimizer_comm
from parallel.planning.spec import Hardware, Layout, ModelSpec, TrainSpec, element_bytes
from parallel.planning.time_terms import (
    ACCUM_MOVED,
    DIVIDE_MOVED,
    NORM_MOVED,
    exposed_dp,
    grad_moved,
    memory_seconds,
    optimizer_moved,
    stage3_waits,
    tp_waits,
)

__all__ = ["NORM_BYTES", "OPT_BYTES", "optimizer_seconds", "add_op", "recomputed_blocks", "tp_per_micro",
           "comm_per_step", "seconds",
           "step_time"]

NORM_BYTES = 24          # the grad-norm all-reduce: three float64
OPT_BYTES = {"adamw": 28, "adam": 28, "sgd_momentum": 20, "sgd": 12}    # a fused update's floor per element


def optimizer_seconds(owned: int, tr: TrainSpec, hw: Hardware, local_grads: int = 0, zero: int = 0,
                      micro_batches: int = 1, n: int = 1, ep: int = 1) -> float:
    """torch's update over ``owned`` elements, the norm over them and our gradient bookkeeping (ZeRO stage
    ``zero`` over ``n`` ranks; each micro-batch after the first adds its gradient) over ``local_grads``
    elements, at ``hw.mem_bandwidth`` (0 when not modelled; time_terms)."""
    per = optimizer_moved(tr.optimizer, tr.momentum) + NORM_MOVED
    grads = (grad_moved(zero, n, tr.precision, tr.optimizer, ep, micro_batches, gloo_ring=hw.comm_shares_core)
             + (micro_batches - 1) * ACCUM_MOVED)
    divided = 0 if n == 1 else local_grads / n if zero > 0 and tr.precision == "fp32" else local_grads  # reducer.py
    return memory_seconds(owned * per + local_grads * grads + divided * DIVIDE_MOVED, hw)


def add_op(out: dict, axis: str, op: str, calls: int, payload: float, n: int) -> None:
    if calls <= 0 or n <= 1 and op != "send" and op != "recv":
        return
    wire = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
            "all_to_all": (n - 1) / n, "send": 1.0, "recv": 0.0}[op] * payload
    c = out.setdefault(axis, {}).setdefault(op, {"calls": 0, "payload_bytes": 0, "wire_bytes": 0.0})
    c["calls"] += calls
    c["payload_bytes"] += int(payload)
    c["wire_bytes"] += wire


def tp_per_micro(spec: ModelSpec, lay: Layout, blocks: int, first: bool, last: bool, mb: int, e: int) -> dict:
    """tp traffic of one micro-batch through one stage: {op: (calls, payload bytes)}."""
    act, ce, h = mb * spec.seq * spec.hidden * e, 3 * mb * spec.seq * 4, spec.hidden
    if not lay.sp:                   # an MoE layer: attention's 2 per block, the experts' (planning/moe.py)
        n = (2 if spec.experts else 4) * blocks + first + last
        mc, mp = tp_moe_per_micro(spec, blocks, mb, e) if spec.experts else (0, 0)
        return {"all_reduce": (n + 2 * last + mc, n * act + last * ce + mp)}
    nb = 2 if spec.norm_bias else 1
    small = blocks * (2 * nb + 2 * spec.bias) + last * nb
    ar = (small + 2 * last, small * h * e + last * ce)
    if spec.tp_layout == "megatron":
        pos = first and spec.learned_pos     # its (n, h) output; (β, n, h) under cp, whose position ids are (β, n)
        pos_out = spec.seq * h * e * (mb if lay.cp > 1 else 1)
        return {"all_gather": (4 * blocks + 2 * first + last - (first and not pos),
                               (4 * blocks + first + last) * act + pos * pos_out),
                "reduce_scatter": (4 * blocks + first + last, (4 * blocks + first + last) * act),
                "all_reduce": ar}
    return {"all_gather": (4 * blocks + first + last, (4 * blocks + first + last) * act),
            "reduce_scatter": (4 * blocks, 4 * blocks * act),
            "all_reduce": (ar[0] + first + last, ar[1] + (first + last) * act)}


def _reduction(out: dict, axis: str, buckets: list, zero: int, b: int, N: int) -> None:
    """The gradient reduction (and stage ≥ 1 parameter gathers and norm) of ``buckets`` over ``axis``."""
    if zero == 0:                    # + one element: the unused-parameter flag (parallel/zero/unused.py)
        add_op(out, axis, "all_reduce", len(buckets), (sum(bk.numel for bk in buckets) + 1) * b, N)
    else:
        add_op(out, axis, "reduce_scatter", len(buckets), sum(bk.padded for bk in buckets) * b, N)
        add_op(out, axis, "all_gather", sum(bk.gathers for bk in buckets),
               sum(bk.gathers * bk.padded for bk in buckets) * b, N)
        # dp: + the missing-grad count and the step's loss (the engine's train_step)
        add_op(out, axis, "all_reduce", 1, NORM_BYTES + 16 * (axis == "dp"), N)


def comm_per_step(spec: ModelSpec, lay: Layout, tr: TrainSpec, buckets: list, own: list, bounds: list, mb: int) -> dict:
    b = element_bytes(tr)[0]
    N, t, p, S, m = lay.zero_n, lay.tp, lay.pp, lay.pp * lay.v, lay.micro_batches    # ZeRO over dp×cp
    out: dict = {}
    _reduction(out, "dp", [bk for bk in buckets if not bk.expert], lay.zero, b, N)
    experts = [bk for bk in buckets if bk.expert]
    if experts:                                   # parallel.planning.moe: experts over edp, tokens over ep
        _reduction(out, "edp", experts, lay.zero, b, N // lay.ep)
        add_op(out, "ep", "all_reduce", 1, NORM_BYTES, lay.ep)
        calls, payload = all_to_all_per_micro(spec, sum(bounds[k][1] - bounds[k][0] for k in own), mb, b,
                                             lay.cp)
        add_op(out, "ep", "all_to_all", m * calls, m * payload, lay.ep)
    for k in own:
        per_micro = tp_per_micro(spec, lay, bounds[k][1] - bounds[k][0], k == 0, k == S - 1, mb, b)
        for op, (calls, payload) in per_micro.items():
            add_op(out, "tp", op, m * calls, m * payload, t)
        rec = m * recomputed_blocks(lay, tr, *bounds[k])    # a recomputed block's forward: its 2 tp collectives again
        act = mb * spec.seq * spec.hidden * b
        for op in ("all_gather", "reduce_scatter") if lay.sp else ("all_reduce",):
            add_op(out, "tp", op, 2 * rec, 2 * rec * act, t)
    add_op(out, "tp", "all_reduce", 1, NORM_BYTES, t)
    if p > 1:
        act = mb * (spec.seq // t if lay.sp else spec.seq) * spec.hidden * b
        own_r = lay.owner(own[0])            # a neighbour stage on the same rank (V placement) is no message
        msgs = m * sum((k < S - 1 and lay.owner(k + 1) != own_r) + (k > 0 and lay.owner(k - 1) != own_r)
                       for k in own)
        add_op(out, "pp", "send", msgs, msgs * act, p)
        add_op(out, "pp", "recv", msgs, msgs * act, p)
        add_op(out, "pp", "all_reduce", 1, NORM_BYTES, p)
        if spec.tied and (0 in own or S - 1 in own) and lay.owner(0) != lay.owner(S - 1):
            tied = spec.vocab // t * spec.hidden * b
            add_op(out, "pp_tied", "send", 1, tied, p)
            add_op(out, "pp_tied", "recv", 1, tied, p)
    add_optimizer_comm(out, tr, lay, buckets, add_op, NORM_BYTES)          # lamb, 1-bit: optim_states.py
    return out



def recomputed_blocks(lay: Layout, tr: TrainSpec, a: int, e: int) -> int:
    """Block forwards re-run per micro-batch by activation checkpointing in blocks [a, e): full (and
    every k's recomputed blocks) once, under the zero-bubble split too (I's recompute serves W,
    :mod:`parallel.activation.recompute`); selective re-runs only elementwise ops (no matmul FLOPs),
    offload nothing."""
    return {"full": e - a, "every": sum(1 for i in range(a, e) if i % tr.every == 0)}.get(tr.activation, 0)


def seconds(ops: dict, hw: Hardware) -> float:
    """Σ_op calls·latency(op) + wire bytes / bandwidth(op) (per-op figures where ``hw`` has them)."""
    return sum(c["calls"] * hw.lat(op) + c["wire_bytes"] / hw.bw(op) for op, c in ops.items())


def _split_frac(a, frac: dict, split) -> float:
    """An action's share of its stage's F + B. With a calibrated I/W split (``Hardware.split_frac``: I and W
    seconds ÷ a plain B's, benchmarks/proto_calib.py) I and W cost that × B's share — except on stage 0, whose
    input (token ids) has no gradient: its I is empty and its W is one plain backward
    (parallel/pipeline/backward_split.py). Without one: F:B:I:W = 1:2:1:1."""
    if split is None or a.kind not in ("I", "W"):
        return frac[a.kind]
    if a.stage == 0:
        return 0.0 if a.kind == "I" else frac["B"]
    return frac["B"] * split[0 if a.kind == "I" else 1]


def step_time(spec: ModelSpec, lay: Layout, tr: TrainSpec, hw: Hardware, bounds: list, mb: int,
               dp_ops: dict, hide_gather_s: float = 0.0) -> tuple[float, float]:
    """(seconds per step, pipeline bubble fraction) of the slowest rank (module docstring); ``hide_gather_s``:
    optimizer seconds the stage 1–2 parameter all-gathers run under (time_terms.exposed_dp). With cp > 1
    ``spec`` is the local one (seq = s/cp): a rank's tokens attend the whole sequence (12·h·s·cp per token),
    and its cp traffic adds to each micro-batch what does not hide under the ring's block compute (Ulysses:
    all of it; :func:`parallel.planning.context.cp_seconds`)."""
    h, s, S, b = spec.hidden, spec.seq, lay.pp * lay.v, element_bytes(tr)[0]
    block = 6 * (gpt_matmul_params(1, h, 0, spec.ffn_, spec.kv_hidden, spec.mlp_matrices)) + 12 * h * s * lay.cp
    if spec.experts:                              # the MLP's matmuls → the experts' on E·C slots + the router
        block += 6 * (mlp_matmul_params(spec, mb, lay.cp) - spec.mlp_matrices * h * spec.ffn_)
    one = dataclasses.replace(lay, micro_batches=1)
    stage = []
    for k, (a, e) in enumerate(bounds):
        flops = mb * s * ((e - a) * block + (k == S - 1) * 6 * spec.vocab * h) / lay.tp
        flops += mb * s * recomputed_blocks(lay, tr, a, e) * block / 3 / lay.tp     # a block's forward: 1/3 of F+B
        tp: dict = {}
        for op, (calls, payload) in tp_per_micro(spec, lay, e - a, k == 0, k == S - 1, mb, b).items():
            add_op(tp, "tp", op, calls, payload, lay.tp)
        rec = recomputed_blocks(lay, tr, a, e)            # a recomputed block's forward: its 2 tp collectives again
        for op in ("all_gather", "reduce_scatter") if lay.sp else ("all_reduce",):
            add_op(tp, "tp", op, 2 * rec, 2 * rec * mb * s * h * b, lay.tp)
        act = mb * (s // lay.tp if lay.sp else s) * h * b
        hops = (k < S - 1 and lay.owner(k + 1) != lay.owner(k)) + (k > 0 and lay.owner(k - 1) != lay.owner(k))
        p2p = hops * (hw.lat("send") + act / hw.bw("send") + hw.p2p_wait_s) if S > 1 else 0.0
        if spec.experts and lay.ep > 1:
            calls, payload = all_to_all_per_micro(spec, e - a, mb, b, lay.cp)
            add_op(tp, "ep", "all_to_all", calls, payload, lay.ep)
        for axis, ops in routing_control_per_micro(spec, lay, e - a + recomputed_blocks(one, tr, a, e), mb).items():
            for op, (calls, payload) in ops.items():       # MoE routing's blocking control collectives
                add_op(tp, axis, op, calls, payload, lay.cp if axis == "control:cp" else lay.ep)
        cp = cp_seconds(spec, lay, tr, [k], bounds, mb, hw, lambda a_, z_: recomputed_blocks(one, tr, a_, z_))
        stage.append(flops / hw.rate(mb * s, lay.tp) + sum(seconds(ops, hw) for ops in tp.values()) + p2p + cp
                     + tp_waits(tp.get("tp", {}), hw))
    if S == 1:
        span, bubble = lay.micro_batches * stage[0], 0.0
    else:
        frac = {"F": 1 / 3, "B": 2 / 3, "I": 1 / 3, "W": 1 / 3}
        split = dict(hw.split_frac).get(mb * s)
        sim = simulate(get_schedule(lay.schedule, lay.pp, lay.micro_batches, lay.v),
                       lambda a: stage[a.stage] * _split_frac(a, frac, split))
        span, bubble = float(sim.makespan), float(sim.bubble)
    exposed = exposed_dp(dp_ops, lay.zero, max(stage), span, hw, seconds, hide_gather_s)
    return span + exposed + stage3_waits(dp_ops, lay.zero, lay.units, hw), bubble
