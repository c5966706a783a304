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
* :func:`dtensor_call_wait`: the tp_dtensor row's — DTensor's collective is not ours: a Partial → Replicate
  redistribute (DTensor dispatch, ``_c10d_functional.all_reduce`` into a fresh tensor, ``wait_tensor``), timed the
  same way since session 13 (:data:`DTENSOR_CALL`). Directly (benchmarks/proto_tp_call.py, 96 repetitions, LOADED,
  load 7–8) after the same matmul: ours 1.29 ms median / 2.14 mean at 5m, 1.19 / 1.57 at 50m; DTensor's 3.18 / 3.80
  and 5.24 / 4.57 — 1.7–3.0 ms dearer a call, most of it in the functional call (2.26 / 3.00, 4.27 / 4.33). Records
  without the figure (session 12's included) keep δ there: the figure that row was priced with (0.90–1.06 × the
  measured step on session 12's MP records; with our c instead 0.72–0.96), a stand-in, not a measurement.
"""
from __future__ import annotations

__all__ = ["CALL", "DTENSOR_CALL", "isolated_call", "tp_call_wait", "dtensor_call_wait", "tp_wait"]

CALL = "wait.gloo.call_s.mean"    # a gloo all-reduce of the tp message after a tp matmul, whole, mean (proto_wait)
DTENSOR_CALL = "wait.dtensor.call_s.mean"     # DTensor's Partial → Replicate of it, the same way (session 13 on)


def isolated_call(cal: dict, world: int) -> float:
    """Seconds cost.py charges a gloo all-reduce of the tp message (``chain_bytes``): latency + wire / bandwidth."""
    return cal["lat.gloo.all_reduce"] + 2 * (world - 1) / world * cal["chain_bytes"] / cal["bw.gloo.all_reduce"]


def tp_call_wait(cal: dict, world: int, delta: float) -> float:
    """``Hardware.call_wait_s`` of our tp calls (module docstring); ``delta``: the ring pair's δ, the figure of
    records before :data:`CALL`."""
    if CALL not in cal or "chain_bytes" not in cal:
        return delta
    return max(0.0, cal[CALL] - isolated_call(cal, world))


def dtensor_call_wait(cal: dict, world: int, delta: float) -> float:
    """``Hardware.call_wait_s`` of the tp_dtensor row (module docstring): :data:`DTENSOR_CALL` beyond
    :func:`isolated_call`; ``delta`` (the ring pair's δ) on records without it."""
    if DTENSOR_CALL not in cal or "chain_bytes" not in cal:
        return delta
    return max(0.0, cal[DTENSOR_CALL] - isolated_call(cal, world))


def tp_wait(cal: dict, world: int, delta: float) -> tuple | None:
    """(the excess of 16 blocking gloo all-reduces in a row after compute, ``chain.gloo.all_reduce``
    (benchmarks/proto_calib.py), over :func:`isolated_call`; what the planner charges a tp call beyond
    :func:`isolated_call`, :func:`tp_call_wait`), seconds. None for records before the figure."""
    if "chain.gloo.all_reduce" not in cal:
        return None
    return cal["chain.gloo.all_reduce"] - isolated_call(cal, world), tp_call_wait(cal, world, delta)
