"""Tiered tensor store: exact round trips and byte counts on every medium, prefetch hits, copy-on-write
under ENOSPC, configuration errors, bounded streaming of optimizer sub-groups, CPU AdamW kernel choice."""
import errno
import os

import pytest
import torch

from parallel.config import OffloadConfig
from parallel.offload import (
    AdamWKernel,
    BuffersExhaustedError,
    CpuStore,
    DeviceStore,
    NvmeStore,
    StoreConfigError,
    StoreError,
    StoreFullError,
    aio,
    cpu_adamw_candidates,
    fastest_cpu_adamw,
    make_store,
    stream_update,
)
from parallel.offload.aio import ALIGN, align_up

BUF = 16 << 10                      # small IO buffers so tests cross buffer and chunk boundaries


def _nvme(tmp_path, direct=True, **kw):
    kw = {"buffer_count": 4, "buffer_bytes": BUF, "chunk_bytes": 2 * ALIGN, "workers": 2, **kw}
    return NvmeStore(str(tmp_path), direct=direct, **kw)


@pytest.fixture(params=["cpu", "nvme", "nvme-buffered", "device"])
def store(request, tmp_path):
    s = {"cpu": lambda: CpuStore(), "device": lambda: DeviceStore(),
         "nvme": lambda: _nvme(tmp_path), "nvme-buffered": lambda: _nvme(tmp_path, direct=False)}[request.param]()
    yield s
    s.close()


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        return torch.randint(-2**62, 2**62, shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g).to(dtype)


# 1 element, 3·1025 (odd, not a page multiple), 4097·2 (> 4 KiB even in 16 bits; > one 16 KiB buffer in
# 64 bits, so chunked), a 0-dim scalar and an empty tensor
SHAPES = [(1,), (3, 1025), (4097, 2), (), (0, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]


def test_round_trip_exact_and_counted(store):
    vals = {f"{d}-{i}": _rand(s, d, i) for d in DTYPES for i, s in enumerate(SHAPES)}
    vals["odd-view"] = _rand((33, 17), torch.float32, 99).t()            # non-contiguous input
    snap = {k: v.clone() for k, v in vals.items()}
    handles = [store.put(k, v) for k, v in vals.items()]
    if store.medium != "device":                                         # put snapshots the value
        for v in vals.values():
            v.zero_()
    for h in handles:
        h.wait()
    store.flush()
    expect = snap if store.medium != "device" else vals
    nbytes = sum(v.numel() * v.element_size() for v in snap.values())
    fit = {k: v for k, v in expect.items() if align_up(v.numel() * v.element_size()) <= BUF}
    for k, v in fit.items():
        got = store.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
        store.release(k)
    for k, v in expect.items():                                           # any size, chunked when large
        out = torch.empty(v.shape, dtype=v.dtype)
        assert torch.equal(store.get(k, out=out), v) and store.meta(k).nbytes == v.numel() * v.element_size()
    s = store.stats
    fit_bytes = sum(v.numel() * v.element_size() for v in fit.values())
    assert (s["writes"], s["bytes_written"]) == (len(vals), nbytes)
    if store.medium == "nvme":
        assert s["disk_bytes_written"] == sum(align_up(v.numel() * v.element_size()) for v in snap.values())
        nonempty = [v for v in fit.values() if v.numel()]
        assert s["reads"] == len(fit) + len(vals) and s["bytes_read"] == fit_bytes + nbytes
        assert s["disk_bytes_read"] == sum(align_up(v.numel() * v.element_size()) for v in nonempty) + \
            sum(align_up(v.numel() * v.element_size()) for v in snap.values())
        assert s["peak_buffers"] <= 4 and s["buffers_in_use"] == 0
    else:
        assert (s["reads"], s["bytes_read"], s["hits"]) == (len(fit) + len(vals), fit_bytes + nbytes,
                                                            len(fit) + len(vals))
    assert set(store.keys()) == set(vals) and len(store) == len(vals)


def test_nvme_o_direct_active_and_fallback(tmp_path, monkeypatch):
    s = _nvme(tmp_path)
    assert s.direct and s.direct_reason == ""                        # ext4 here; tmpfs would fall back
    s.close()
    assert os.listdir(tmp_path) == []                                 # close removes the store file
    monkeypatch.delattr(os, "O_DIRECT")
    s = _nvme(tmp_path)
    assert not s.direct and "O_DIRECT" in s.direct_reason
    s.put("x", torch.arange(5.0)).wait()
    assert torch.equal(s.get("x"), torch.arange(5.0))
    s.close()


def test_direct_probe_reports_einval(tmp_path, monkeypatch):
    real = os.open

    def no_direct(path, flags, *a):
        if flags & aio.os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *a)
    monkeypatch.setattr(os, "open", no_direct)
    ok, why = aio.probe_direct(str(tmp_path))
    assert not ok and "Invalid argument" in why and str(tmp_path) in why


