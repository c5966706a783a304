"""Batches loaded ahead by a background thread (parallel/prefetch.py): the same samples in the same order as
loading in the step (map-style shuffled and streaming sources), exact resume, errors at their own step,
fewer steps waiting on a slow source, and training with it equal to one process."""
import threading
import time

import pytest
import torch
from harness import run_ranks
from reference import assert_close_curve, reference_losses

from examples.gpt import random_tokens
from parallel.config import load_config
from parallel.data import rank_batch
from parallel.prefetch import Prefetcher
from parallel.stream import StreamDataset

G, DP = 8, 2


def _stream():
    return StreamDataset(lambda: ({"input_ids": torch.tensor([i, i + 1]), "labels": torch.tensor([i, i])}
                                  for i in range(1000)), shuffle_buffer=16, seed=3)


def _sources():
    return {"map, shuffled": (lambda: random_tokens(64, 8), True), "stream": (_stream, False)}


def _batches(ds, shuffle, start, stop, depth, rank=1):
    load = (lambda s: rank_batch(ds, s, G, DP, rank, seed=5, shuffle=shuffle))
    with Prefetcher(load, start, stop, depth) as p:
        return [p.get(s)[0] for s in range(start, stop)]


def _flat(b):
    return torch.cat([t.reshape(-1) for t in (b.values() if isinstance(b, dict) else b)])


@pytest.mark.parametrize("name", list(_sources()))
def test_same_samples_in_order_and_exact_resume(name):
    make, shuffle = _sources()[name]
    without = _batches(make(), shuffle, 0, 12, depth=0)
    ds = make()
    with_prefetch = _batches(ds, shuffle, 0, 12, depth=3)
    assert all(torch.equal(_flat(a), _flat(b)) for a, b in zip(without, with_prefetch))
    if name == "stream":
        assert ds.restarts == 1                          # read once, in order, by the one loading thread
    resumed = _batches(make(), shuffle, 5, 12, depth=2)  # a fresh source started at the checkpoint's step
    assert all(torch.equal(_flat(a), _flat(b)) for a, b in zip(without[5:], resumed))


def test_a_load_error_is_raised_at_its_step_and_nothing_after_is_loaded():
    loaded = []

    def load(s):
        loaded.append(s)
        if s == 3:
            raise ValueError("bad sample at step 3")
        return s
    p = Prefetcher(load, 0, 10, depth=2)
    assert [p.get(s)[0] for s in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad sample at step 3"):
        p.get(3)
    p.thread.join(5)
    assert loaded == [0, 1, 2, 3] and not p.thread.is_alive()
    with pytest.raises(RuntimeError, match=r"step 7 asked for, the next one is 4"):
        p.get(7)


def test_steps_wait_less_on_a_slow_source():
    """A source taking 20 ms per batch, a step of 120 ms: loading in the step, every step waits; with two
    batches loaded ahead only the first does (counted), and the total wait drops accordingly."""
    def load(s):
        time.sleep(0.02)
        return s

    def run(depth):
        waited, wait_s = 0, 0.0
        with Prefetcher(load, 0, 6, depth) as p:
            for s in range(6):
                batch, w_s, w = p.get(s)
                assert batch == s
                waited, wait_s = waited + w, wait_s + w_s
                time.sleep(0.12)                          # the step (sleeping releases the GIL, like torch's kernels)
        return waited, wait_s
    threads = threading.active_count()            # other tests' daemon threads may be alive: compare, not a constant
    n0, t0 = run(0)
    n2, t2 = run(2)
    assert n0 == 6 and t0 >= 6 * 0.02
    assert n2 <= 2 and t2 < t0 / 2, (n2, t2, t0)                # the first (+ one under a loaded scheduler)
    assert threading.active_count() <= threads      # the loader threads ended


class SlowTokens(torch.utils.data.Dataset):
    """``random_tokens`` taking ``delay`` seconds per sample (a slow disk or decoder)."""

    def __init__(self, delay=0.01, **kw):
        self.ds, self.delay = random_tokens(**kw), delay

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.ds[i]


def slow_tokens(delay=0.01, **kw):
    return SlowTokens(delay, **kw)


def _cfg(prefetch, world=None, metrics=None):
    cfg = load_config(data={
        "model": {"factory": "examples.gpt:build", "kwargs": {"vocab_size": 64, "seq_len": 16, "n_layer": 2,
                                                              "n_head": 2, "n_embd": 32}},
        "data": {"factory": "test_prefetch:slow_tokens", "kwargs": {"delay": 0.005, "n": 64, "seq_len": 16},
                 "global_batch_size": 8, "micro_batch_size": 2, "shuffle": True, "prefetch": prefetch},
        "parallel": {"dp": 2}, "optimizer": {"name": "adamw", "lr": 0.003},
        "train": {"steps": 4, "metrics_file": metrics}})
    return cfg.validate(world) if world else cfg


def _train(rank, world, metrics):
    from launch.train import run
    from parallel.mesh import Mesh
    return run(_cfg(2, world, metrics), Mesh(pp=1, dp=2, tp=1), print_fn=lambda *a, **k: None)["losses"]


def test_training_with_prefetch_equals_one_process(tmp_path):
    import json
    metrics = str(tmp_path / "m.jsonl")
    got = run_ranks(_train, 2, metrics, timeout=300)[0]
    assert_close_curve(got, reference_losses(_cfg(0)), 1e-5, "dp2 with prefetch 2")
    recs = [json.loads(line) for line in open(metrics)]
    assert len(recs) == 4 and all("data_wait_s" in r and r["data_waited"] in (0, 1) for r in recs)
