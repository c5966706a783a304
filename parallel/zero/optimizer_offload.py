"""The streamed, offloaded optimizer step of ZeRO (see also :mod:`parallel.zero.offload`).

**Optimizer offload** (ZeRO-Offload, Ren et al., arXiv 2101.06840, §4; ZeRO-Infinity, Rajbhandari
et al., arXiv 2104.07857, §5.1). The fp32 master weights and the Adam moments of the rank's
partition live in a :class:`~parallel.offload.TensorStore` (host memory or NVMe), 12 bytes per owned
element, never in device memory. Each bucket's owned range ``[0, n_b)`` of its shard
(``n_b = min(hi, numel) − lo``: the padding holds no state) is cut into *sub-groups* of at most
``S = buffer_bytes / 12`` elements, each stored as one ``(3, n)`` fp32 tensor ``[master; m; v]``
(one key, one IO buffer). The step streams them through ``buffer_count`` buffers, reading
``prefetch_depth`` ahead (:func:`~parallel.offload.stream_update`), and per sub-group runs

    g ← grad[s:e]   (the reduced, unscaled, clipped shard gradient)
    AdamW(master, g, m, v, t)     (the fastest CPU kernel, :func:`~parallel.offload.fastest_cpu_adamw`)
    param[s:e] ← master           (cast to the compute dtype; stage 3 with param offload: staged)

so a step reads and writes exactly 12·Σ n_b bytes (on NVMe, each sub-group rounded up to 4 KiB).
With 8-bit moments (``optimizer.state_dtype: int8``, :class:`~parallel.optim.adam8bit.Adam8bit`) a
sub-group is one uint8 tensor of 6n + 8·n_blk bytes instead (fp32 master, block-wise 8-bit m and v;
:mod:`parallel.zero.offload_int8`), cut at parameter pieces and blocks, updated bit for bit as
ZeRO with Adam8bit and no offload.
Without clipping and without an fp16 loss scale nothing global touches a bucket's gradient once it
is reduced, so the update of that bucket starts right then, inside backward (the reducer calls
:meth:`OptimizerOffload.update_early`), and the disk works while the earlier layers' backward
computes; ``step()`` updates what is left (the tied, deferred bucket) and commits. The
transaction spans both: an error, a non-finite gradient norm or a ``zero_grad()`` before
``step()`` rolls the early updates back.
AdamW is elementwise, so the sub-group split changes nothing: the result equals torch.optim.AdamW
on the whole partition (bit for bit with the single-tensor kernel).

**Parameters no dp rank had a gradient for** (``b.unused``, :mod:`parallel.zero.unused`) are left out of the
update, as torch skips a ``grad=None`` parameter: their master and moments stay as they are and their step
count does not advance. Each parameter keeps its own count, ``t − lag[(bucket, i)]`` (``lag``: the steps it
was skipped), so a sub-group is updated as runs of equal count (one kernel call, a list of slices). A bucket
this rank missed a gradient of is not updated early: whether some other rank had one is known only in
``step()``. 8-bit moments: blocks start at each piece, so a sub-group's segments (one per piece part) are
updated each at its own step or left out, as Adam8bit without offload.

**Atomic steps on NVMe.** The optimizer store (and the parameter store) are written inside a
transaction (:mod:`parallel.offload.txn`); the dp ranks agree (one all-reduce of a flag on the
control group) before anyone commits. If any rank's disk fills or an IO fails, every rank aborts:
the store keeps the state from before the step, the in-memory parameters are re-read from it, and
every rank raises :class:`~parallel.offload.StoreFullError`. The model is as it was before the
step. Cost: old and new state coexist until the commit, so the store reserves twice its size
(checked, and preallocated, at construction: too little disk is an error before training).
"""
from __future__ import annotations

import itertools
import os
import time

import torch
import torch.distributed as dist

from parallel import comm
from parallel.offload import StoreConfigError, StoreError, StoreFullError, fastest_cpu_adamw, make_store, stream_update
from parallel.offload.aio import align_up, trim_host_memory
from parallel.offload.cpu_adam import AdamWKernel
from parallel.offload.stream import stream_read
from parallel.optim.adam8bit import Adam8bit
from parallel.zero.offload_int8 import Int8Layout, plan_subgroups
from parallel.zero.param_offload import placeholder

