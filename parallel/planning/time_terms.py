"""The step-time terms besides the matmuls: the optimizer's passes over memory, the engine's gradient
bookkeeping, and how much of the data-parallel communication shows in the step.

Memory traffic. ``Hardware.mem_bandwidth`` is calibrated as STREAM's "add" counts it (c = a + b:
12 bytes per fp32 element; benchmarks/proto_calib.py). The core really moves 16: storing to c first
reads its cache line (write-allocate). So a kernel costs (bytes it moves, write-allocates included)
× 12/16 / mem_bandwidth (:func:`memory_seconds`). In-place kernels have no write-allocate (the line
was just read); a kernel writing a fresh tensor has one.

Optimizer (:data:`OPT_MOVED`, bytes moved per owned element). torch's AdamW on CPU tensors is the
single-tensor loop (foreach kernels are CUDA-only): per parameter ``p.mul_(1 − lr·wd)`` (8),
``m.lerp_(g, 1 − β1)`` (12), ``v.mul_(β2)`` (8), ``v.addcmul_(g, g)`` (12), ``v.sqrt()`` into a new
tensor (8 + 4 write-allocate), ``/ sqrt(bc2)`` into another (8 + 4), ``.add_(eps)`` (8),
``p.addcdiv_(m, denom)`` (16): 88 bytes. Adam without weight decay skips the first: 80. SGD:
``p.add_(g)`` 12; with momentum ``buf.mul_().add_(g)`` (8 + 12) then ``p.add_(buf)`` (12): 32.
A fused kernel would move 28 (read p, g, m, v; write p, m, v): that is the benchmark's floor, not
what runs. DeepSpeedCPUAdam is such a fused SIMD pass: :data:`FUSED_ADAM_MOVED`.

Gradient bookkeeping of our engine (:data:`GRAD_MOVED`, per local gradient element of the dp
buckets, by ZeRO stage): stage 0/1 keep a persistent flat gradient; after ``zero_grad`` (p.grad =
None) the first gradient is copied into its view (read 4, write 4 + write-allocate 4): 12 bytes — except stage 0
over one rank in fp32 with an elementwise optimizer (every tp / pp layout without data parallelism), which keeps
no bucket: p.grad is autograd's own tensor, 0 bytes (:func:`grad_moved`, parallel/zero/direct_grads.py). Stage 2/3
allocate the flat gradient (``torch.empty``) at the first gradient and copy each parameter's first gradient
into it: 12 as well (stage 3 over two gloo CPU ranks in fp32, one micro-batch: 0, reduce-scattered from p.grad
itself, parallel/data_parallel/grad_parts.py). Then the division by N in place (:data:`DIVIDE_MOVED`, 8): over the
whole gradient
before stage 0's all-reduce (20 in all), over the shard only after a reduce-scatter of fp32 gradients at
stages 1–3 (8/N per local element; before it divided the whole gradient and stage 1 copied its reduced
shard back, 8/N more; parallel/data_parallel/reducer.py). The global
gradient norm reads every owned element once more (:data:`NORM_MOVED`, 4). Each further micro-batch of a
step (m > 1: accumulation, every pipeline schedule) adds its gradient into the held one in place (autograd's
``grad += g`` into the flat view at stages 0–1, ``flat_grad.add_`` at 2–3): read 4 + 4, write 4, no
write-allocate — :data:`ACCUM_MOVED`, 12 bytes per local gradient element and micro-batch after the first.

Communication on CPU ranks (``Hardware.comm_shares_core``: gloo over loopback with every thread of
a rank pinned to its one core, as benchmarks/proto_run.py pins them). A collective's time is partly
the core copying bytes through the kernel's socket buffers (send: read + write, receive: read +
write, 4 bytes moved per wire byte; a reduction adds read own + read received + write, 3 more) —
:data:`BUSY_PER_WIRE` — and partly waiting for the peer. Only the waiting can hide under compute:
the core cannot run both. Stages 0–2 reduce K buckets while backward runs: the last bucket is ready
only when backward ends and is exposed whole; the other K − 1 expose at least their busy part, or
what does not fit under the backward (2/3 of compute, F:B = 1:2). Parameter all-gathers of stages
1–2 (K buckets) follow the update bucket by bucket (parallel/zero/interleave.py): the last bucket's gather
is exposed whole; the others expose at least their busy part, or what does not fit under the optimizer
passes of the buckets after them (``hide_gather_s`` · (K − 1)/K; 0 for a two-pass peer). Stage 3 gathers a unit just
before it computes and reduce-scatters it right after: on one core with a blocking wait per unit
(FSDP2's and ours on gloo) nothing is left to overlap, so all of it is exposed — at the cost such a
collective has inside a CHAIN of blocking collectives, which the calibration measures directly: its ring
"all-reduce" is a reduce-scatter and an all-gather back to back, at a tiny size (latency ``l_pair``) and at
M bytes (wire w_pair = 2(N−1)/N·M, time w_pair / bw_pair). Read as two chained halves, linear in bytes:

    one chained collective of wire w:  l_op + δ/2 + w / b_chain,
    δ = max(0, l_pair − l_rs − l_ag)                     (:func:`chain_terms`; ``Hardware.chain_wait_s`` = δ/2)
    b_chain = w_pair / (w_pair / bw_pair − l_pair)      (the pair's incremental bandwidth; ring ops only)

Since session 12 the calibration times the pair and the isolated calls INTERLEAVED over 48 repetitions
(benchmarks/proto_wait.py): l_pair = the pair's median, l_rs / l_ag = the isolated calls' fast mode (lower decile),
and the planner charges the ring's chained calls those latencies (benchmarks/proto_read.py) — so a chained
reduce-scatter + all-gather is priced at the pair's median whichever mode the isolated medians fell into (session
11's five calibrations gave δ 0.00–4.68 ms from three separately timed bimodal medians; records before keep that
reading; why not the median of per-repetition differences, and loaded figures: benchmarks/proto_wait.py).
δ is what a blocking collective issued right after another costs beyond the two isolated latencies (the
wake-up of the waiting thread: δ/2 = 0.3–1.8 ms per call on the recorded runs, against 0.12–0.15 ms for one
op alone); b_chain is the pair's bandwidth once that fixed part is taken out (0.8–1.2 GB/s, against the
0.4–1.2 of one 4 MiB op after a barrier, bimodal: its time sometimes holds a stall of its own). Print them
per record: benchmarks/proto_report.py's chain_hardware. Both come from the run's own calibration, not
from a fit: the ring code the rows run is the code the calibration times, so a faster ring moves both.
Gloo's own reduce-scatter/all-gather (FSDP2's default rows) keep their calibrated bandwidth (there is no
chained-pair figure for them) and pay δ/2 per call too. Applied to block units only (:func:`stage3_waits`):
module units (DeepSpeed ZeRO-3 coalesces them into prefetch buckets) are not given it. Out of sample on
the recorded idle runs (benchmarks/results/*_2026-12-04_session7.json, never fitted to): zero3 5m / 50m
0.93 / 1.01 (0.92 / 1.01 in the DeepSpeed run), fsdp2_prefetch 0.98 / 0.96, fsdp2_ring 0.81 / 0.97 (FSDP2's
own per-unit work, ~1.1 ms a call, is not in it: tests/test_bench_protocol.py, KNOWN_GAPS).
Our ZeRO-1/2 buckets on the ring are read the same way (:func:`ring_chain_seconds`, in :func:`exposed_dp` where
``Hardware.chain_bandwidth`` is given): the reduce-scatter after backward and the all-gather after the update are
blocking calls issued from running work too, so latency + δ/2 + wire / b_chain each. The 4 MiB bus bandwidth holds
one call's fixed wait (2–3.5 ms on session 10's AMD machine, where even the tiny isolated ring call sits in that mode)
and scaled it by the bytes: at 5M (one bucket, exposed whole) it charged 33–37 ms where the steps showed 21
(zero − local + the update it saves). zero1 / zero2 planner ÷ measured, session 9's Intel record: 5M 1.08 / 1.06 →
0.96 / 0.95, 50M 1.05 / 1.06 → 0.98 / 0.99; session 10's AMD record: 5M 1.11 / 1.15 → 0.95 / 0.99, 50M 1.00 / 0.98 →
0.93 / 0.92 (tests/test_bench_protocol_s10.py).
Session 7's STAGE3_WAIT_S (1.5 ms per call, fitted on the 16:12 record) gave 1.02 / 1.20 for zero3. With separate
communication hardware (``comm_shares_core`` False: GPUs with their copy engines and NICs) the busy
part is zero and the rest of :func:`exposed_dp` is the classic overlap model.

Tensor parallel on CPU ranks (:func:`tp_waits`). Megatron's f/g operators (arXiv 1909.08053 §3) block on an
all-reduce twice per block forward and twice backward, plus the vocabulary-parallel embedding's, head's and
loss's: each call sits between two pieces of compute, nothing overlaps it, and cost.py adds it whole to the
micro-batch (latency + wire / gloo's calibrated all-reduce bandwidth, the isolated call: timed 21 times back to
back after a barrier each). A call issued from running work pays more, ``Hardware.call_wait_s`` per call:

    one tp call of wire w:  l_ar + w / b_ar + c,   c = mean_i(t_call,i) − (l_ar + w_tp / b_ar)

where t_call,i is the calibration's direct reading of exactly that call — a gloo all-reduce of the tp message
(w_tp) issued right after a tp-split matmul, the matmul's own time subtracted, the slowest rank's, over 48
repetitions interleaved with the ring pair's (benchmarks/proto_wait.py ``wait.gloo.call_s``; benchmarks/proto_tp.py,
since session 13). The mean, not the median: a step sums 4L + 4 such waits (4L + 5 calls: the gradient norm's runs
in the update) and one call's time is bimodal (quartiles 0.65 / 3.08 ms on session 12's 5m MP record). Why it is
not the ring pair's δ, which the planner charged per tp call until session 13: δ is the excess of TWO chained p2p
collectives of our ring, the second issued the moment the first returns; a tp call is ONE gloo all-reduce, and in
the same interleaved repetitions it costs about as much after a barrier as right after the matmul
(``wait.gloo.after_mm`` −0.1–0.0 ms at 5m, 1.2 at 50m): its excess over the isolated figure (21 calls of itself in
a row) is what one call costs amid other work, not a chained wait, and the interleaved reading is the one that
times it. What inside gloo makes it (thread wake-ups?) is not pinned down: a loaded probe (2 ranks pinned, load
7) counted ~10 voluntary context switches per call whatever preceded it. Session 12's MP
records (mean of start and end): c = 1.31 / 1.66 ms (5m / 50m) and 2.23 / 1.94 (the b re-run) against δ = 4.20 /
3.18 and 5.02 / 3.52; the rows paid, beyond the planner without waits, 2.2 / 2.7 ms a call at 5m (session 11:
2.0 / 1.15, sessions 8/10 2.3–2.6: tests/test_bench_protocol_s11.py). Planner ÷ measured, tp_ours 0.89 / 1.08
and 0.95 / 0.92 (with δ: 1.28 / 1.28 and 1.27 / 1.02; tests/test_proto_tp_wait.py; the 50m part of the first
record also takes the tp-split rate at the faster of start and end, benchmarks/proto_report.py calib_mean).
Records before the figure keep δ (their figures below). The tp_dtensor row's call is a DTensor Partial →
Replicate redistribute (dispatch, ``_c10d_functional.all_reduce`` into a fresh tensor, ``wait_tensor``), 1.7–3.0 ms
dearer than ours after the same matmul (benchmarks/proto_tp_call.py, loaded): calibrations time it the same way
from session 13 (``wait.dtensor.call_s``) and its c is that beyond the isolated call; records without it (session
12's included) keep δ there — with our c that row would come out 0.78 / 0.72 at 5m: δ is a stand-in, not a reading.
Before session 13 (δ per call, ``Hardware.call_wait_s`` = 2 · ``chain_wait_s``): its first op starts after the
barrier, its second is issued the moment the first returns, and l_pair − l_rs − l_ag = δ was read as ONE chained
call's excess (stage 3 reads the pair as two chained halves, δ/2 per call with the pair's incremental bandwidth
b_chain, above). Evidence then, session 8's idle model-parallel record
(benchmarks/results/protocol_mp_2026-12-04_session8.json, 2 ranks × 1 thread): what the planner missed
without the term, per tp call, 2.51 ms at 5M (29 calls) and 2.09 ms at 50M (69 calls), against that run's
δ = 2.89 / 2.29 ms; solving missing = a·calls + c·compute over both sizes gives a = 2.65 ms per call and
c = −0.07 (no rate deficit): at the tp-split shapes (h → 3h/t, h/t → h, h → 4h/t, 4h/t → h, V/t head, t·per
sequences) a tp=2-shaped local replica runs forward + backward in 1.01× (5M) / 1.02× (50M) the full model's
time at per sequences (loaded, paired), so train_flops holds for tp (records since this one calibrate that
replica's rate, ``train_flops.tp<t>@m``, and the planner takes it: ``Hardware.tp_flops``). With δ, planner
÷ measured: tp_ours 1.05 / 1.01 (was 0.56 / 0.84), tp_dtensor 0.93 / 0.91 (was 0.49 / 0.75; then planned as our
layout — since session 10 benchmarks/proto_host.py gives it its own 4L calls, its replicated head and DTensor's
per-call host work, calibrated where the record has it); with the δ of each other session-7/8 record instead,
tp_ours 0.98–1.12 (tests/test_bench_protocol.py). The pair's latency is taken at the larger of a record's start
and end calibrations (benchmarks/proto_report.py, calib_mean: its fast mode, δ ≈ 0, is not what a call chained
after compute sees).
Pipeline p2p (``Hardware.p2p_wait_s``, per stage-boundary message of an action in the simulated schedule, cost.py):
the same figure — a message is one blocking call issued from running work, δ/2 like one ring half (benchmarks/
proto_report.py, hardware). So the wait is a calibrated quantity × counted calls: δ/2 per ring reduce-scatter /
all-gather (stages 1–3) and per pp message; a tp all-reduce its own directly timed figure c (above; δ before
it). Until session 11 the pipeline read the
excess timed directly for a blocking gloo call after compute (benchmarks/proto_calib.py ``chain.gloo.all_reduce`` −
the isolated call's latency + wire / bandwidth: 0.8–2.4 ms; none on records before session 9). pp rows with δ/2
(with that excess): session 9's Intel record 5M 0.92 / 0.91 / 0.97 (0.97 / 0.96 / 1.05; no wait: 0.83 each), 50M
1.06 / 1.06 / 1.10 (1.07 / 1.07 / 1.11); session 10's AMD record 0.98–1.06 (0.97–1.06); session 8's B part, which
has no timed excess, 1.02 / 0.98 / 1.06 (0.90 / 0.87 / 0.88); the MP runs' pp_torch / pp_ours 0.91–1.04. The
whole δ per message put session 8's 5M zbv at 1.24; the timed excess for tp instead of δ gives session 10's 5M
tp_ours 0.79 (session 9's 0.81). Not applied to dp (launched asynchronously under backward).
"""
from __future__ import annotations

