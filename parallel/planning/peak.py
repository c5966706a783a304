"""Per-rank peak memory of a training step, predicted: what the engine holds at its two high points.

Checked against the measured peak of live tensor bytes (:class:`parallel.planning.measure.LiveBytes`)
on every layout of tests/test_memory_estimate.py: within 10%. b = bytes per element, t = tp, m =
micro-batches per step, β = micro-batch size, s, h, V, a, f = sequence, hidden, vocabulary, heads,
MLP width; "states" are the ZeRO model states of :func:`parallel.planning.planner._states`.

Activations of one micro-batch through one block, per policy (our GPT's counted theory,
:func:`parallel.activation.memory.gpt_layer_bytes`, generalised to grouped-query attention and a
SwiGLU MLP; Korthikanti et al., arXiv 2205.05198, without dropout masks, flash attention's
log-sum-exp in place of the a·s² scores), per rank:

    none / offload on a CPU device   norms 4βsh·b (+4βs·4 statistics; SP: their inputs /t, the
                                     gathered matmul inputs whole: 2βsh·b/t + 2βsh·b)
                                     + split by t: q, k, v βs(h + 2·kv)·b, attention output βsh·b,
                                     log-sum-exp aβs·4, MLP 2βsf·b (GELU: fc and GELU outputs;
                                     SwiGLU 4βsf·b: gate, up, act(gate), act·up)
    full                             the block input βsh·b (SP: /t)
    selective                        the input + the matmul / attention outputs (q, k, v, attention,
                                     fc or gate+up, split; the two row-parallel outputs whole)
    offload (CUDA)                   0 on the device

The last stage adds the head: the final norm's input and output 2βsh·b (+2βs·4) and the loss's
log-softmax βsV/t·b. A pipeline stage that is not the last keeps its output for the gradient
that comes back (βsh·b, SP /t). A rank holds ``max_in_flight`` micro-batches' worth (GPipe m, 1F1B
p − rank, ZB-H1 p: from F until W); under full / selective / every, one block's activations exist
again while its backward recomputes them. Under the zero-bubble split a micro-batch past I holds, per
block, what W needs (a retained graph: what the forward kept; a checkpointed block: its weight
consumers' inputs, :func:`weight_inputs_bytes` — I's one recompute serves W) and the captured δ_N.

Peak 1, at the start of the last micro-batch's backward (the loss's two βsV/t gradients exist
next to everything the forward kept):
    states less stage-2/3 gradient shards + activations + 2βsV/t·b (last stage)
    + stage 2/3 flat gradient buckets: all of them when m > 1 (they fill over the micro-batches
      and reduce after the m-th), else the one the first gradient lands in; + pp-duplicated tied
      weights' gradients (reduced after backward)
    + stage 3 gathered units: the two largest (one in use, the next prefetched), or at backward's start the
      units kept from forward (zero.keep_after_forward) and one more, whichever is larger.
Peak 1', at the end of backward (stages ≥ 1; it wins when checkpointing has shrunk the activations): states
    + a bucket's reduce-scatter output (its shard) + on gloo (CPU) a full-size copy of the bucket, which
    gloo's reduce-scatter stages (measured: dp2 ZeRO-1/2 under full recompute).
Peak 2, the optimizer step: states (gradient shards included) + mixed precision's fp32
    gradient copies (4 bytes × owned elements) + the optimizer's temporaries: CPU AdamW runs
    per tensor (two temporaries of the largest owned piece: sqrt and the divided denominator);
    CUDA's foreach AdamW makes one list of all owned elements (4 bytes each).
The batch (inputs and int64 targets, 16·(G/dp)·s bytes) is alive throughout.

Context parallelism: ``spec`` is then the local one (seq = s/cp, :mod:`parallel.planning.context`), plus
Ulysses' extra attention output per block, the (β, n) position ids and the batch's shards.

Not modelled: allocator rounding/caching and kernels' workspaces (CUDA's max_memory_allocated
counts those; LiveBytes does not); gloo's ring staging buffers (buckets ≥ 256 KiB, CPU only).
"""
from __future__ import annotations

from parallel.pipeline.schedules import get_schedule
from parallel.planning.context import block_extra
from parallel.planning.moe import activation_bytes as moe_activation_bytes
from parallel.planning.spec import Layout, ModelSpec, TrainSpec, element_bytes

__all__ = ["block_bytes", "head_bytes", "rank_peak", "weight_inputs_bytes"]