__all__ = ["OptimizerOffload", "owned", "store_file_name"]

_ids = itertools.count()


def owned(b) -> int:
    """Elements of this rank's shard of bucket ``b`` that hold parameters (the rest is padding)."""
    return max(0, min(b.hi, b.numel) - b.lo)


def store_file_name(kind: str) -> str:
    """A file name for one of this rank's stores (unique per process and store)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return f"p3d-{kind}-rank{rank}-{os.getpid()}-{next(_ids)}.bin"


def _check_adam(factory) -> int | None:
    """Refuse what the streamed step cannot run; the block size of 8-bit moments (Adam8bit), else None."""
    probe = factory([torch.zeros(1, requires_grad=True)])
    if isinstance(probe, Adam8bit):                               # optimizer.state_dtype: int8
        return int(probe.param_groups[0]["block_size"])
    if not isinstance(probe, torch.optim.Adam):                   # AdamW subclasses Adam in torch ≥ 2.6
        raise StoreConfigError(f"zero.offload.optimizer runs a streamed CPU Adam/AdamW step; the optimizer is "
                               f"{type(probe).__name__}: use optimizer.name=adamw (or adam), "
                               f"or zero.offload.optimizer=none")
    g = probe.param_groups[0]
    bad = [k for k in ("amsgrad", "maximize", "capturable", "differentiable") if g.get(k)]
    if bad:
        raise StoreConfigError(f"zero.offload.optimizer does not support Adam options {bad}; turn them off or "
                               f"set zero.offload.optimizer=none")
    return None


class _Sink:
    """Where a sub-group's updated master goes: the parameter shard in memory, or (stage 3 with
    parameter offload) a staging shard that is written to the parameter store when complete."""

    def __init__(self, par):
        self.par = par

    @staticmethod
    def memory(b) -> torch.Tensor:
        return b.flat_param[b.lo:b.hi] if b.shard_param is None else b.shard_param

    def write(self, b, s: int, e: int, values: torch.Tensor) -> None:
        if self.par is not None and self.par.has(b):
            self.par.stage(b)[s:e].copy_(values)
        else:
            self.memory(b)[s:e].copy_(values)

    def done(self, b) -> None:
        if self.par is not None and self.par.has(b):
            self.par.put_staged(b)


class OptimizerOffload:
    """The streamed, offloaded Adam/AdamW step over one rank's partition (see the module doc)."""

    def __init__(self, cfg, buckets: list, group, optimizer_factory):
        self.block = _check_adam(optimizer_factory)              # 8-bit moments: parallel/zero/offload_int8.py
        self.store = make_store(cfg.optimizer, cfg, name=store_file_name("optim"))
        self.medium, self.group = cfg.optimizer, group
        self.buffers, self.depth = cfg.buffer_count, cfg.prefetch_depth
        per = getattr(self.store, "buffer_bytes", None) or align_up(int(cfg.buffer_mb * 2 ** 20))
        self.sub = max(1, per // 12)                              # elements per sub-group (fp32)
        self.subgroups: list = []                                 # (key, bucket, s, e), shard coordinates
        self.layouts: list = []                                   # int8: an Int8Layout per sub-group
        self._last: dict = {}                                     # bucket -> index of its last sub-group
        for b in buckets:
            n = owned(b)
            if self.block:
                cuts = plan_subgroups([(a - b.lo, e - b.lo) for _, a, e in b.pieces()], n, per, self.block)
            else:
                cuts = [(s, min(n, s + self.sub), None) for s in range(0, n, self.sub)]
            for k, (s, e, segs) in enumerate(cuts):
                self.subgroups.append((f"opt/{b.index}/{k}", b, s, e))
                self.layouts.append(Int8Layout(segs, self.block) if self.block else None)
                self._last[b] = len(self.subgroups) - 1
        self.numel = sum(e - s for _, _, s, e in self.subgroups)
        sizes = [lay.nbytes if lay else 12 * (e - s) for lay, (_, _, s, e) in zip(self.layouts, self.subgroups)]
        self.state_bytes = sum(sizes)                             # fp32: 12 per element; int8: 6 + 8 per block
        self.moment_bytes = sum(lay.moment_bytes for lay in self.layouts) if self.block else 8 * self.numel
        self.disk_bytes = sum(align_up(x) for x in sizes)
        if self.medium == "nvme":
            try:
                self.store.reserve(2 * self.disk_bytes)           # old + new copies inside a step
            except BaseException:
                self.store.close()                                # leave no file behind
                raise
        self.t = 0
        self.lag: dict = {}                                       # (bucket index, param) -> steps skipped
        self.kernel = None
        self.optimizer = None
        self.sink = None
        self.materialized = False
        self.last: dict = {}                                      # the last step's IO figures
        self._early = None                                        # the open step (update_early … step)

    # --- construction -------------------------------------------------------------------------------
    def add_bucket(self, b) -> None:
        """Write ``b.master``'s owned range (and zero moments) to the store; ``b.master`` becomes a
        placeholder. Called once per bucket right after it is initialised."""
        self._write_bucket(b, b.master, None, None)
        b.master = placeholder(b.shard, torch.float32, b.master.device)

    def _write_bucket(self, b, master, m, v) -> None:
        for (key, bb, s, e), lay in zip(self.subgroups, self.layouts):
            if bb is b and lay is not None:
                self.store.put(key, lay.pack(master[s:e], None if m is None else m[s:e], None if v is None else v[s:e]))
            elif bb is b:
                x = torch.zeros(3, e - s, dtype=torch.float32)
                x[0].copy_(master[s:e])
                if m is not None:
                    x[1].copy_(m[s:e])
                    x[2].copy_(v[s:e])
                self.store.put(key, x)

    def bind(self, optimizer: torch.optim.Optimizer, par) -> None:
        """Take hyper-parameters from ``optimizer.param_groups[0]`` at every step (so LR schedulers
        work) and pick the CPU kernel by measurement on a sub-group-sized partition."""
        self.optimizer, self.sink = optimizer, _Sink(par)
        self.kernel = (AdamWKernel("adam8bit-blockwise") if self.block       # Int8Layout.step, not a kernel
                       else fastest_cpu_adamw(numel=max(1, min(self.sub, self.numel, 1 << 20))))
        self.store.flush()
        trim_host_memory()                    # the per-bucket temporaries of the build go back to the OS

    # --- the step -----------------------------------------------------------------------------------
    def hyper(self) -> dict:
        g = self.optimizer.param_groups[0]
        beta1, beta2 = (float(x) for x in g["betas"])
        decoupled = g.get("decoupled_weight_decay", g.get("decoupled", isinstance(self.optimizer, torch.optim.AdamW)))
        return dict(lr=float(g["lr"]), betas=(beta1, beta2), eps=float(g["eps"]),
                    weight_decay=float(g["weight_decay"]), decoupled=bool(decoupled))

    def _stores(self) -> list:
        return [self.store] + ([self.sink.par.store] if self.sink.par is not None else [])

    def _open(self) -> dict:
        """Begin the step's transaction (once): the state the streamed updates share until commit."""
        if self._early is None:
            stores = self._stores()
            self._early = {"before": [st.stats for st in stores], "t0": time.perf_counter(), "busy": [0.0],
                           "done": set(), "error": None, "hp": self.hyper(), "t": self.t, "prefetched": 0,
                           "peak": 0}
            for st in stores:
                st.begin()
        return self._early

    def _stream(self, idx: list, run: dict, wait_writes: bool = True) -> None:
        """Update the sub-groups ``idx`` (global indices) from ``b.master.grad``."""
        hp, t, busy = run["hp"], run["t"], run["busy"]

        def update(j, ts):
            c0 = time.perf_counter()
            i = idx[j]
            _, b, s, e = self.subgroups[i]
            x = ts[0]
            g = b.master.grad[s:e]
            if g.device != x.device:
                g = g.to(x.device)
            runs = self._runs(b, s, e, t)
            if self.block:                       # 8-bit: a segment per piece, each at its own step or skipped
                steps = None if runs is None else self._seg_steps(b, s, self.layouts[i], t)
                master = self.layouts[i].step(x, g, t + 1, steps=steps, **hp)
            elif runs is None:
                self.kernel.step([x[0]], [g], [x[1]], [x[2]], [torch.tensor(float(t), dtype=torch.float32)], **hp)
                master = x[0]
            else:                                # unused parameters left out, each run at its own step count
                if runs:
                    self.kernel.step(*([y[a:z] for a, z, _ in runs] for y in (x[0], g, x[1], x[2])),
                                     [torch.tensor(float(c), dtype=torch.float32) for _, _, c in runs], **hp)
                master = x[0]
            self.sink.write(b, s, e, master)
            if self._last[b] == i:
                self.sink.done(b)
            busy[0] += time.perf_counter() - c0

        stats = stream_update(self.store, [self.subgroups[i][0] for i in idx], update, buffers=self.buffers,
                              prefetch_depth=self.depth, wait_writes=wait_writes)
        run["prefetched"] += stats.prefetched
        run["peak"] = max(run["peak"], stats.peak_resident)

    def _runs(self, b, s: int, e: int, t: int):
        """The shard range [s, e) of bucket ``b`` to update, as runs ``(a, z, step count before this update)``
        relative to s, leaving out the parameters in ``b.unused``; None when it is one run at count ``t``."""
        unused = getattr(b, "unused", ())
        if not unused and not self.lag:
            return None
        runs: list = []
        for i, a, z in b.pieces():
            a, z = max(a - b.lo, s), min(z - b.lo, e)
            if a >= z or i in unused:
                continue
            c = t - self.lag.get((b.index, i), 0)
            if runs and runs[-1][1] == a - s and runs[-1][2] == c:
                runs[-1][1] = z - s
            else:
                runs.append([a - s, z - s, c])
        return None if runs == [[0, e - s, t]] else runs

    def _seg_steps(self, b, s: int, layout, t: int) -> list:
        """8-bit: for each segment of ``layout`` (one per piece part) its 1-based step, None where unused."""
        unused, out = getattr(b, "unused", ()), []
        spans = [(i, a - b.lo, e - b.lo) for i, a, e in b.pieces()]
        for off, _ in layout.segs:
            i = next(i for i, a, e in spans if a <= s + off < e)
            out.append(None if i in unused else t - self.lag.get((b.index, i), 0) + 1)
        return out

    def piece_step(self, b, i: int) -> int:
        """Steps parameter ``i`` of bucket ``b`` has taken (torch's per-parameter ``step``)."""
        return self.t - self.lag.get((b.index, i), 0)

    def update_early(self, b, grad) -> None:
        """Overlap: update bucket ``b``'s sub-groups as soon as its reduced gradient exists (during
        backward), inside the step's transaction; :meth:`step` does the rest and commits. Exact when
        nothing global scales the gradient afterwards (no clipping, no fp16 loss scale: the caller
        checks). A store error is kept for :meth:`step`, which rolls every rank back."""
        run = self._open()
        if run["error"] is not None or b in run["done"] or not all(getattr(b, "had", b"")):
            return                             # a parameter may have no gradient on any rank: step() decides
        b.master.grad = grad
        try:
            # the last writes stay in flight while backward goes on; prepare() in step() waits for them
            self._stream([i for i, sg in enumerate(self.subgroups) if sg[1] is b], run, wait_writes=False)
        except StoreError as e:
            run["error"] = e
        except BaseException:
            self.discard()
            raise
        finally:
            b.master.grad = None
        run["done"].add(b)

    def discard(self) -> None:
        """Drop an open step (zero_grad or an error before step()): roll back what was updated early."""
        if self._early is not None:
            self._early = None
            self._roll_back(self._stores())

    def step(self) -> dict:
        """One update of every sub-group from ``b.master.grad`` (the ones :meth:`update_early` did are
        skipped); all-or-nothing on NVMe (module doc). Returns this step's IO figures (``self.last``)."""
        stores = self._stores()
        run = self._open()
        error = run["error"]
        try:
            if error is None:
                self._stream([i for i, sg in enumerate(self.subgroups) if sg[1] not in run["done"]], run)
                for st in stores:
                    st.prepare()
        except StoreError as e:
            error = e
        except BaseException:
            self.discard()
            raise
        atomic = any(st.medium == "nvme" for st in stores)
        if atomic and self.group.size > 1:                        # all ranks commit, or none does
            code = torch.tensor([0 if error is None else 1 if isinstance(error, StoreFullError) else 2])
            comm.all_reduce(code, self.group.control(), op="max")      # 0 ok, 1 a disk is full, 2 an IO error
            if code.item() and error is None:
                error = (StoreFullError if code.item() == 1 else StoreError)(
                    "another dp rank could not write its offloaded state "
                    f"({'disk full' if code.item() == 1 else 'IO error'})")
        if error is not None:
            self.discard()
            cls = StoreFullError if isinstance(error, StoreFullError) else StoreError
            raise cls(f"optimizer step {run['t'] + 1} was rolled back on every dp rank: {error}. The model and the "
                      f"optimizer state are as before the step. Free space on zero.offload.nvme_path (or fix the "
                      f"IO error) and run the step again") from error
        self._early = None
        for st in stores:
            st.commit()
        self.t += 1
        for b in dict.fromkeys(sg[1] for sg in self.subgroups):
            for i in getattr(b, "unused", ()):               # skipped: its step count stays behind
                self.lag[(b.index, i)] = self.lag.get((b.index, i), 0) + 1
        self.optimizer.step()      # a no-op (its params have no grads): torch's hooks and LR-scheduler checks
        after = [st.stats for st in stores]
        self.last = {"step_s": time.perf_counter() - run["t0"], "compute_s": run["busy"][0],
                     "subgroups": len(self.subgroups), "early_buckets": len(run["done"]),
                     "prefetched": run["prefetched"], "peak_resident": run["peak"],
                     "stores": [{k: a[k] - b0[k] for k in a if isinstance(a[k], (int, float))}
                                for a, b0 in zip(after, run["before"])]}
        return self.last

    def _roll_back(self, stores) -> None:
        """Abort the transactions, then rewrite the parameters from the (old) masters wherever they
        were already overwritten: in memory, and in a parameter store that commits as it goes (cpu)."""
        for st in stores:
            if st.in_transaction:
                st.abort()
        par = self.sink.par
        if par is not None:
            par.drop_staging()
        intact = par is not None and par.store.medium == "nvme"          # aborted with the optimizer's
        subs = [sg for sg in self.subgroups if not (intact and par.has(sg[1]))]
        last = {sg[1]: i for i, sg in enumerate(subs)}

        def restore(i, x):
            _, b, s, e = subs[i]
            self.sink.write(b, s, e, x[:4 * (e - s)].view(torch.float32) if self.block else x[0])
            if last[b] == i:
                self.sink.done(b)
        stream_read(self.store, [k for k, *_ in subs], restore, prefetch_depth=min(self.depth, self.buffers - 1))

    # --- checkpoints: the partition in memory for a while ----------------------------------------------
    def read_all(self, buckets) -> dict:
        """{bucket: (master, exp_avg, exp_avg_sq)} as full fp32 shards (zeros in the padding)."""
        out = {b: tuple(torch.zeros(b.shard, dtype=torch.float32) for _ in range(3)) for b in buckets}

        def take(i, x):
            _, b, s, e = self.subgroups[i]
            x = self.layouts[i].unpack(x) if self.block else x
            for j in range(3):
                out[b][j][s:e].copy_(x[j])
        stream_read(self.store, [k for k, *_ in self.subgroups], take, prefetch_depth=min(self.depth, self.buffers - 1))
        return out

    def write_all(self, state: dict, t: int, steps: dict | None = None) -> None:
        """Inverse of :meth:`read_all` (after a checkpoint load), with step count ``t`` and, where a parameter's
        own count differs, ``steps`` {(bucket index, param): count}."""
        for b, (master, m, v) in state.items():
            self._write_bucket(b, master, m, v)
        self.store.flush()
        self.t = int(t)
        self.lag = {k: self.t - int(c) for k, c in (steps or {}).items() if int(c) != self.t}

    def close(self) -> None:
        self.store.close()