from parallel.planning.spec import Hardware

__all__ = ["COUNTED_PER_MOVED", "OPT_MOVED", "FUSED_ADAM_MOVED", "GRAD_MOVED", "DIVIDE_MOVED", "ACCUM_MOVED",
           "NORM_MOVED", "BUSY_PER_WIRE", "grad_moved", "chain_terms", "chain_seconds", "stage3_waits",
           "memory_seconds", "optimizer_moved", "busy_seconds", "exposed_dp", "tp_waits", "ring_chain_seconds"]

COUNTED_PER_MOVED = 12 / 16          # STREAM-add bytes per byte the core moves (write-allocate of c)
OPT_MOVED = {"adamw": 88, "adam": 80, "sgd_momentum": 32, "sgd": 12}
FUSED_ADAM_MOVED = 28
GRAD_MOVED = {0: 12, 1: 12, 2: 12, 3: 12}
DIVIDE_MOVED = 8
ACCUM_MOVED = 12
NORM_MOVED = 4
BUSY_PER_WIRE = {"all_gather": 4.0, "send": 2.0, "recv": 2.0, "reduce_scatter": 7.0,
                 "all_reduce": 5.5}    # all-reduce = reduce-scatter then all-gather, half the wire each


def grad_moved(zero: int, n: int, precision: str = "fp32", optimizer: str = "adamw", ep: int = 1,
               micro_batches: int = 1, gloo_ring: bool = False) -> int:
    """Bytes moved per local gradient element to put a step's first gradient in place (module docstring): 0
    where the engine keeps ``p.grad`` itself (parallel/zero/direct_grads.py: ZeRO stage 0 over ``n`` = 1 rank,
    fp32, an elementwise optimizer, no experts) or reduce-scatters straight from it (ZeRO-3 over ``n`` = 2 ranks
    on the gloo ring, fp32, one micro-batch, no experts: parallel/data_parallel/grad_parts.py), else
    :data:`GRAD_MOVED` of the stage."""
    direct = zero == 0 and n == 1 and precision == "fp32" and optimizer in ("adamw", "adam", "sgd") and ep == 1
    parts = zero == 3 and n == 2 and precision == "fp32" and ep == 1 and micro_batches == 1 and gloo_ring
    return 0 if direct or parts else GRAD_MOVED[zero]


