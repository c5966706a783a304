"""Measured against predicted, exactly: a rank's model-state bytes and its collectives per axis and op (calls,
payload bytes, wire bytes) equal the planner's :class:`Prediction` for that rank. Shared by the planner tests
(dense layouts, optimizers, MoE, context parallel)."""
import pytest

STATE_KEYS = ("params", "grads", "master", "optimizer", "total")


def assert_states_equal(tag, got: dict, want: dict) -> None:
    for k in STATE_KEYS:
        assert got[k] == want[k], f"{tag} {k}: measured {got[k]}, predicted {want[k]}"


def assert_comm_equal(tag, comm: dict, want: dict) -> None:
    """``comm``: a rank's CommStats by axis (control traffic, axes "control:…", left out); ``want``: pred.comm[rank]."""
    comm = {a: ops for a, ops in comm.items() if not a.startswith("control:")}
    assert set(comm) == set(want), f"{tag}: axes {set(comm)} vs {set(want)}"
    for axis, ops in comm.items():
        assert set(ops) == set(want[axis]), f"{tag} {axis}: {set(ops)} vs {set(want[axis])}"
        for op, c in ops.items():
            p = want[axis][op]
            assert (c["calls"], c["payload_bytes"], c["wire_bytes"]) == \
                (p["calls"], p["payload_bytes"], pytest.approx(p["wire_bytes"])), \
                f"{tag} {axis}.{op}: measured {c}, predicted {p}"