def block_bytes(spec: ModelSpec, policy: str, mb: int, t: int = 1, sp: bool = False, e: int = 4,
                device: str = "cuda") -> float:
    """Activation bytes one block keeps for one micro-batch of ``mb`` samples on one tp rank."""
    s, h, f, kv, a = spec.seq, spec.hidden, spec.ffn_, spec.kv_hidden, spec.heads
    sbh, sb = mb * s * h, mb * s
    if policy == "offload":
        if device != "cpu":
            return 0.0
        policy = "none"
    mlp = (2 if spec.mlp_matrices == 2 else 4) * sb * f * e / t
    if spec.experts:                          # an MoE layer, whole on every tp rank (planning/moe.py: estimate)
        mlp = moe_activation_bytes(spec, mb, e)
    qkv = sb * (h + 2 * kv) * e / t
    if policy == "none":
        norms = (2 * sbh * e / t + 2 * sbh * e + 4 * sb * 4 / t) if sp else 4 * sbh * e + 4 * sb * 4
        return norms + qkv + sbh * e / t + a * sb * 4 / t + mlp
    block_input = sbh * e / (t if sp else 1)
    if policy == "full":
        return block_input
    if policy == "selective":
        mlp_in = (1 if spec.mlp_matrices == 2 else 2) * sb * f * e / t
        return block_input + qkv + sbh * e / t + a * sb * 4 / t + mlp_in + 2 * sbh * e
    raise ValueError(f"no activation estimate for policy {policy!r}")


def head_bytes(spec: ModelSpec, mb: int, t: int = 1, e: int = 4) -> float:
    """The last stage's final norm input/output and the loss's log-softmax, one micro-batch."""
    sb = mb * spec.seq
    return 2 * sb * spec.hidden * e + 2 * sb * 4 + sb * spec.vocab * e / t


def _modes(tr: TrainSpec, blocks) -> list:
    if tr.activation == "every":
        return ["full" if i % tr.every == 0 else "none" for i in blocks]
    return [tr.activation for _ in blocks]


def _weight_deltas(spec: ModelSpec, mb: int, t: int, e: int, blocks: tuple, last: bool) -> float:
    """Zero-bubble split: the output gradients δ_N that I captures for W, one micro-batch of a stage: per
    block the norms' (2βsh), q/k/v's βs(h+2kv)/t, the attention projection's βsh, the MLP inputs' βsf/t
    (two under SwiGLU) and its projection's βsh; the last stage adds the final norm's βsh and the head's βsV/t."""
    sb, h = mb * spec.seq, spec.hidden
    ins = 1 if spec.mlp_matrices == 2 else 2
    per = (2 * h + (h + 2 * spec.kv_hidden) / t + h + ins * spec.ffn_ / t + h) * sb * e
    return (blocks[1] - blocks[0]) * per + (sb * h * e + sb * spec.vocab * e / t if last else 0.0)


def weight_inputs_bytes(spec: ModelSpec, mb: int, t: int = 1, sp: bool = False, e: int = 4) -> float:
    """What a checkpointed block keeps from the zero-bubble split's I until its W, one micro-batch (besides
    the captured δ_N): the saved inputs of its weight consumers, which I's one recompute leaves for W
    (:mod:`parallel.activation.recompute`) — both norms' inputs and statistics (SP: /t), the inputs of the
    column-parallel matmuls (the norms' outputs, whole), of the attention projection (βsh/t) and of the
    MLP's last matmul (βsf/t). The first norm's input is the block input."""
    sbh, sb, d = mb * spec.seq * spec.hidden, mb * spec.seq, (t if sp else 1)
    return 2 * sbh * e / d + 4 * sb * 4 / d + 2 * sbh * e + sbh * e / t + sb * spec.ffn_ * e / t


def _after_i(spec: ModelSpec, md: str, mb: int, t: int, sp: bool, e: int, dev: str, whole: bool) -> float:
    """Bytes a block of policy ``md`` keeps from I until W: a retained graph keeps what the forward kept;
    a checkpointed block the weight consumers' inputs, or (``whole``: W re-walks the graph, ZeRO-3) its
    whole recomputed set."""
    if md in ("full", "selective"):
        return block_bytes(spec, "none", mb, t, sp, e) if whole else weight_inputs_bytes(spec, mb, t, sp, e)
    return block_bytes(spec, md, mb, t, sp, e, dev)


def _captured_micro(lay: Layout, rank: int, zero3: bool = False) -> int:
    """Micro-batches a pp rank holds at once between I and W (I done, W not yet; the one in I counts): 0
    without a split (pp = 1, schedules without W). Their δ_N are captured except under ZeRO-3, whose W
    re-walks the graph (``zero3=True`` counts them there)."""
    if lay.pp == 1 or (lay.zero == 3) != zero3:
        return 0
    done, peak = 0, 0
    for act in get_schedule(lay.schedule, lay.pp, lay.micro_batches, lay.v).actions[rank]:
        kind = getattr(act, "kind", None)
        if kind == "I":
            peak, done = max(peak, done + 1), done + 1
        elif kind == "W":
            done -= 1
    return peak