def memory_seconds(moved_bytes: float, hw: Hardware) -> float:
    """Seconds to move ``moved_bytes`` (write-allocates included) at ``hw.mem_bandwidth`` (0 if unknown)."""
    return moved_bytes * COUNTED_PER_MOVED / hw.mem_bandwidth if hw.mem_bandwidth else 0.0


def optimizer_moved(optimizer: str, momentum: bool = False) -> int:
    """Bytes torch's single-tensor update moves per owned element (module docstring)."""
    key = "sgd_momentum" if optimizer == "sgd" and momentum else optimizer
    if key not in OPT_MOVED:
        raise ValueError(f"planner: the update time of optimizer {optimizer!r} is not modelled (bytes moved per "
                         f"element are known for {sorted(OPT_MOVED)}): plan it without a memory bandwidth "
                         f"(Hardware.mem_bandwidth=0), which leaves the optimizer's time out")
    return OPT_MOVED[key]


def busy_seconds(ops: dict, hw: Hardware) -> float:
    """The core's own share of collectives ``ops`` ({op: {wire_bytes}}) when it shares them with compute."""
    if not hw.comm_shares_core:
        return 0.0
    return memory_seconds(sum(c["wire_bytes"] * BUSY_PER_WIRE.get(op, 4.0) for op, c in ops.items()), hw)


