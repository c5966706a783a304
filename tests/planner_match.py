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


def assert_control_equal(tag, comm: dict, want: dict) -> None:
    """The MoE routing's control collectives (axes "control:cp", "control:ep") of a rank's CommStats equal
    ``want`` = pred.control[rank] (planning/moe.py: routing_control_per_micro)."""
    got = {a: {op: (c["calls"], c["payload_bytes"], c["wire_bytes"]) for op, c in ops.items()}
           for a, ops in comm.items() if a in ("control:cp", "control:ep")}
    exp = {a: {op: (c["calls"], c["payload_bytes"], pytest.approx(c["wire_bytes"])) for op, c in ops.items()}
           for a, ops in want.items()}
    assert got == exp, f"{tag}: routing control traffic measured {got}, predicted {exp}"


def predict_config(cfg):
    """The planner's :class:`Prediction` for ``cfg`` (its model built on meta, as ``--dry-run`` does)."""
    from launch.dry_run import _meta_model, planner_inputs
    from parallel.planning.planner import predict
    return predict(*planner_inputs(cfg, _meta_model(cfg), device="cpu"))


def measure_second_step(cfg, build, dataset) -> dict:
    """This rank's model-state bytes, and the peak of live tensor bytes and CommStats of step 2 (step 1 warms up:
    optimizer state, traced orders), for ``cfg`` built by ``build(cfg)`` on ``dataset(cfg)``. ``peak`` leaves out
    the buffers gloo's worker thread released after the peak (LiveBytes.peak_late: when they die is a race)."""
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    from parallel.planning.measure import measure_step
    eng = parallelize(build(cfg), cfg)
    data, dp = dataset(cfg), cfg.parallel.dp
    batch = [rank_batch(data, t, cfg.data.global_batch_size, dp, eng.mesh.coord["dp"]) for t in range(2)]
    eng.train_step(batch[0])
    before = eng.mesh.stats.snapshot()
    m = measure_step(eng, batch[1], "cpu")
    peak = m["peak"] - m["peak_late"]
    comm = eng.mesh.stats.diff(eng.mesh.stats.snapshot(), before)
    out = dict(states=eng.model_state_bytes(), peak=peak, comm=comm)
    eng.close()
    return out
