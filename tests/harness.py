"""Run a test function on N gloo CPU ranks, reusing the rank processes across tests.

    from harness import run_ranks
    def _body(rank, world, x):            # module level, so the ranks can import it
        ...
        return value
    results = run_ranks(_body, 2, x)      # one value per rank, in rank order

Each world size gets one pool of processes (spawned once: importing torch costs seconds on two
cores), with the default gloo process group already initialised and torch set to one thread.
A rank that raises has its traceback reported; any failure or hang kills the pool (the next test
gets a fresh one), and a hang is cut off after ``timeout`` seconds with the test named.
"""
from __future__ import annotations

import atexit
import importlib
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback

DEFAULT_TIMEOUT = float(os.environ.get("P3D_TEST_TIMEOUT", 180))
_pools: dict[int, "RankPool"] = {}


class RankFailure(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forget_groups():
    """Destroy the groups the task's meshes made (parallel/mesh.py caches them per shape) and collect,
    so a long-lived rank does not accumulate process groups and their gloo threads across tasks."""
    import gc

    from parallel.mesh import release_meshes
    release_meshes(destroy=True)
    gc.collect()


def _worker(rank, world, port, tasks, results, paths):
    import datetime
    for p in paths:
        if p not in sys.path:
            sys.path.insert(0, p)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT))
        results.put((rank, "ready", None))
    except Exception:
        results.put((rank, "err", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        mod_name, mod_dir, qualname, args, kwargs = task
        try:
            if mod_dir not in sys.path:
                sys.path.insert(0, mod_dir)
            obj = importlib.import_module(mod_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            out = obj(rank, world, *args, **kwargs)
            results.put((rank, "ok", out))
        except BaseException:
            results.put((rank, "err", traceback.format_exc()))
        _forget_groups()          # every rank, after every task: groups do not pile up in the pool
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world: int, start_timeout: float = 120.0):
        ctx = mp.get_context("spawn")
        self.world = world
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        here = os.path.dirname(os.path.abspath(__file__))
        paths = [here, os.path.dirname(here)]
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.tasks[r], self.results, paths),
                                  daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()
        self._collect("starting the rank pool", start_timeout, expect="ready")

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)

    def _collect(self, name: str, timeout: float, expect: str = "ok") -> list:
        deadline = time.monotonic() + timeout
        out, errors = {}, {}
        grace = None                                  # set at the first failure: a reported error or a dead rank
        while len(out) + len(errors) < self.world:
            # After the first failure the other ranks get a short grace period, then the pool dies: a rank that
            # crashed without reporting fails the test in seconds, not at the timeout.
            now = time.monotonic()
            try:
                rank, status, value = self.results.get(timeout=max(min(deadline, grace or deadline) - now, 0.01)
                                                       if grace else max(min(deadline - now, 1.0), 0.01))
            except queue.Empty:
                missing = sorted(set(range(self.world)) - set(out) - set(errors))
                dead = [r for r in missing if not self.procs[r].is_alive()]
                now = time.monotonic()
                if dead and grace is None:
                    grace = now + 3.0
                if now < deadline and (grace is None or now < grace):
                    continue
                codes = {r: self.procs[r].exitcode for r in dead}
                self.kill()
                if errors:
                    break
                why = f"ranks {dead} died (exit codes {codes})" if dead else f"timed out after {timeout:.0f}s"
                raise RankFailure(f"{name}: {why}; ranks {missing} never finished") from None
            if status == expect:
                out[rank] = value
            else:
                errors[rank] = value
                grace = grace or time.monotonic() + 3.0
        if errors:
            self.kill()
            msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise RankFailure(f"{name}: {len(errors)} of {self.world} ranks failed\n{msg}")
        return [out[r] for r in range(self.world)]

    def run(self, fn, args, kwargs, timeout: float, name: str) -> list:
        mod = sys.modules[fn.__module__]
        task = (fn.__module__, os.path.dirname(os.path.abspath(mod.__file__)), fn.__qualname__, args, kwargs)
        for q in self.tasks:
            q.put(task)
        return self._collect(name, timeout)


def run_ranks(fn, world: int, *args, timeout: float | None = None, **kwargs) -> list:
    """Run ``fn(rank, world, *args, **kwargs)`` on every rank of a ``world``-rank gloo pool."""
    pool = _pools.get(world)
    if pool is None or not pool.alive():
        pool = _pools[world] = RankPool(world)
    name = os.environ.get("PYTEST_CURRENT_TEST", fn.__qualname__).split(" ")[0]
    try:
        return pool.run(fn, args, kwargs, timeout or DEFAULT_TIMEOUT, name)
    except BaseException:
        pool.kill()
        _pools.pop(world, None)
        raise


@atexit.register
def shutdown() -> None:
    for pool in _pools.values():
        for q in pool.tasks:
            try:
                q.put(None)
            except Exception:
                pass
        for p in pool.procs:
            p.join(3)
        pool.kill()
    _pools.clear()
