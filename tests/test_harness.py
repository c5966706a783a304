"""The rank pool of tests/harness.py: a rank process that dies without reporting (a segfault, os._exit in a
native library) fails the call within seconds, naming the rank and its exit code — not at the timeout."""
import os
import time

import pytest
from harness import RankFailure, run_ranks


def _die_on_rank_1(rank, world):
    if rank == 1:
        os._exit(7)
    time.sleep(30)                       # rank 0 would wait for rank 1 in a real collective
    return rank


def _rank(rank, world):
    return rank


def test_a_rank_that_dies_silently_fails_the_call_in_seconds():
    assert run_ranks(_rank, 2) == [0, 1]                      # the pool is up (its start is not timed)
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"ranks \[1\] died \(exit codes \{1: 7\}\)"):
        run_ranks(_die_on_rank_1, 2, timeout=120)
    assert time.monotonic() - t0 < 15                         # was the whole timeout: 120 s here
