"""What the optimizer adds to the planner: state bytes per rank and its own communication per step.

Per owned piece of n elements (ZeRO's pieces: one per parameter part in the rank's shard; k pieces):

    adam / adamw (fp32)   8n + 4k            (exp_avg, exp_avg_sq; a float32 step per piece)
    adam / adamw int8     Σ 2(n + 4⌈n/256⌉) + 4k   (parallel/optim/adam8bit.py: uint8 codes + an fp32 scale
                                             per 256-element block, per moment)
    lamb                  8n + 8k            (its step is float64; parallel/optim/lamb.py)
    onebit_adam           8n + 4k + the error-feedback buffers after warm-up (parallel/zero/onebit.py):
                          stage 0: 4(N·c + c), c = 8⌈Ψ_r/(8N)⌉ (Ψ_r: the rank's elements; worker and
                          server error); stages 1–2: per bucket 4(3·padded + shard) (m, e_i, √v̂, e_s)
    onebit_lamb           stage 0: 24n + 4k + 4(N·c + c) (m, v, r̄, √v̂, ṽ, last factor); stages 1–2: 12n + 4k +
                          per bucket 4(4·padded + shard) + 16·P_b (1-bit Adam's buffers, ṽ; float64 r̄ and
                          factor per tensor; P_b tensors)
    zero_one_adam         after var_freeze_step: 16Ψ_r + 8 + 4k + 4(N·c + c), c from Ψ_r (comm_state["S"]: whole
                          m, v, b, u and Λ; error buffers); stages 1–2 add the owners' copies 16n + 8
                          (parallel/zero/zero_one.py)
    sgd                   4n with momentum, else 0

Communication beyond ZeRO's own, per step (ring model, :func:`parallel.planning.cost.add_op`):

    lamb         sum_sq: one all-reduce of 16·P bytes over dp (stages ≥ 1) and one over tp (tp > 1),
                 P = parameters (tensors) of the rank's stage (parallel/zero/partition.py)
    onebit_adam  after warm-up, in place of the gradient reduction, the parameter all-gather and the
                 24-byte norm all-reduce: stage 0 two all-to-alls (N·c/8 bytes of signs, 4N of scales)
                 and two all-gathers of the same; stages 1–2 one all-to-all and one all-gather of
                 Σ_b N(⌈shard_b/8⌉ + 4) bytes; and an 8-byte norm all-reduce. The planner shows
                 this steady state (warm-up steps cost Adam's; the first compressed step of stages
                 1–2 also all-gathers m and √v̂ once, 8·padded bytes per bucket).

    onebit_lamb  as onebit_adam (its per-tensor factors use data every rank holds: no traffic).
    zero_one_adam  a sync step after var_freeze_step (every step for local_step_scaler steps after it; then
                 every H-th, the steps between costing only the 8-byte norm all-reduce): stage 0's exchange at
                 every stage (stages 1–2 run it on the whole flat model, zero/zero_one.py) and the norm.
                 Before the freeze, T_v steps cost Adam's all-reduce and the others this exchange.

    muon         per step, stages ≥ 1: one all-gather over dp of each bucket holding a 2-D weight,
                 4·padded bytes (parallel/zero/partition.py); states: momentum 4n on a matrix piece,
                 AdamW's 8n + 4 on the others. tp > 1 (its per-matrix tp gathers) is refused by
                 :func:`check`, not modelled.
"""
from __future__ import annotations

__all__ = ["OPTIMIZERS", "ONEBIT", "ONEBIT_NOTE", "check", "state_bytes", "add_optimizer_comm"]

OPTIMIZERS = ("adamw", "adam", "sgd", "lamb", "onebit_adam", "onebit_lamb", "zero_one_adam", "muon")
ONEBIT = ("onebit_adam", "onebit_lamb", "zero_one_adam")
ONEBIT_NOTE = {n: " (after warm-up: the compressed phase; warm-up steps cost Adam's / LAMB's)" for n in ONEBIT[:2]}
ONEBIT_NOTE["zero_one_adam"] = (" (a sync step after var_freeze_step; local steps between syncs cost only the 8-byte "
                                "norm all-reduce, steps up to it Adam's all-reduce or this exchange)")