def test_prefetch_makes_get_a_hit(tmp_path):
    s = _nvme(tmp_path)
    a, b = torch.randn(300), torch.randn(301)
    s.put("a", a), s.put("b", b)
    s.flush()
    s.prefetch(["a"])
    s.flush()                                                       # the read has landed
    before = s.stats
    assert torch.equal(s.get("a"), a)
    after = s.stats
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    assert after["wait_s"] == before["wait_s"] and after["reads"] == before["reads"]
    assert torch.equal(s.get("b"), b)                               # not prefetched: a counted wait
    end = s.stats
    assert end["misses"] == after["misses"] + 1 and end["reads"] == after["reads"] + 1 and end["wait_s"] > 0
    s.close()


def test_resident_copy_follows_puts(tmp_path):
    s = _nvme(tmp_path)
    s.put("a", torch.zeros(10)).wait()
    x = s.get("a")
    s.put("a", torch.ones(10)).wait()                               # another tensor: copied into x
    assert torch.equal(x, torch.ones(10))
    x.mul_(3)
    h = s.put("a", x)                                               # the resident copy itself: zero-copy
    s.release("a")
    h.wait()
    assert torch.equal(s.get("a"), torch.full((10,), 3.0))
    with pytest.raises(StoreError, match="release"):
        s.put("a", torch.ones(11))
    s.close()


def test_buffers_exhausted_is_an_error_not_a_hang(tmp_path):
    s = _nvme(tmp_path, buffer_count=2)
    for k in "abc":
        s.put(k, torch.full((8,), float(ord(k))))
    s.get("a"), s.get("b")
    with pytest.raises(BuffersExhaustedError, match=r"\['a', 'b'\].*buffer_count"):
        s.get("c")
    writes = s.stats["writes"]
    with pytest.raises(BuffersExhaustedError):                     # no buffer to stage a new key in
        s.put("d", torch.zeros(8))
    assert "d" not in s and s.stats["writes"] == writes
    s.release("a")
    assert torch.equal(s.get("c"), torch.full((8,), float(ord("c"))))
    s.release("b"), s.release("c")
    with pytest.raises(StoreConfigError, match="buffer_mb"):       # larger than one buffer: out= only
        s.put("big", torch.zeros(BUF))
        s.get("big")
    s.close()


class _FailingWriter:
    """os.pwrite that, once armed, writes ``allow`` more bytes (whole calls) and then raises ENOSPC."""

    def __init__(self):
        self.allow = None

    def __call__(self, fd, buf, offset):
        if self.allow is None:
            return os.pwrite(fd, buf, offset)
        if self.allow <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = os.pwrite(fd, buf[:min(len(buf), self.allow)], offset)
        self.allow -= n
        return n


