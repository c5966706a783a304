"""Statistics and floors of the benchmark protocol (benchmarks/protocol.py): pure functions, no torch.

Paired comparison. Every round times each row once, in a shuffled order, so rows A and B share a
round's machine state; the per-round ratio r_i = a_i / b_i cancels what the round did to both.
Reported per pair: median(r), [min(r), max(r)] and a percentile bootstrap interval of the median
(resample the rounds with replacement B times, seeded; the (1−c)/2 and (1+c)/2 quantiles of the
B medians; Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13).

Noise band. The A/A row (the same configuration built twice, DDP) has true ratio 1, so its spread is
the noise: w = max(|lo − 1|, |hi − 1|) over its bootstrap interval [lo, hi] (and at least |median − 1|).
A pair whose median ratio r has |r − 1| ≤ w is a tie; otherwise "faster" (r < 1) or "slower".

Drift. Calibration runs before and after the rows; a figure that moved by more than ``tol``
(relative) flags the run: the machine changed under it and the ratios mean less.

Floors (per rank, seconds): compute FLOPs / matmul rate; communication Σ_op calls·latency_op +
wire_bytes_op / bus_bandwidth_op; optimizer bytes touched / memory bandwidth, with AdamW touching
28 bytes per fp32 element (read p, g, m, v; write p, m, v).
"""
from __future__ import annotations

import random
import statistics

__all__ = ["paired_ratios", "bootstrap_median", "compare", "noise_half_width", "verdict", "drift",
           "comm_floor", "ADAMW_BYTES"]

ADAMW_BYTES = 28


def paired_ratios(a: list, b: list) -> list:
    """r_i = a_i / b_i per round (the rounds of ``a`` and ``b`` must pair up one to one)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratios: {len(a)} and {len(b)} rounds do not pair (need equal, non-zero counts)")
    return [x / y for x, y in zip(a, b)]


def bootstrap_median(xs: list, n: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of median(xs): n resamples with replacement, seeded."""
    rng = random.Random(seed)
    k = len(xs)
    meds = sorted(statistics.median(rng.choices(xs, k=k)) for _ in range(n))
    lo_i = int((1 - level) / 2 * n)
    hi_i = min(n - 1, int((1 + level) / 2 * n))
    return meds[lo_i], meds[hi_i]


def compare(a: list, b: list, seed: int = 0, n_boot: int = 2000) -> dict:
    """Paired comparison of rows a and b: median ratio, [min, max], bootstrap interval."""
    r = paired_ratios(a, b)
    lo, hi = bootstrap_median(r, n_boot, seed=seed)
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "ci": [lo, hi], "n": len(r)}


def noise_half_width(aa: dict) -> float:
    """Half-width w of the noise band from the A/A comparison (a :func:`compare` result)."""
    return max(abs(aa["ci"][0] - 1), abs(aa["ci"][1] - 1), abs(aa["median"] - 1))


def verdict(ratio: float, w: float) -> str:
    """"tie" inside the noise band 1 ± w, else "faster" (ratio < 1) or "slower"."""
    if abs(ratio - 1) <= w:
        return "tie"
    return "faster" if ratio < 1 else "slower"


def drift(start: dict, end: dict, tol: float = 0.10) -> dict:
    """Relative change end/start − 1 of every numeric calibration figure present in both; ``flag``
    lists those beyond ``tol``."""
    out: dict = {"change": {}, "flag": []}
    for k, v in start.items():
        w = end.get(k)
        if isinstance(v, (int, float)) and isinstance(w, (int, float)) and v:
            c = w / v - 1
            out["change"][k] = c
            if abs(c) > tol:
                out["flag"].append(k)
    return out


def comm_floor(ops: dict, latency: dict, bandwidth: dict) -> float:
    """Σ over ``ops`` = {op: {calls, wire_bytes}} of calls·latency[op] + wire_bytes / bandwidth[op]."""
    t = 0.0
    for op, c in ops.items():
        if c["calls"]:
            t += c["calls"] * latency[op] + c["wire_bytes"] / bandwidth[op]
    return t
