"""Hardware calibration of the benchmark protocol, run on all ranks at once (inside an initialised
gloo process group), at the start and at the end of a run.

Figures (a flat dict, so start and end compare key by key):
* ``matmul_flops``: fp32 FLOP/s of the model's own matmul shapes at the per-rank token count T —
  (T,h)·(h,3h), (T,h)·(h,h), (T,h)·(h,4h), (T,4h)·(4h,h), (T,h)·(h,V); 2·T·k·n FLOPs each;
* ``mem_bw``: bytes/s of c = a + b over tensors larger than the caches (3 · bytes(a) moved);
* ``train_flops``: model FLOP/s (per-rank tokens · (6N + 12Lhs)) of the model's own forward +
  backward on the per-rank batch, no communication, no optimizer: what the matmuls achieve once
  norms, attention, activations and the autograd walk are around them (the planner's compute rate); timed
  first and last in the calibration (``train_flops_first``, ``train_flops_last``) and the faster taken
  (records before session 13 hold one reading, taken after ``mem_bw``: read as recorded);
  ``train_flops@<m>`` the same at m sequences (``micro``: the pipeline rows' micro-batch, whose small
  matmuls and per-call overheads run well below the per-rank batch's rate);
* ``split_i@<m>``, ``split_w@<m>``: the zero-bubble I/W split (parallel/pipeline/backward_split.py, what
  the executor's I and W actions run) of a stage with an input gradient — the model's second half of blocks,
  final norm, head and loss, fed a hidden state of m sequences — in seconds ÷ that stage's plain
  backward (B = I + W in FLOPs): the split's own cost (one engine call for I, one per weight group for
  W, the capture hooks) at the pipeline rows' micro-batch, which the planner's ZB schedules take
  (``Hardware.split_frac``); ``comm_bytes``: M below;
* per op and implementation (``gloo``: torch.distributed's; ``ring``: parallel/comm/ring.py):
  ``lat.<impl>.<op>`` the seconds of a call at N elements, and ``bw.<impl>.<op>`` the bus bandwidth
  wire(M) / t(M) at M bytes (as nccl-tests defines it: one latency included), with the ring
  model's wire bytes per rank: all-reduce
  2(N−1)/N·M, reduce-scatter and all-gather (N−1)/N·M, send-recv M (each rank sends M to its right
  neighbour while receiving M from its left). The ring's all-reduce is its reduce-scatter then
  all-gather. Each timing is the slowest rank's (max over ranks), median over repeats;
* ``train_flops.tp<t>@<m>``: the same rate per rank at the tp-split shapes (:func:`tp_replica`: what one of t
  tensor-parallel ranks multiplies — q/k/v h → 3h/t over n_head/t heads, o h/t → h, MLP h → 4h/t → h, a V/t
  vocabulary slice of the tied embedding and head — on the m = per·t sequences of the tp rows, no
  communication): per-rank model FLOPs (per·t sequences × (6N + 12Lhs) ÷ t) ÷ its forward + backward seconds;
  measured when tp rows run (``tp``), used by the planner for their compute (``Hardware.tp_flops``);
* ``chain.gloo.all_reduce``: the seconds a blocking gloo all-reduce of one tp activation (``per``·N sequences ×
  s × h fp32: the tp rows' message, ``chain_bytes``) adds when issued right after compute, as Megatron's f/g
  operators issue it — :data:`CHAIN_CALLS` × (a tp-split MLP matmul, then the all-reduce) minus the same matmuls
  alone, per call. Against ``lat`` + wire / ``bw`` of the isolated call it measures directly the excess that the
  planner charges each blocking tp collective (parallel/planning/time_terms.py, tp_waits: the ring pair's δ);
  benchmarks/proto_report.py prints both;
* ``host.*``: per-call host work — a tiny aten call, and with tp rows a DTensor call and a DTensor parameter's AdamW
  update beyond a plain one's (benchmarks/proto_host.py, charged per counted call on the tp_dtensor row);
* ``flat.gloo.all_reduce``, ``flat.gloo.all_gather``: gloo's bus bandwidth at ``flat_bytes`` = the model's
  Ψ·4 bytes — the one all-reduce of the whole flat gradient and the one parameter all-gather into it that
  DeepSpeed ZeRO-1/2 issue per step on CPU (benchmarks/proto_rows.py, counted with benchmarks/proto_profile.py),
  measured when those rows run (``flat``): gloo's all-gather runs far below its 4 MiB figure at that size
  (loaded, this session's 2-core machine, 2 ranks pinned: bus 0.41 GB/s at 4 MiB, 0.12 at 204 MB; the all-reduce
  0.67 → 1.56), and at 50M the 4 MiB figures left 446–491 ms of ds1/ds2's step unpriced (0.73 / 0.76, session
  11), 6–17 ms at 5M (benchmarks/proto_report.py, predict_row);
* ``fresh_page_s`` (with ``flat``, since session 13): seconds per fresh 4 KiB page — a 64 MiB copy into a new
  torch.empty minus the same copy into a touched buffer — what DeepSpeed's per-step buffers of ≥ 32 MiB cost beyond
  their copies (benchmarks/proto_ds.py; records without it: that module's FRESH_PAGE_S);
* ``wait.*``: the wait δ of a chained blocking call from 48 interleaved repetitions of the tiny ring pair and the
  two isolated calls — the pair's median and quartiles, the isolated calls' fast mode (lower decile), the
  per-repetition differences — and with tp rows a gloo all-reduce issued right after a tp matmul
  and DTensor's redistribute of the same message after the same matmul (benchmarks/proto_wait.py; ~1–3 s idle).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from benchmarks.proto_ds import calibrate_fresh_page
from benchmarks.proto_host import calibrate_host
from benchmarks.proto_wait import wait_figures
from parallel.comm.collectives import Group
from parallel.comm.ring import ring_all_gather, ring_reduce_scatter

__all__ = ["calibrate", "chained_all_reduce", "tp_call", "tp_replica", "tp_train_rate", "WIRE", "OPS", "CHAIN_CALLS"]

WIRE = {"all_reduce": lambda n: 2 * (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
        "all_gather": lambda n: (n - 1) / n, "send_recv": lambda n: 1.0}
OPS = [("gloo", "all_reduce"), ("gloo", "reduce_scatter"), ("gloo", "all_gather"), ("gloo", "send_recv"),
       ("ring", "all_reduce"), ("ring", "reduce_scatter"), ("ring", "all_gather")]


def _slowest(ts: list) -> float:
    """Median over repeats of the slowest rank's time."""
    t = torch.tensor(ts, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist())