def check(tr, lay) -> str | None:
    if tr.optimizer == "muon" and lay.tp > 1:
        return "muon with tp > 1: its per-matrix all-gathers over tp are not modelled yet; plan with tp=1"
    if tr.optimizer in ("onebit_lamb", "zero_one_adam") and lay.tp > 1:
        return f"{tr.optimizer} with tp > 1 is refused by the config (parallel/config/validate.py); plan with tp=1"
    if tr.optimizer in ONEBIT and lay.zero == 3:
        return f"{tr.optimizer} runs with ZeRO stages 0-2 (parallel/zero/onebit.py)"
    if tr.optimizer not in OPTIMIZERS:
        return f"optimizer {tr.optimizer!r} is not modelled: plan with one of {list(OPTIMIZERS)}"
    if getattr(tr, "state_dtype", "fp32") == "int8" and tr.optimizer not in ("adam", "adamw"):
        return f"state_dtype=int8 applies to adam/adamw, not {tr.optimizer}"
    return None


def state_bytes(tr, lay, buckets: list, pieces: list) -> int:
    """Optimizer bytes of one dp rank: ``pieces`` holds, per bucket, (elements, 2-D weight?) of its owned pieces."""
    N = lay.zero_n                       # ZeRO over dp×cp
    flat = [n for ps in pieces for n, _ in ps]
    n, k = sum(flat), len(flat)
    if tr.optimizer in ("adam", "adamw"):
        if getattr(tr, "state_dtype", "fp32") == "int8":
            return sum(2 * (s + 4 * -(-s // 256)) for s in flat) + 4 * k
        return 8 * n + 4 * k
    if tr.optimizer == "lamb":
        return 8 * n + 8 * k
    if tr.optimizer == "muon":                   # momentum_buffer on matrices, AdamW (m, v, step) on the rest
        return sum(4 * s if mat else 8 * s + 4 for ps in pieces for s, mat in ps)
    if tr.optimizer == "onebit_adam":
        out = 8 * n + 4 * k
        if lay.zero == 0:
            c = -(-n // (N * 8)) * 8
            return out + 4 * (N * c + c)
        return out + sum(4 * (3 * bk.padded + bk.padded // N) for bk in buckets)
    if tr.optimizer == "onebit_lamb":             # + r̄ per piece; stage 0 √v̂, ṽ, last f; stages 1–2 ṽ, f64 coeff, f
        if lay.zero == 0:
            c = -(-n // (N * 8)) * 8
            return 24 * n + 4 * k + 4 * (N * c + c)
        return 12 * n + 4 * k + sum(4 * (4 * bk.padded + bk.padded // N) + 16 * len(bk.sizes) for bk in buckets)
    if tr.optimizer == "zero_one_adam":           # after V: whole m, v, b, u + Λ (comm_state["S"]); error buffers
        total = sum(bk.numel for bk in buckets)
        c = -(-total // (N * 8)) * 8
        out = 16 * total + 8 + 4 * k + 4 * (N * c + c)
        return out if lay.zero == 0 else out + 16 * n + 8      # stages 1–2: the owners' copies, one Λ clone
    return 4 * n if tr.momentum else 0


def add_optimizer_comm(out: dict, tr, lay, buckets: list, add_op, norm_bytes: int) -> None:
    """Adjust ZeRO's dp (and tp) ops in ``out`` for the optimizer (module docstring)."""
    N, T = lay.zero_n, lay.tp
    if tr.optimizer == "lamb":
        P = sum(len(bk.sizes) for bk in buckets)
        if lay.zero > 0:
            add_op(out, "dp", "all_reduce", 1, 16 * P, N)
        add_op(out, "tp", "all_reduce", 1, 16 * P, T)
    elif tr.optimizer == "muon" and lay.zero > 0:       # the matrices' buckets gathered whole over dp
        held = [bk for bk in buckets if any(bk.mats)]
        add_op(out, "dp", "all_gather", len(held), sum(4 * bk.padded for bk in held), N)
    elif tr.optimizer in ONEBIT and N > 1:
        out.pop("dp", None)
        if lay.zero == 0 or tr.optimizer == "zero_one_adam":
            n = sum(bk.numel for bk in buckets)
            c = -(-n // (N * 8)) * 8
            for op in ("all_to_all", "all_gather"):
                add_op(out, "dp", op, 2, N * c // 8 + 4 * N, N)
        else:
            x = sum(N * (-(-(bk.padded // N) // 8) + 4) for bk in buckets)
            for op in ("all_to_all", "all_gather"):
                add_op(out, "dp", op, 1, x, N)
        add_op(out, "dp", "all_reduce", 1, 8, N)
        for axis, n in (("tp", T), ("pp", lay.pp)):      # the verdict all-reduce is 8 bytes there too
            c = out.get(axis, {}).get("all_reduce")
            if c is not None:
                c["payload_bytes"] -= norm_bytes - 8
                c["wire_bytes"] -= 2 * (n - 1) / n * (norm_bytes - 8)