@pytest.mark.parametrize("direct", [True, False])
def test_enospc_keeps_committed_copy(tmp_path, direct):
    w = _FailingWriter()
    s = _nvme(tmp_path, direct=direct, pwrite=w)
    old, big_old = torch.randn(3000), torch.randn(3 * BUF // 4)     # 12 KB (3 chunks); 48 KB (3 buffers)
    s.put("a", old), s.put("big", big_old)
    s.flush()
    size = s.file_bytes
    w.allow = ALIGN                                                  # one block lands, then the disk is full
    with pytest.raises(StoreFullError, match=r"put\('a'\).*intact.*nvme_path"):
        s.put("a", torch.randn(3000)).wait()
    assert torch.equal(s.get("a"), old)
    s.release("a")
    w.allow = 0
    s.put("big", torch.randn(3 * BUF // 4))                          # chunked through three buffers
    s.put("new", torch.randn(10))
    with pytest.raises(StoreFullError, match=r"2 put\(s\) failed.*'big'.*'new'"):
        s.flush()
    s.flush()                                                        # reported once
    assert "new" not in s and s.stats["buffers_in_use"] == 0
    out = torch.empty_like(big_old)
    assert torch.equal(s.get("big", out=out), big_old)
    w.allow = None                                                   # space freed: the store works again
    s.put("a", old * 2).wait()
    assert torch.equal(s.get("a"), old * 2) and s.file_bytes <= size + align_up(old.nbytes)
    s.close()


def test_rewrites_reuse_space(tmp_path):
    s = _nvme(tmp_path)
    for i in range(10):
        s.put("a", torch.full((3000,), float(i)))
    s.flush()
    assert s.file_bytes <= 2 * align_up(3000 * 4)       # copy-on-write: at most two extents
    assert torch.equal(s.get("a"), torch.full((3000,), 9.0))
    s.close()


def test_configuration_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(StoreConfigError, match=f"{missing}.*does not exist.*mkdir -p"):
        NvmeStore(str(missing))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreConfigError, match="not a directory"):
        NvmeStore(str(f))
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.open

    def denied(path, flags, *a):
        if str(path).startswith(str(ro)):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path, flags, *a)
    monkeypatch.setattr(os, "open", denied)                          # root ignores chmod; deny explicitly
    with pytest.raises(StoreConfigError, match="not writable.*Permission denied"):
        NvmeStore(str(ro))
    monkeypatch.undo()
    with pytest.raises(StoreConfigError, match="nvme_path is not set"):
        make_store("nvme", OffloadConfig(optimizer="nvme"))
    with pytest.raises(StoreConfigError, match="unknown offload medium 'disk'"):
        make_store("disk")
    s = make_store("nvme", OffloadConfig(nvme_path=str(tmp_path), buffer_count=2, buffer_mb=0.25), name="r0.bin")
    assert s.file == str(tmp_path / "r0.bin") and s.buffer_bytes == 256 << 10
    with pytest.raises(StoreConfigError, match=r"bytes \(.*GiB\) free but the store needs .*copy-on-write"):
        s.reserve(1 << 60)
    s.reserve(1 << 20)                                               # preallocated: state + 2 buffers
    assert s.file_bytes == (1 << 20) + 2 * (256 << 10)
    s.put("x", torch.arange(7)).wait()
    assert torch.equal(s.get("x"), torch.arange(7))
    s.close()
    for st in (CpuStore(), DeviceStore(), _nvme(tmp_path)):
        with pytest.raises(KeyError, match="no tensor stored under key 'zz'"):
            st.get("zz")
        with pytest.raises(TypeError, match="needs a torch.Tensor"):
            st.put("k", [1, 2])
        st.put("k", torch.zeros(3))
        with pytest.raises(ValueError, match=r"out is \(4,\).*stored tensor is \(3,\)"):
            st.get("k", out=torch.zeros(4))
        st.close()
    assert CpuStore().pin_memory == torch.cuda.is_available()


# --- streaming the optimizer step over sub-groups ------------------------------------------------------
SIZES = [37, 300, 129, 1, 533, 1000]                               # odd, uneven sub-groups of a 2000-element partition
HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _reference(kernel, p0, grads):
    w = torch.nn.Parameter(p0.clone())
    opt = kernel([w], **HP)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach()


def _streamed(store, kernel, p0, grads, buffers, depth):
    groups = []
    for i, (p, n) in enumerate(zip(p0.split(SIZES), SIZES)):
        store.put(f"p{i}", p), store.put(f"m{i}", torch.zeros(n)), store.put(f"v{i}", torch.zeros(n))
        store.put(f"s{i}", torch.zeros(()))
        groups.append((f"p{i}", f"m{i}", f"v{i}", f"s{i}"))
    store.flush()
    peaks = []
    for g in grads:
        parts = g.split(SIZES)

        def fn(i, t, parts=parts):
            p, m, v, s = t
            kernel.step([p], [parts[i]], [m], [v], [s], **HP)
        st = stream_update(store, groups, fn, buffers=buffers, prefetch_depth=depth)
        assert st.subgroups == len(SIZES) and st.prefetched == (len(SIZES) - 1 if depth else 0)
        peaks.append(st.peak_resident)
    out = torch.empty(sum(SIZES))
    for i, part in enumerate(out.split(SIZES)):
        store.get(f"p{i}", out=part)
    assert store.get("s0").item() == len(grads)
    return out, max(peaks)


@pytest.mark.parametrize("medium,buffers,depth", [("cpu", 2, 1), ("nvme", 2, 1), ("nvme", 3, 2), ("nvme", 1, 0)])
def test_stream_update_equals_whole_partition_adamw(tmp_path, medium, buffers, depth):
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(sum(SIZES), generator=gen)
    grads = [torch.randn(sum(SIZES), generator=gen) for _ in range(3)]
    single = AdamWKernel("torch-single", {"foreach": False, "fused": False})
    ref = _reference(single, p0, grads)
    store = CpuStore() if medium == "cpu" else _nvme(tmp_path, buffer_count=4 * buffers)
    got, peak = _streamed(store, single, p0, grads, buffers, depth)
    assert torch.equal(got, ref)                                     # elementwise: bit-identical
    assert peak == buffers                                           # the bound is reached, never passed
    if medium == "nvme":
        assert store.stats["peak_buffers"] <= 4 * buffers
    store.close()


def test_stream_update_rejects_bad_bounds(tmp_path):
    s = _nvme(tmp_path, buffer_count=4)
    s.put("a", torch.zeros(3)), s.put("b", torch.zeros(3))
    with pytest.raises(StoreConfigError, match="prefetch_depth=2 needs buffers ≥ 3"):
        stream_update(s, ["a"], lambda i, t: None, buffers=2, prefetch_depth=2)
    with pytest.raises(StoreConfigError, match="needs 6 store buffers, the store has 4"):
        stream_update(s, [("a", "b")], lambda i, t: None, buffers=3, prefetch_depth=1)
    st = stream_update(s, ["a", "b"], lambda i, t: [t[0] + i + 1], buffers=2, prefetch_depth=1)
    assert st.peak_resident == 2 and torch.equal(s.get("b"), torch.full((3,), 2.0))
    s.close()


def test_cpu_adamw_candidates_agree_and_choice_is_cached():
    kernels, skipped = cpu_adamw_candidates()
    names = [k.name for k in kernels]
    assert names[:2] == ["torch-single", "torch-foreach"] and ("torch-fused" in names or "torch-fused" in skipped)
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(sum(SIZES), generator=gen)
    grads = [torch.randn(sum(SIZES), generator=gen) for _ in range(3)]
    ref = _reference(kernels[0], p0, grads)
    for k in kernels:
        for got in (_reference(k, p0, grads), _streamed(CpuStore(), k, p0, grads, 2, 1)[0]):
            assert (got - ref).abs().max() <= 1e-6 * ref.abs().max(), k.name      # 1e-6 relative (max norm)
    best = fastest_cpu_adamw(numel=1 << 14)
    assert best.name in names and set(best.measured_s) == set(names) and best.skipped == skipped
    assert fastest_cpu_adamw(numel=1 << 14) is best                  # measured once per process
