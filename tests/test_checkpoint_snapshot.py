"""The lazy host snapshot of an asynchronous checkpoint (parallel.checkpoint.snapshot, issue 25 item 4): planned
once, copied on the writer thread while the next step's forward and backward run, the next optimizer update
waiting for the copy — the checkpoint equal to a synchronous save of the same state, tensor for tensor, with the
copy delayed past the next update's start; the plan rebuilt (on every rank) when a load replaces the state."""
import os

import torch
from engine_cases import config, layout
from harness import run_ranks


def _body(rank, world, d):
    import threading
    import time

    import parallel.checkpoint.snapshot as S
    from examples.gpt import random_tokens
    from parallel.checkpoint.async_save import AsyncSaver
    from parallel.checkpoint.sharded import load_full, read_meta
    from parallel.config import import_object
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    from parallel.mesh import Mesh

    cfg = config("gpt", layout(2, 1, 1, 1), world)
    torch.manual_seed(0)
    eng = parallelize(import_object(cfg.model.factory, "m")(**cfg.model.kwargs), cfg, Mesh(dp=2))
    data = random_tokens(n=64, seq_len=16, vocab_size=64)
    copy, i = S.SnapshotPlan._copy, [0]

    reached = threading.Event()              # set when an update starts (added before the saver's guard)
    eng.add_callback(lambda phase, step: reached.set() if phase == "optimizer" else None)

    def slow_copy(self, eager):              # the writer's copy starts once the next update has begun
        if not eager:
            assert reached.wait(60)
            time.sleep(0.1)
        return copy(self, eager)

    def step():
        eng.train_step(rank_batch(data, i[0], 8, 2, rank))
        i[0] += 1

    def tensors(p):
        m = read_meta(p)
        return load_full(p, sorted(m["shapes"]), m)

    S.SnapshotPlan._copy = slow_copy
    saver, out = AsyncSaver(eng), []
    try:
        for r in range(3):
            step()
            sync = eng.save(os.path.join(d, f"sync_{r}"), {})
            if r == 2:                       # a load replaces the optimizer state: the plan no longer serves
                eng.load(sync)
            reached.clear()
            saver.save(os.path.join(d, f"async_{r}"), {})
            step()                           # its update waits for the delayed copy
            step()
            saver.wait()
            out.append((dict(saver.stats), saver.plan.bytes, tensors(os.path.join(d, f"async_{r}")),
                        tensors(sync)))
    finally:
        S.SnapshotPlan._copy = copy
        eng.close()
    return out


def test_lazy_snapshot_equals_a_synchronous_save_and_is_copied_off_the_step_boundary(tmp_path):
    res = run_ranks(_body, 2, str(tmp_path), timeout=180)
    for rank, out in enumerate(res):
        owned = out[0][1]
        assert owned > 0
        for r, (stats, nbytes, a, s) in enumerate(out):
            assert sorted(a) == sorted(s) and len(a) > 10, (rank, r)
            bad = [k for k in a if not torch.equal(a[k], s[k])]
            assert not bad, (rank, r, bad[:3])
            assert stats["stall_bytes"] == 0, stats              # a GPT has no persistent buffers to copy at once
            assert stats["plans"] == (1 if r < 2 else 2), stats  # rebuilt after the load, on both ranks
            assert nbytes == owned
            # every owned byte copied by the writer thread, once per save (since the last plan)
            assert stats["background_bytes"] == owned * (r + 1 if r < 2 else 1), (r, stats, owned)
            assert stats["waited_s"] >= 0.09, stats               # the update did wait for the late copy
    # ZeRO-1 over dp 2: the two ranks' partitions are the model's elements once (12 bytes each: master + Adam's two)
    n = sum(p.numel() for p in _model().parameters())
    assert res[0][0][1] + res[1][0][1] == 12 * n


def _model():
    from parallel.config import import_object
    cfg = config("gpt")
    torch.manual_seed(0)
    return import_object(cfg.model.factory, "m")(**cfg.model.kwargs)