def exposed_dp(dp_ops: dict, zero: int, compute_s: float, span_s: float, hw: Hardware, seconds,
               hide_gather_s: float = 0.0) -> float:
    """Seconds of the dp traffic ``dp_ops`` that show in the step (module docstring); ``compute_s``: the
    slowest stage's forward + backward of one micro-batch, ``span_s``: the schedule's makespan;
    ``seconds(ops, hw)``: the ops' latency + bandwidth time; ``hide_gather_s``: optimizer seconds the
    stage 1–2 parameter all-gathers run under (interleaved update; 0: two passes)."""
    if zero in (1, 2) and hw.comm_shares_core and hw.chain_bandwidth:
        seconds = ring_chain_seconds          # our ring's buckets: chained halves, as stage 3's units
    reduce = {op: c for op, c in dp_ops.items() if op != "all_gather"}
    gather_ops = {op: c for op, c in dp_ops.items() if op == "all_gather"}
    gather = seconds(gather_ops, hw)
    if zero >= 3:
        if hw.comm_shares_core:
            return chain_seconds(dp_ops, hw)
        return seconds(reduce, hw) + max(0.0, gather - span_s)
    k = max(1, reduce.get("all_reduce" if zero == 0 else "reduce_scatter", {}).get("calls", 1))
    r = seconds(reduce, hw)
    hidden = r * (k - 1) / k
    exposed = r / k + max(busy_seconds(reduce, hw) * (k - 1) / k, hidden - 2 / 3 * compute_s)
    kg = max(1, gather_ops.get("all_gather", {}).get("calls", 1))
    if hide_gather_s <= 0 or kg == 1:
        return exposed + gather
    rest = (kg - 1) / kg
    return exposed + gather / kg + max(busy_seconds(gather_ops, hw) * rest, (gather - hide_gather_s) * rest)