def rank_peak(spec: ModelSpec, lay: Layout, tr: TrainSpec, own: list, bounds: list, mb: int, held: int,
              buckets: list, states: dict, max_piece: int, owned: int) -> dict:
    """{activations, buffers, gathered, transient, optimizer_temp, data, peak, peak_at} of one rank
    (``states``: its model states; ``held``: micro-batches in flight; ``max_piece`` / ``owned``: the
    largest and total elements of the optimizer's pieces)."""
    e, mixed = element_bytes(tr)
    t, S, dev = lay.tp, lay.pp * lay.v, tr.device
    sb, h, f = mb * spec.seq, spec.hidden, spec.ffn_
    first_embed = (sb * h + spec.seq * h) * e + spec.seq * 8 if S > 1 else 0.0
    if lay.cp > 1 and S > 1:                 # cp: position ids (β, n), so the position embedding is (β, n, h)
        first_embed = 2 * sb * h * e + sb * 8
    rank = own[0] % lay.pp
    split, whole = _captured_micro(lay, rank), _captured_micro(lay, rank, zero3=True)
    n_after = split or whole
    after_i = {}                     # per own stage k > 0: what each block keeps from I until W
    for k in own:
        if k > 0 and n_after and not (whole and k == S - 1):    # stage 0: W does the whole backward
            after_i[k] = [_after_i(spec, md, mb, t, lay.sp, e, dev, bool(whole))
                          for md in _modes(tr, range(*bounds[k]))]
    captured = 0.0    # micro-batches past I: their δ_N, and but for the one in I (its blocks: ``past`` below)
    for k, ai in after_i.items():                   # the change from what their forward kept
        kept_k = [block_bytes(spec, md, mb, t, lay.sp, e, dev) for md in _modes(tr, range(*bounds[k]))]
        delta = _weight_deltas(spec, mb, t, e, bounds[k], k == S - 1) if split else 0.0
        captured = max(captured, n_after * delta + (n_after - 1) * (sum(ai) - sum(kept_k)))
    grads_in_block = (f + 2 * h) * sb * e / t               # an MLP's gradients while its backward runs
    options = []                             # (activations, transient, a recompute's) candidates of the peak
    starts = []
    for k in own:
        a, z = bounds[k]
        modes = _modes(tr, range(a, z))
        kept = [block_bytes(spec, md, mb, t, lay.sp, e, dev) + block_extra(spec, lay, md, mb, t, e) for md in modes]
        last = k == S - 1
        end = head_bytes(spec, mb, t, e) if last else sb * h * e / (t if lay.sp else 1)
        end += first_embed if k == 0 else 0.0
        starts.append(sum(kept) + end)
        ce = 2 * sb * spec.vocab * e / t
        at_start = max(ce, grads_in_block - head_bytes(spec, mb, t, e)) if last else grads_in_block
        options.append((sum(kept) + end, at_start, False))
        none = block_bytes(spec, "none", mb, t, lay.sp, e) + block_extra(spec, lay, "none", mb, t, e)
        # recomputing block j rebuilds its whole set while blocks < j still keep theirs (later ones are freed);
        # its backward follows at once: the MLP's gradients and the residual stream's two
        past = after_i.get(k, [0.0] * len(modes))     # blocks after j, past I, keep theirs until W
        for j, md in enumerate(modes):
            if md in ("full", "selective"):
                options.append((sum(kept[:j]) + none + sum(past[j + 1:]), grads_in_block + 2 * sb * h * e, True))
    base = (held - 1) * max(starts) + captured
    act, transient, _ = max(options, key=lambda o: o[0] + o[1])
    activations = base + act
    buffers = gathered = 0.0
    normal = [bk for bk in buckets if not getattr(bk, "deferred", False)]
    deferred = sum(bk.numel for bk in buckets if getattr(bk, "deferred", False)) * e
    if lay.zero >= 2:
        if lay.micro_batches > 1 or len(normal) == 1:
            buffers = sum(bk.padded for bk in normal) * e
        else:
            buffers = max(bk.padded for bk in normal) * e
        buffers += deferred
    if lay.zero == 3:    # the current unit and the prefetched one; at backward's start the kept ones + one
        units = sorted((bk.padded for bk in normal if bk.unit), reverse=True)
        kept = [bk.padded for bk in normal if getattr(bk, "kept", False)]
        rest = sorted((bk.padded for bk in normal if bk.unit and not getattr(bk, "kept", False)), reverse=True)
        gathered = max(sum(units[:2]), sum(kept) + sum(rest[:1])) * e
    data = 16 * (tr.global_batch // lay.dp) * spec.seq * lay.cp        # the dp share, whole on every cp rank
    if lay.cp > 1:                       # + its shards (x, y, positions): all up front under pp, else one
        data += 24 * (tr.global_batch // lay.dp if lay.pp > 1 else mb) * spec.seq
    shard_grads = states["grads"] if lay.zero >= 2 else 0
    fb = states["total"] - shard_grads + activations + transient + buffers + gathered + data
    if lay.zero >= 1:    # end of backward: a bucket's reduce-scatter output, and on gloo its full-size staging copy
        big = max(buckets, key=lambda bk: bk.padded)
        rs = (big.padded // lay.zero_n + (big.padded if tr.device == "cpu" else 0)) * e
        end = states["total"] - shard_grads + buffers + gathered + data + rs
        if end > fb:
            fb, activations, transient = end, 0.0, rs
    opt_temp = 4 * owned if tr.device == "cuda" else 2 * 4 * max_piece
    step = states["total"] + deferred * (lay.zero >= 2) + (4 * owned if mixed else 0) + opt_temp + data
    out = {"activations": activations, "buffers": buffers, "gathered": gathered, "transient": transient,
           "optimizer_temp": opt_temp, "data": data}
    out["peak"], out["peak_at"] = max((fb, "backward"), (step, "optimizer"))
    return out
