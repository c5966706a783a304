"""Disk bandwidth vs the NVMe tensor store's throughput, on the same file system, in one run.

    python benchmarks/bench_offload_io.py --dir /tmp --size-gib 1 --repeats 3

Rows (each the median of ``repeats`` interleaved repeats, GB/s = 1e9 bytes/s):

* ``dd O_DIRECT``: one thread, ``--block-mib`` sequential blocks from an aligned buffer, fsync at the
  end of the write (what ``dd oflag=direct bs=8M`` measures); read back with O_DIRECT.
* ``dd buffered``: the same through the page cache, fsync at the end; the read follows
  ``posix_fadvise(DONTNEED)`` so it comes from the disk, not the cache.
* ``NvmeStore``: ``put`` of ``--tensor-mib`` fp32 tensors then ``flush`` + fsync; the read streams
  them back with ``prefetch`` (depth 2) → ``get`` → ``release``, as the optimizer and layer streaming do.
  Its bytes include the copy into the staging buffer, so it is the throughput a caller sees.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from parallel.offload import NvmeStore  # noqa: E402
from parallel.offload.aio import aligned_empty, byte_view, probe_direct  # noqa: E402


def dd(path: str, size: int, block: int, direct: bool) -> tuple[float, float]:
    buf = aligned_empty(block)
    buf.random_(0, 255)
    mv = byte_view(buf)
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o600)
    try:
        t0 = time.perf_counter()
        for off in range(0, size, block):
            os.pwrite(fd, mv, off)
        os.fsync(fd)
        w = time.perf_counter() - t0
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for off in range(0, size, block):
            os.preadv(fd, [mv], off)
        r = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
    return size / w / 1e9, size / r / 1e9


def store_io(dirpath: str, size: int, tensor_bytes: int, buffer_count: int, workers: int) -> tuple[float, float, dict]:
    n = size // tensor_bytes
    src = torch.randn(tensor_bytes // 4)
    with NvmeStore(dirpath, buffer_count=buffer_count, buffer_bytes=tensor_bytes, workers=workers,
                   name="bench-store.bin") as s:
        s.reserve(size)
        t0 = time.perf_counter()
        for i in range(n):
            s.put(f"t{i}", src)
        s.flush()
        fd = os.open(s.file, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        w = time.perf_counter() - t0
        keys = [f"t{i}" for i in range(n)]
        t0 = time.perf_counter()
        s.prefetch(keys[:2])
        for i, k in enumerate(keys):
            s.prefetch(keys[i + 1:i + 3])
            s.get(k)
            s.release(k)
        r = time.perf_counter() - t0
        assert torch.equal(s.get(keys[-1]), src)
        stats = s.stats
        stats["direct"] = s.direct
    return n * tensor_bytes / w / 1e9, n * tensor_bytes / r / 1e9, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--block-mib", type=int, default=8)
    ap.add_argument("--tensor-mib", type=int, default=64)
    ap.add_argument("--buffers", type=int, default=4)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    tensor = a.tensor_mib << 20
    size = int(a.size_gib * 2**30) // tensor * tensor
    ok, why = probe_direct(a.dir)
    print(f"# {size / 2**30:.2f} GiB in {a.dir}; O_DIRECT: {'yes' if ok else 'no (' + why + ')'}; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    rows = {"dd O_DIRECT (1 thread)": [], "dd buffered + fsync": [], "NvmeStore": []}
    last = {}
    dd_file = os.path.join(a.dir, "bench-dd.bin")
    for _ in range(a.repeats):                                  # interleaved, so load drifts hit all rows
        if ok:
            rows["dd O_DIRECT (1 thread)"].append(dd(dd_file, size, a.block_mib << 20, True))
        rows["dd buffered + fsync"].append(dd(dd_file, size, a.block_mib << 20, False))
        w, r, last = store_io(a.dir, size, tensor, a.buffers, a.workers)
        rows["NvmeStore"].append((w, r))
    print("\n| method | write GB/s | read GB/s |\n|---|---|---|")
    for name, vals in rows.items():
        if vals:
            w_med, r_med = statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals)
            print(f"| {name} | {w_med:.2f} | {r_med:.2f} |")
    print(f"\nNvmeStore: {a.tensor_mib} MiB tensors, {a.buffers} buffers, {a.workers} IO threads, "
          f"O_DIRECT {last.get('direct')}; last repeat's counters: writes {last.get('writes')}, "
          f"reads {last.get('reads')}, disk bytes written {last.get('disk_bytes_written')}, "
          f"read {last.get('disk_bytes_read')}, get wait {last.get('wait_s', 0):.2f} s, hits {last.get('hits')}, "
          f"misses {last.get('misses')}")


if __name__ == "__main__":
    main()