def chain_terms(lat_pair: float, lat_rs: float, lat_ag: float, bw_pair: float, wire_pair: float) -> tuple:
    """(δ/2, b_chain) of the module docstring from the calibrated back-to-back pair (ring reduce-scatter then
    all-gather): tiny-size latency ``lat_pair``, bus bandwidth ``bw_pair`` at ``wire_pair`` wire bytes, and the
    two ops' own latencies. b_chain is ``bw_pair`` when the pair's time does not exceed its latency (no
    incremental figure to take)."""
    delta = max(0.0, lat_pair - lat_rs - lat_ag)
    t = wire_pair / bw_pair
    return delta / 2, wire_pair / (t - lat_pair) if t > lat_pair else bw_pair


def chain_seconds(ops: dict, hw: Hardware) -> float:
    """Σ_op calls·latency(op) + wire bytes / ``hw.chain_bw(op)``: the ops as links of a blocking chain."""
    return sum(c["calls"] * hw.lat(op) + c["wire_bytes"] / hw.chain_bw(op) for op, c in ops.items())


def ring_chain_seconds(ops: dict, hw: Hardware) -> float:
    """Stage 1–2 buckets on our ring (``hw.chain_bandwidth`` given) on CPU ranks: each reduce-scatter and
    all-gather read as a chained half of the calibrated pair, as stage 3's units — :func:`chain_seconds` (its
    latency, wire / b_chain) plus ``hw.chain_wait_s`` (δ/2) per ring call; the rest at their own figures."""
    ring = sum(c["calls"] for op, c in ops.items() if op in dict(hw.chain_bandwidth))
    return chain_seconds(ops, hw) + hw.chain_wait_s * ring


def stage3_waits(dp_ops: dict, zero: int, units: str, hw: Hardware) -> float:
    """Stage 3 with block units on CPU ranks: ``hw.chain_wait_s`` (δ/2) per all-gather and reduce-scatter call."""
    if zero < 3 or units != "block" or not hw.comm_shares_core:
        return 0.0
    return hw.chain_wait_s * sum(dp_ops.get(op, {}).get("calls", 0) for op in ("all_gather", "reduce_scatter"))


def tp_waits(tp_ops: dict, hw: Hardware) -> float:
    """Blocking tp collectives ``tp_ops`` ({op: {calls}}) of one micro-batch on CPU ranks: ``hw.call_wait_s`` per
    call — c, the calibrated gloo all-reduce after a tp matmul beyond the isolated call (δ on records before that
    figure, and for DTensor's calls; module docstring); 0 with separate communication hardware."""
    if not hw.comm_shares_core:
        return 0.0
    return hw.call_wait_s * sum(c["calls"] for c in tp_ops.values())
