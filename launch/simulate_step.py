"""One simulated training step of rank R (``launch.simulate``, issue 25): the real ``Engine.train_step`` run on
the meta device under torch's fake process-group backend, with its collectives counted by the mesh's
:class:`parallel.comm.collectives.CommStats` exactly as on a real run, and compared per mesh axis and op (calls,
payload bytes, wire bytes) with the planner's prediction for that rank (:func:`parallel.planning.planner.predict`,
``Prediction.comm``).

What a meta step cannot do, and what stands in for it:

* data: a batch of token ids (G/dp, seq), zeros, on the host (the batch checks — padding, target counts — read
  it there) and moved to meta by the engine, from where only shapes flow; the loss's ``.item()``, the gradient
  norm's finiteness check and every other data-dependent Python branch read 0.0 / 1 / True (:class:`StepScalars`:
  a float 0.0, an integer 1 — a micro-batch's target count, which 0 would send down the empty-batch branch that
  skips the loss — a bool True), i.e. a finite step that is applied;
* data-dependent shapes: a boolean mask's positions (``nonzero``, ``x[mask]``) are none, ``bincount`` counts
  zeros and a copy to the host (counters) is zeros. This is
  where a Mixture-of-Experts layer (:mod:`parallel.moe`) routes: on meta no token is kept in any expert slot,
  but the slot buffers [E, C, h] — all the all-to-all's bytes depend on, C = ⌈cf·T·k/E⌉ — are the real ones;
  a dropless layer's C (the largest load, data) reads 1 there, so dropless layouts disagree with the planner's
  bound C = T and are reported as such;
* pipeline receives: under the fake backend nothing arrives, so a receive cannot read its sender's header
  (dtype, shape). The executor is primed as in its steady state (step ≥ 2, where both ends know every
  message's shape and no header travels): every stage-boundary message — activation forward, its gradient
  backward — has the boundary hidden state's shape (micro-batch, local sequence, hidden) in the stages'
  dtype. The executor checks every message this rank *sends* against the same table (it raises when a stage's
  output differs), so the receive shapes are confirmed by the simulated rank's own sends of the same boundary;
* what is counted: the second of two steps (the first one's one-time traffic — buffer owners, first
  headers — left out), the same steady state the planner models; control-plane traffic (axes ``control:…``,
  the fingerprints/owner exchanges) is not part of the prediction and is left out — except the MoE routing's
  (``control:cp``, ``control:ep``: blocking, in the planner's step time and its ``Prediction.control``).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from parallel.checkpoint.meta_probe import MetaScalars
from parallel.comm.collectives import CommStats

__all__ = ["simulate_step", "compare_comm"]


def _prime_pipeline(engine, shape: tuple, dtype) -> None:
    """Every stage-boundary message of the pipeline executor known as ``shape``/``dtype`` (no headers)."""
    ex = engine.executor
    known = ex._known

    def primed(key, t=None):
        tensor, i, src, dst = key
        if ex._shapes.get((tensor, src, dst)) is None and ex._sigs[i] is not None:
            ex._shapes[(tensor, src, dst)] = (ex._sigs[i], tuple(shape), dtype)
        return known(key, t)
    ex._known = primed


class StepScalars(MetaScalars):
    """``.item()`` of a meta tensor during a simulated step: True for a bool (finite, packed), 1 for an integer
    (a micro-batch's count of target tokens: 0 would take the empty-batch branch and skip the loss), 0.0 for a
    float (loss, gradient norm)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.is_meta:
            if func is torch.ops.aten._local_scalar_dense.default:
                dt = x.dtype
                return True if dt == torch.bool else 0.0 if dt.is_floating_point or dt.is_complex else 1
            if func is torch.ops.aten.nonzero.default:             # a mask's true positions: none
                return torch.empty((0, x.dim()), dtype=torch.int64, device="meta")
            if func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
                idx = []                                            # x[mask]: the mask selects nothing
                for i in args[1]:
                    idx += [torch.empty(0, dtype=torch.int64, device="meta")] * i.dim() if (
                        i is not None and i.dtype == torch.bool) else [i]
                return func(x, idx)
            dev = (kwargs or {}).get("device")
            if func is torch.ops.aten._to_copy.default and dev is not None and torch.device(dev).type == "cpu":
                return torch.zeros(x.shape, dtype=(kwargs or {}).get("dtype") or x.dtype)   # host counters
            if func is torch.ops.aten.bincount.default:            # counts per value: minlength zeros
                n = (kwargs or {}).get("minlength", args[2] if len(args) > 2 else 0)
                return torch.zeros(n, dtype=torch.int64, device="meta")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _p2p_one_by_one():
    """``dist.batch_isend_irecv`` issues its ops one by one: the fake backend has no coalescing for meta tensors.
    The counting (parallel.comm.p2p) happens before either, so the counts are those of the batched calls."""
    batched = dist.batch_isend_irecv
    dist.batch_isend_irecv = lambda ops: [op.op(op.tensor, op.peer, op.group, op.tag) for op in ops]
    try:
        yield
    finally:
        dist.batch_isend_irecv = batched


def _boundary(engine, cfg, spec) -> tuple:
    """(shape, dtype) of the hidden state between pipeline stages for one micro-batch on this rank."""
    p = cfg.parallel
    mb = cfg.data.global_batch_size // (p.dp * cfg.micro_batches)
    seq = spec.seq // max(p.cp, 1)
    if p.sequence_parallel and p.tp > 1:
        seq //= p.tp
    dtype = next(q.dtype for st in engine.stages for q in st.parameters() if q.is_floating_point())
    return (mb, seq, spec.hidden), dtype


ROUTING_CONTROL = ("control:cp", "control:ep")     # the MoE routing's control traffic: the planner's pred.control


def simulate_step(engine, cfg, mesh, spec, steps: int = 2) -> dict:
    """Run ``steps`` training steps of ``engine`` on meta; the CommStats of the last, by axis (of the control axes only
    the MoE routing's, :data:`ROUTING_CONTROL`)."""
    p = cfg.parallel
    G = cfg.data.global_batch_size // p.dp
    x = torch.zeros(G, spec.seq, dtype=torch.long)       # real token ids (zeros): the batch checks read them
    if engine.executor is not None:
        _prime_pipeline(engine, *_boundary(engine, cfg, spec))
    with StepScalars(), _p2p_one_by_one():
        for _ in range(steps):
            before = mesh.stats.snapshot()
            engine.train_step((x, x))
    got = CommStats.diff(mesh.stats.snapshot(), before)
    return {a: ops for a, ops in got.items() if not a.startswith("control:") or a in ROUTING_CONTROL}


def compare_comm(got: dict, want: dict) -> list[str]:
    """Differences between measured and predicted traffic per axis and op (calls, payload, wire bytes): a list of
    lines, empty when they agree (wire bytes to 1e-9 relative: the ring factor (N−1)/N is a float)."""
    out = []
    for axis in sorted(set(got) | set(want)):
        g, w = got.get(axis, {}), want.get(axis, {})
        for op in sorted(set(g) | set(w)):
            a, b = g.get(op), w.get(op)
            if a is None or b is None:
                out.append(f"{axis}.{op}: measured {a and (a['calls'], a['payload_bytes'])}, "
                           f"planner {b and (b['calls'], b['payload_bytes'])}")
            elif (a["calls"], a["payload_bytes"]) != (b["calls"], b["payload_bytes"]) or \
                    abs(a["wire_bytes"] - b["wire_bytes"]) > 1e-9 * max(1.0, b["wire_bytes"]):
                out.append(f"{axis}.{op}: measured {a['calls']} calls {a['payload_bytes']} B ({a['wire_bytes']:.0f} "
                           f"wire), planner {b['calls']} calls {b['payload_bytes']} B ({b['wire_bytes']:.0f} wire)")
    return out