def _timed(fn, reps: int) -> float:
    fn()                                                   # warm-up (buffers, connections)
    ts = []
    for _ in range(reps):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return _slowest(ts)


def matmul_rate(tokens: int, h: int, vocab: int, reps: int = 5) -> float:
    g = torch.Generator().manual_seed(0)
    shapes = [(tokens, h, 3 * h), (tokens, h, h), (tokens, h, 4 * h), (tokens, 4 * h, h), (tokens, h, vocab)]
    mats = [(torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)

    def run():
        for a, b in mats:
            torch.mm(a, b)
    return flops / _timed(run, reps)


def mem_bandwidth(mb: int = 32, reps: int = 5) -> float:
    n = mb * 2 ** 20 // 4
    a, b, c = torch.ones(n), torch.ones(n), torch.empty(n)
    return 3 * 4 * n / _timed(lambda: torch.add(a, b, out=c), reps)


def _op_fn(impl: str, op: str, numel: int, group: Group):
    n, r = group.size, group.rank
    numel = -(-numel // n) * n
    full, shard = torch.ones(numel), torch.ones(numel // n)
    if op == "send_recv":
        buf = torch.empty(numel)

        def sr():
            works = [dist.irecv(buf, src=(r - 1) % n), dist.isend(full, dst=(r + 1) % n)]
            for w in works:
                w.wait()
        return sr, numel * 4
    if impl == "gloo":
        rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn = {"all_reduce": lambda: dist.all_reduce(full), "reduce_scatter": lambda: rs(shard, full),
              "all_gather": lambda: ag(full, shard)}[op]
        return fn, numel * 4

    def rs():
        ring_reduce_scatter(shard, full, group)

    def ag():
        ring_all_gather(full, shard, group)

    def ar():
        rs()
        ag()
    return {"all_reduce": ar, "reduce_scatter": rs, "all_gather": ag}[op], numel * 4


CHAIN_CALLS = 16
FLAT_REPS = 3       # flat.gloo.*: 0.2–0.9 s a call at 50M (Ψ·4 = 204 MB)


def _tp_tensors(kw: dict, per: int) -> tuple:
    """(activation, tp-split MLP weight, tp message) of the tp rows at ``per`` sequences per rank."""
    n = dist.get_world_size()
    tokens, h = per * n * kw["seq_len"], kw["n_embd"]
    g = torch.Generator().manual_seed(0)
    return (torch.randn(tokens, h, generator=g), torch.randn(h, 4 * h // n, generator=g),
            torch.zeros(tokens * h))             # zeros: repeated sums stay finite


def tp_call(kw: dict, per: int, dtensor: bool = True) -> tuple:
    """(matmul, blocking gloo all-reduce, DTensor's call) callables of one tp call (benchmarks/proto_wait.py,
    wait.gloo.*, wait.dtensor.call_s): DTensor's call is the message as a Partial DTensor over the world's 1-D mesh
    redistributed to Replicate and read (RowwiseParallel's output: DTensor dispatch, ``_c10d_functional.all_reduce``
    into a fresh tensor, ``wait_tensor``); None with ``dtensor`` False."""
    a, w, x = _tp_tensors(kw, per)
    dt = None
    if dtensor:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Partial, Replicate
        mesh, x2 = init_device_mesh("cpu", (dist.get_world_size(),)), x.view(a.shape[0], -1)

        def dt():
            DTensor.from_local(x2, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()
    return (lambda: torch.mm(a, w)), (lambda: dist.all_reduce(x)), dt


def chained_all_reduce(kw: dict, per: int, reps: int = 5) -> tuple:
    """(seconds per call, message bytes) of ``chain.gloo.all_reduce`` (module docstring)."""
    a, w, x = _tp_tensors(kw, per)

    def compute():
        for _ in range(CHAIN_CALLS):
            torch.mm(a, w)

    def chain():
        for _ in range(CHAIN_CALLS):
            torch.mm(a, w)
            dist.all_reduce(x)
    t_chain = _timed(chain, reps)
    return (t_chain - _timed(compute, reps)) / CHAIN_CALLS, x.numel() * 4


def tp_replica(kw: dict, t: int):
    """examples/gpt.py's GPT with one tp rank's shapes (module docstring), on one process."""
    import torch.nn as nn

    from examples.gpt import GPT
    torch.manual_seed(0)
    model, h, V = GPT(**kw), kw["n_embd"], kw["vocab_size"]
    for b in model.blocks:
        b.attn.qkv, b.attn.proj, b.attn.n_head = nn.Linear(h, 3 * h // t), nn.Linear(h // t, h), b.attn.n_head // t
        b.mlp.fc, b.mlp.proj = nn.Linear(h, 4 * h // t), nn.Linear(4 * h // t, h)
    model.wte, model.lm_head = nn.Embedding(V // t, h), nn.Linear(h, V // t, bias=False)
    model.lm_head.weight = model.wte.weight
    return model


def tp_train_rate(kw: dict, per: int, t: int, reps: int = 5) -> float:
    """``train_flops.tp<t>@<per·t>`` (module docstring)."""
    import torch.nn.functional as F

    from parallel.planning.flops import gpt_flops_per_token
    model, m = tp_replica(kw, t), per * t
    x = torch.randint(0, kw["vocab_size"] // t, (m, kw["seq_len"]))

    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    flops = m * kw["seq_len"] * gpt_flops_per_token(kw["n_layer"], kw["n_embd"], kw["seq_len"], kw["vocab_size"])
    return flops / t / _timed(run, reps)


def train_rate(kw: dict, per: int, reps: int = 5) -> float:
    import torch.nn.functional as F

    from examples.gpt import GPT
    from parallel.planning.flops import gpt_flops_per_token
    torch.manual_seed(0)
    model = GPT(**kw)
    x = torch.randint(0, kw["vocab_size"], (per, kw["seq_len"]))

    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    flops = per * kw["seq_len"] * gpt_flops_per_token(kw["n_layer"], kw["n_embd"], kw["seq_len"], kw["vocab_size"])
    return flops / _timed(run, reps)


def split_fractions(kw: dict, m: int, reps: int = 5) -> tuple:
    """(I, W) seconds ÷ plain B seconds of the second half of the model at ``m`` sequences (module
    docstring); per phase the median over ``reps`` of the slowest rank's time."""
    import torch.nn.functional as F

    from examples.gpt import GPT
    from parallel.pipeline.backward_split import SplitCache, backward_input, backward_weight
    torch.manual_seed(0)
    model = GPT(**kw)
    half = list(model.blocks)[kw["n_layer"] // 2:]
    params = [p for mod in half + [model.ln_f, model.lm_head] for p in mod.parameters()]
    x0 = torch.randn(m, kw["seq_len"], kw["n_embd"])
    tgt = torch.randint(0, kw["vocab_size"], (m, kw["seq_len"]))
    cache = SplitCache()

    def forward():
        x = x0.clone().requires_grad_()
        h = x
        for b in half:
            h = b(h)
        return x, F.cross_entropy(model.lm_head(model.ln_f(h)).flatten(0, 1), tgt.flatten())

    def phases():
        for p in params:
            p.grad = None
        x, loss = forward()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        for p in params:
            p.grad = None
        x, loss = forward()
        t3 = time.perf_counter()
        _, wp = backward_input(loss, None, x, params, cache=cache)
        t4 = time.perf_counter()
        backward_weight(wp, params)
        t5 = time.perf_counter()
        return t2 - t1, t4 - t3, t5 - t4
    phases()                                               # warm-up (and the split's graph analysis)
    per = []
    for _ in range(reps):
        if dist.is_initialized():
            dist.barrier()
        per.append(phases())
    b, i, w = (_slowest([p[k] for p in per]) for k in range(3))
    return i / b, w / b


def calibrate(kw: dict, per: int, comm_mb: float = 4.0, reps: int = 7, mem_mb: int = 32, micro=(),
              tp=(), flat: int = 0, dtensor: bool = False) -> dict:
    """All figures of the module docstring for model ``kw`` (examples/gpt.py) at ``per`` sequences
    per rank (and the compute rate at each micro-batch of ``micro``, at the tp-split shapes of each degree of
    ``tp``), measured now with every rank running. ``train_flops`` is taken twice, first and last (module
    docstring: :func:`_best_rate`). ``dtensor``: time DTensor's host figures without tp rows (FSDP2's parameters
    are DTensors: benchmarks/proto_host.py charges its AdamW per parameter)."""
    first = train_rate(kw, per)
    out = _calibrate_rest(kw, per, comm_mb, reps, mem_mb, micro, tp, flat, dtensor)
    return {**out, **_best_rate(first, train_rate(kw, per))}


def _best_rate(first: float, last: float) -> dict:
    """``train_flops`` = the faster of the per-rank batch's forward + backward rate timed first and last in a
    calibration (``train_flops_first``, ``train_flops_last``, both recorded). Interference only slows a pinned
    core's compute, so the faster of two medians taken apart in time is the machine's rate; one median of 5 short
    reps (0.1 s each at 5M) read 48.9 / 60.5 / 61.3 / 62.8 GFLOP/s at the start of four invocations (MP sessions
    12 and 11, B and DS session 12: each the first calibration of its process) against 70.7–73.4 at their ends."""
    if not (first > 0 and last > 0):
        raise ValueError(f"calibration: train_flops first {first}, last {last}: a rate must be > 0 (a forward + "
                         f"backward that took no time?); check benchmarks/proto_calib.train_rate's timing")
    return {"train_flops": max(first, last), "train_flops_first": first, "train_flops_last": last}


def _calibrate_rest(kw: dict, per: int, comm_mb: float, reps: int, mem_mb: int, micro, tp, flat: int,
                    dtensor: bool = False) -> dict:
    """:func:`calibrate`'s figures but ``train_flops``."""
    out = {"matmul_flops": matmul_rate(per * kw["seq_len"], kw["n_embd"], kw["vocab_size"]),
           "mem_bw": mem_bandwidth(mem_mb, 3 * reps)}
    for m in sorted(set(micro) - {per}):       # short calls, noisy: 3× the repeats (session 7's idle run moved
        out[f"train_flops@{m}"] = train_rate(kw, m, 3 * reps)    # train_flops@1 by −16% from start to end at 5M)
    for t in sorted(set(tp)):
        out[f"train_flops.tp{t}@{per * t}"] = tp_train_rate(kw, per, t, reps)
    for m in sorted(set(micro)):
        out[f"split_i@{m}"], out[f"split_w@{m}"] = split_fractions(kw, m, 3 * reps)
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return {**out, **calibrate_host(False, reps)}
    out.update(calibrate_host(bool(tp) or dtensor, reps))   # host.*: per-call host work (benchmarks/proto_host.py)
    n, r = dist.get_world_size(), dist.get_rank()
    group = Group(dist.group.WORLD, "calibration", tuple(range(n)), r)
    big = int(comm_mb * 2 ** 20 // 4)
    for impl, op in OPS:
        small_fn, _ = _op_fn(impl, op, n, group)
        big_fn, m = _op_fn(impl, op, big, group)
        lat = _timed(small_fn, 3 * reps)
        t = _timed(big_fn, 3 * reps)                      # medians of 21: start and end agree better
        out[f"lat.{impl}.{op}"] = lat
        out[f"bw.{impl}.{op}"] = WIRE[op](n) * m / t
        out["comm_bytes"] = m                              # M: the message the bandwidths were taken at
    out["chain.gloo.all_reduce"], out["chain_bytes"] = chained_all_reduce(kw, per, reps)
    for op in ("all_reduce", "all_gather") if flat else ():    # DeepSpeed ZeRO-1/2's one call over the flat gradient
        fn, m = _op_fn("gloo", op, flat, group)
        out[f"flat.gloo.{op}"], out["flat_bytes"] = WIRE[op](n) * m / _timed(fn, FLAT_REPS), m
    if flat:                                     # DeepSpeed's per-step buffers' fresh pages (benchmarks/proto_ds.py)
        out["fresh_page_s"] = calibrate_fresh_page()
    out.update(wait_figures(_op_fn("ring", "reduce_scatter", n, group)[0], _op_fn("ring", "all_gather", n, group)[0],
                            tp_call(kw, per) if tp else None))      # wait.*: δ per repetition (proto_wait.py)
    return out
