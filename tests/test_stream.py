"""Streaming sources under the parity contract (parallel/stream.py): positions, exact resume, seeded
shuffle buffer, and the refusals."""
import pytest
import torch

from parallel.config import ConfigError, load_config
from parallel.data import global_indices, rank_batch
from parallel.stream import StreamDataset


def _numbers(n=100):
    return lambda: ({"input_ids": torch.tensor([i]), "labels": torch.tensor([i])} for i in range(n))


def stream(n=100, length=None, shuffle_buffer=0):
    return StreamDataset(_numbers(n), length=length, shuffle_buffer=shuffle_buffer)


def test_positions_and_exact_resume():
    G, dp = 8, 2
    run = [stream(), stream()]                          # one per dp rank, read step after step
    seen = {r: [] for r in range(dp)}
    for step in range(5):
        for r in range(dp):
            seen[r].append(rank_batch(run[r], step, G, dp, r)["input_ids"].reshape(-1).tolist())
    assert [x for s in range(5) for r in range(dp) for x in seen[r][s]] == list(range(40))
    assert all(ds.restarts == 1 for ds in run)          # read once, in order
    fresh = stream()                                    # a resumed rank 1 at step 3: skips 3·G samples, exact
    assert rank_batch(fresh, 3, G, dp, 1)["input_ids"].reshape(-1).tolist() == seen[1][3]
    wrap = stream(n=20, length=20)                      # epochs wrap at the known length
    idx = global_indices(2, G, len(wrap))
    assert [wrap[i]["input_ids"].item() for i in idx] == [16, 17, 18, 19, 0, 1, 2, 3]


def test_shuffle_buffer_is_seeded_and_layout_free():
    a = [stream(shuffle_buffer=16)[i]["input_ids"].item() for i in range(100)]
    b = stream(shuffle_buffer=16)
    assert [b[i]["input_ids"].item() for i in range(0, 100, 3)] == a[::3]
    assert sorted(a) == list(range(100)) and a != list(range(100))


def test_stream_errors():
    with pytest.raises(IndexError, match=r"the stream ended after 10 samples, before position 12; pass length="):
        stream(n=10)[12]
    from launch.train import build_dataset
    cfg = load_config(data={"model": {"factory": "examples.gpt:build"},
                            "data": {"factory": "test_stream:stream", "shuffle": True}})
    with pytest.raises(ConfigError, match=r"returns a stream .* set data.shuffle=false and give it shuffle_buffer"):
        build_dataset(cfg)
