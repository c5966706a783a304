"""The price of one blocking tp all-reduce on CPU ranks (``Hardware.call_wait_s``; parallel/planning/time_terms.py,
tp_waits, has the math and the evidence), from a record's calibration ``cal`` (benchmarks/proto_report.calib_mean).

* :func:`isolated_call`: what cost.py charges a gloo all-reduce of the tp message (``chain_bytes``) before any
  wait — the isolated call's latency + wire / bus bandwidth;
* :func:`tp_call_wait`: ours (parallel/tensor_parallel's f/g operators, a blocking ``dist.all_reduce`` on gloo) —
  the mean over the calibration's interleaved repetitions of that all-reduce issued right after a tp-split matmul,
  whole (:data:`CALL`, benchmarks/proto_wait.py), minus :func:`isolated_call`: a tp call costs what that call
  measured. The mean, not the median: a step sums 29 (5m) to 69 (50m) such calls and one call's time is bimodal
  (quartiles 0.65 / 3.08 ms on session 12's 5m MP record). Records before the figure (all before session 12):
  the ring pair's δ, as before;
* the tp_dtensor row keeps δ (benchmarks/proto_report.predict_row): DTensor's collective is not ours — a Partial →
  Replicate redistribute (DTensor dispatch, ``_c10d_functional.all_reduce`` into a fresh tensor, ``wait_tensor``)
  that benchmarks/proto_tp_call.py times above ours after the same matmul (loaded) — and no calibration times it
  yet: δ is the figure that row was priced with (0.90–1.06 × the measured step on session 12's MP records), a
  stand-in, not a measurement of DTensor's call.
"""
from __future__ import annotations

__all__ = ["CALL", "isolated_call", "tp_call_wait", "tp_wait"]

CALL = "wait.gloo.call_s.mean"    # a gloo all-reduce of the tp message after a tp matmul, whole, mean (proto_wait)


def isolated_call(cal: dict, world: int) -> float:
    """Seconds cost.py charges a gloo all-reduce of the tp message (``chain_bytes``): latency + wire / bandwidth."""
    return cal["lat.gloo.all_reduce"] + 2 * (world - 1) / world * cal["chain_bytes"] / cal["bw.gloo.all_reduce"]


def tp_call_wait(cal: dict, world: int, delta: float) -> float:
    """``Hardware.call_wait_s`` of our tp calls (module docstring); ``delta``: the ring pair's δ, the figure of
    records before :data:`CALL`."""
    if CALL not in cal or "chain_bytes" not in cal:
        return delta
    return max(0.0, cal[CALL] - isolated_call(cal, world))


def tp_wait(cal: dict, world: int, delta: float) -> tuple | None:
    """(the excess of 16 blocking gloo all-reduces in a row after compute, ``chain.gloo.all_reduce``
    (benchmarks/proto_calib.py), over :func:`isolated_call`; what the planner charges a tp call beyond
    :func:`isolated_call`, :func:`tp_call_wait`), seconds. None for records before the figure."""
    if "chain.gloo.all_reduce" not in cal:
        return None
    return cal["chain.gloo.all_reduce"] - isolated_call(cal, world), tp_call_wait(cal, world, delta)
