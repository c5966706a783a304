"""Header messages per step (issue 19 item 4): only the first step's activations carry a header.

A message's header (dtype, shape: 80 bytes, ``meta_bytes`` in CommStats, both ends) is read with a
host sync (``.tolist()``) per message on CUDA. The executor learns every (tensor, src stage, dst
stage) shape in step 0, so later steps send payloads only, in batch_isend_irecv groups, and the
evaluation's forward-only schedule reuses what training learned; a gradient has its activation's
shape, known to both ends, so it never carries one. Counted on pp = 2 gloo ranks (GPT, 2 blocks,
m = 4): headers per step = [1, 0, 0] on each rank (the first activation, sent by rank 0 and
received by rank 1), and 0 in an evaluation after step 0 and after step 2.
"""
import functools

import pytest
import torch
from harness import run_ranks
from test_pipeline_runtime import BATCH, _batch

HEADER = 80


def _headers(rank, world, name, declared=False):
    import torch
    from test_pipeline_split import build

    from examples.gpt import random_tokens
    from parallel.comm import CommStats
    from parallel.mesh import Mesh
    from parallel.pipeline.runtime import PipelineExecutor, microbatches
    from parallel.pipeline.schedules import get_schedule
    from parallel.pipeline.split import split_model
    mesh = Mesh(pp=world)
    torch.manual_seed(0)
    stages = split_model(build("gpt", 2), rank, world)
    ex = PipelineExecutor(stages, get_schedule(name, world, 4), mesh.group("pp"), p2p_groups=mesh.pp_p2p_groups(),
                          act_shapes=declared)
    data = random_tokens(n=2 * BATCH, seq_len=16, vocab_size=64, seed=1)

    def count(fn):
        before = mesh.stats.snapshot()
        out.setdefault("loss", []).append(fn())
        diff = CommStats.diff(mesh.stats.snapshot(), before)
        return sum(v.get("meta_bytes", 0) for axis in diff.values() for v in axis.values()) // HEADER

    out = {"train": [], "eval": []}
    for t in range(3):
        for p in ex.params.values():
            for q in p:
                q.grad = None
        x, y = _batch(data, t)
        mbs = microbatches(x, y, 4)
        out["train"].append(count(functools.partial(ex.run, mbs)))
        if t in (0, 2):
            out["eval"].append(count(functools.partial(ex.forward, mbs)))
    out["batched"] = ex.batched
    out["grads"] = [q.grad.clone() for p in ex.params.values() for q in p]
    out["records"] = [(r.action, r.start, r.issue_s, r.wait_s, r.compute_s) for r in ex.records]
    out["span"] = ex.span
    return out


@pytest.mark.parametrize("name", ["1f1b", "zero_bubble"])
def test_no_header_after_the_first_step(name):
    res = run_ranks(_headers, 2, name)
    for rank, r in enumerate(res):
        assert r["train"] == [1, 0, 0], (rank, r)     # the first activation; no gradient carries a header
        assert r["eval"] == [0, 0], (rank, r)
        assert r["batched"] > 0
    _check_records(res, name)


def _check_records(res, name):
    """The timestamps parallel.pipeline.measured fits: one clock across the ranks' processes. Per rank
    the records tile the run's span (exchange start ≥ previous compute end, issuing within the
    exchange); across ranks no action finishes receiving before its input's producer has computed it."""
    from parallel.pipeline.schedules import get_schedule
    from parallel.pipeline.simulate import _needs
    ends = {}
    for r in res:
        prev = r["span"][0]
        for a, start, issue, wait, comp in r["records"]:
            assert start >= prev and 0 <= issue <= wait and comp > 0, (a, start, prev, issue, wait)
            prev = start + wait + comp
            ends[("G" if a.kind in "BI" else a.kind, a.microbatch, a.stage)] = prev
        assert prev <= r["span"][1]
    sc, n = get_schedule(name, 2, 4), 0
    for rank, r in enumerate(res):
        for a, start, _, wait, _ in r["records"]:
            for k in _needs(a, sc.n_stages - 1):
                if k[0] != "I" and sc.rank_of(k[2]) != rank:
                    assert start + wait >= ends[k], (a, k)
                    n += 1
    assert n == 2 * 4


def test_declared_shapes_send_no_header_at_all():
    """act_shapes=True (parallel.pipeline.shapes.declared_shapes, from the split's probe: GPT blocks keep
    the ids' dims, (b, s) → (b, s, h)): not even step 0's first activation carries a header — [0, 0, 0]
    per rank, evaluation 0 — and the losses and gradients equal the header run's exactly."""
    plain = run_ranks(_headers, 2, "zero_bubble")
    res = run_ranks(_headers, 2, "zero_bubble", True)
    for rank, (r, q) in enumerate(zip(res, plain)):
        assert r["train"] == [0, 0, 0] and r["eval"] == [0, 0], (rank, r["train"], r["eval"])
        assert r["loss"] == q["loss"]
        for a, b in zip(r["grads"], q["grads"]):
            assert torch.equal(a, b)
    assert res[1]["loss"][0] is not None


def test_declared_shapes_answer_only_what_the_probe_shows():
    """The declaration for a GPT split: (b, s) ids → (b, s, n_embd) in the stage's float dtype, on both
    ends; None under sequence parallel (seq_factor 2) and for an input of other rank (the ids' dims)."""
    from test_pipeline_split import build

    from parallel.pipeline.shapes import declared_shapes
    from parallel.pipeline.split import split_model
    torch.manual_seed(0)
    model = build("gpt", 2)
    first, = split_model(model, 0, 2)
    last, = split_model(model, 1, 2)
    from test_pipeline_split import HIDDEN as h
    sig = ((3, 16), torch.int64)
    send, recv = declared_shapes({0: first}), declared_shapes({1: last})
    assert send(0, 1, sig) == recv(0, 1, sig) == ((3, 16, h), torch.float32)
    assert recv(0, 1, ((3, 16, 2), torch.int64)) is None
    last.stage_info.seq_factor = 2
    assert recv(0, 1, sig) is None


def test_a_wrong_declaration_is_refused_by_the_sender():
    """The sender checks its activation against the declaration both ends use; a mismatch raises
    (naming both shapes and the fix) before anything is sent, never a silently misread payload."""
    from parallel.comm import CommStats, Group
    from parallel.pipeline.runtime import PipelineExecutor
    from parallel.pipeline.schedules import get_schedule
    ex = PipelineExecutor([torch.nn.Linear(2, 2)], get_schedule("1f1b", 1, 1), Group(None, "pp", [0], 0, CommStats()),
                          act_shapes=lambda src, dst, sig: (sig[0] + (8,), torch.float32))
    ex._sigs, ex._acts = [((2, 4), torch.int64)], {}
    assert ex._known(("act", 0, 0, 1), torch.zeros(2, 4, 8)) == ((2, 4, 8), torch.float32)
    assert ex._known(("act", 0, 0, 1)) == ((2, 4, 8), torch.float32)
    with pytest.raises(RuntimeError, match=r"\(2, 4, 7\).*declared \(2, 4, 8\)"):
        ex._known(("act", 0, 0, 1), torch.zeros(2, 4, 7))
