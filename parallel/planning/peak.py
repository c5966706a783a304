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
that comes back (βsh·b, SP /t). The rank's schedule is walked action by action (:func:`_walk`): each
(micro-batch, stage) pair holds its stage's forward bytes from F until B or W (GPipe m pairs, 1F1B
p − rank, ZB-H1 p; under a V placement — zb_v — the pairs of two stages of different sizes, stage p's
input being stage p − 1's kept output on the same rank), and the peak is the largest sum over the live
pairs while one of them runs its backward; under full / selective / every, one block's activations exist
again while its backward recomputes them. Under the zero-bubble split a micro-batch past I holds, per
block, what W needs (a retained graph: what the forward kept; a checkpointed block: its weight
consumers' inputs, :func:`weight_inputs_bytes` — I's one recompute serves W) and the captured δ_N.
A non-last stage's backward also holds the output gradient it received (βsh·b, SP /t); under SP the
backward re-gathers the column-parallel matmul's input (βsh·b, whole). On gloo (CPU) every message sent
to another rank stays alive until the step ends (its work never reports completion before ``wait``; the
executor's reaping frees nothing there): the stage output outlives its pair, each sent input gradient adds βsh·b.

Peak 1, at the start of the last micro-batch's backward (the loss's two βsV/t gradients exist
next to everything the forward kept):
    states (stage-2/3 gradient shards included: each step reduces into the last one's shard, as the ZeRO paper's
    2Ψ/N counts them held) + activations + 2βsV/t·b (last stage)
    + stage 2/3 flat gradient buckets: all of them when m > 1 (they fill over the micro-batches
      and reduce after the m-th), else the two buffers the reducer keeps from the last step (each sized
      for the largest bucket; the first gradients land in them); + pp-duplicated tied
      weights' gradients (reduced after backward)
    + stage 3 gathered units: the two largest (one in use, the next prefetched), or at backward's start the
      units kept from forward (zero.keep_after_forward) and one more, whichever is larger.
Peak 1', at the end of backward (stages ≥ 1; it wins when checkpointing has shrunk the activations): states
    + a bucket's reduce-scatter output (stage 1: its shard) + on gloo (CPU) a full-size copy of the bucket, which
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

ZeRO stage 0 over one dp rank (every tp / pp layout without data parallelism) keeps no gradient bucket
(parallel/zero/direct_grads.py): the gradients are freed at the step's start and exist again from the rank's
first weight-gradient action on, so the states count them only from there (:func:`_walk`: not during the
forwards before it nor at its start — GPipe's peak, and m = 1's; at a recompute in that backward, the share of
the blocks after the recomputed one).
"""
from __future__ import annotations

from parallel.data_parallel.reducer import KEEP_BUFFERS
from parallel.pipeline.schedules import get_schedule
from parallel.planning.context import block_extra
from parallel.planning.moe import activation_bytes as moe_activation_bytes
from parallel.planning.spec import Layout, ModelSpec, TrainSpec, element_bytes
from parallel.planning.time_terms import grad_moved

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
    if spec.experts:                          # an MoE layer, experts split over tp (planning/moe.py: estimate)
        mlp = moe_activation_bytes(spec, mb, e, t)
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


def _net(c: tuple) -> float:
    return c[0] + c[1] - c[2]


def _walk(actions: list, terms: dict, only: int, grads: float = 0.0, m: int = 1) -> tuple:
    """(activations, transient, absent gradient bytes) at a rank's peak: its schedule's actions walked in order, each
    (micro-batch, stage) pair holding its forward's bytes from F, what W needs from I (δ_N, the weight consumers'
    inputs) until W, nothing after B / W; a backward (B, I on stage > 0, W on stage 0 where I is empty) peaks at the
    other pairs' bytes + one of its stage's options (under the split + the δ_N I has captured by then), or at I's end at
    what the pair keeps for W. On gloo (CPU) a send to another rank is not reaped before the step ends (its work never
    reports completion before ``wait``): the stage output it sent outlives its pair, and the input gradient a backward
    sends stays. ``terms``: stage → (forward bytes, [(activations, transient, δ_N captured, gradient share)], bytes from
    I to W or None (I is the whole backward), the sent output's bytes that outlive the pair, the sent input gradient's).
    Without a schedule (pp = 1): the one stage ``only``'s options. ``grads``: the rank's gradient bytes when they exist
    only from its first weight-gradient action (B, W, or an I that is the whole backward) on — ZeRO stage 0 over one dp
    rank keeps no bucket (parallel/zero/direct_grads.py); until then they are absent (forwards, a backward's start); a
    recompute option of that backward has the share of the blocks after it (its option's 4th entry)."""
    if not actions:
        return max(((a, tr, grads * (1 - f) * (m == 1)) for a, tr, _, f in terms[only][1]), key=_net)
    live, best, sent, absent = {}, (0.0, 0.0, 0.0), 0.0, grads
    for x in actions:
        key, (fwd, options, post, out_msg, grad_msg) = (x.microbatch, x.stage), terms[x.stage]
        others = sent + sum(b for k, b in live.items() if k != key)
        runs = x.kind == "B" or (x.kind == "I" and x.stage > 0) or (x.kind == "W" and x.stage == 0)
        if x.kind == "F":
            best = max(best, (others + fwd, 0.0, absent), key=_net)
            live[key] = fwd
        elif runs:
            split = x.kind == "I"
            best = max([best] + [(others + a + d * split, tr, absent * (1 - f)) for a, tr, d, f in options], key=_net)
            if split and post is not None:
                best = max(best, (others + post, 0.0, absent), key=_net)
        if x.kind in ("B", "I") and x.stage > 0:
            sent += grad_msg
        if x.kind == "B" or x.kind == "W" or (x.kind == "I" and post is None):
            live.pop(key, None)
            sent += out_msg
            absent = 0.0                     # this rank's weight gradients exist from here on
        elif x.kind == "I" and x.stage > 0:
            live[key] = post
    return best


def rank_peak(spec: ModelSpec, lay: Layout, tr: TrainSpec, own: list, bounds: list, mb: int,
              buckets: list, states: dict, max_piece: int, owned: int) -> dict:
    """{activations, buffers, gathered, transient, optimizer_temp, data, peak, peak_at} of one rank
    (``states``: its model states; ``max_piece`` / ``owned``: the
    largest and total elements of the optimizer's pieces)."""
    e, mixed = element_bytes(tr)
    t, S, dev = lay.tp, lay.pp * lay.v, tr.device
    sb, h, f = mb * spec.seq, spec.hidden, spec.ffn_
    first_embed = spec.seq * 8 if S > 1 else 0.0           # the position ids the embedding's backward keeps
    if lay.cp > 1 and S > 1:                 # cp: position ids (β, n), so the position embedding is (β, n, h)
        first_embed = 2 * sb * h * e + sb * 8
    rank = own[0] % lay.pp
    acts = get_schedule(lay.schedule, lay.pp, lay.micro_batches, lay.v).actions[rank] if lay.pp > 1 else []
    has_w = any(getattr(x, "kind", None) == "W" for x in acts)
    split, whole = has_w and lay.zero != 3, has_w and lay.zero == 3
    grads_in_block = (f + 2 * h) * sb * e / t               # an MLP's gradients while its backward runs
    if lay.sp:              # + the column-parallel matmul's input, all-gathered again for its weight gradient
        grads_in_block += sb * h * e                        # (Korthikanti et al., arXiv 2205.05198, §4.2.2)
    terms = {}                               # per own stage: forward's bytes, backward's options, I→W bytes
    for k in own:
        a, z = bounds[k]
        modes = _modes(tr, range(a, z))
        kept = [block_bytes(spec, md, mb, t, lay.sp, e, dev) + block_extra(spec, lay, md, mb, t, e) for md in modes]
        last = k == S - 1
        end = head_bytes(spec, mb, t, e) if last else sb * h * e / (t if lay.sp else 1)
        end += first_embed if k == 0 else 0.0
        fwd = sum(kept) + end
        if k == lay.pp and k - 1 in own:     # the V's turn: this stage's input is stage k − 1's kept output
            fwd -= sb * h * e / (t if lay.sp else 1)
        ai = None                            # stage > 0: what each block keeps from I until W (stage 0: W
        if k > 0 and (split or whole) and not (whole and last):     # does the whole backward)
            ai = [_after_i(spec, md, mb, t, lay.sp, e, dev, whole) for md in modes]
        delta = _weight_deltas(spec, mb, t, e, bounds[k], last) if split and ai is not None else 0.0
        plain = sum(block_bytes(spec, md, mb, t, lay.sp, e, dev) for md in modes)
        post = fwd + delta + sum(ai) - plain if ai is not None else (None if whole and last else fwd)
        ce = 2 * sb * spec.vocab * e / t
        dy = 0.0 if last else sb * h * e / (t if lay.sp else 1)      # the output gradient received for it
        at_start = max(ce, grads_in_block - head_bytes(spec, mb, t, e)) if last else grads_in_block + dy
        options = [(fwd, at_start, delta, 0.0)]   # (activations, transient, δ_N, share of the stage's gradients
        #                                     computed by then) candidates while its backward runs
        none = block_bytes(spec, "none", mb, t, lay.sp, e) + block_extra(spec, lay, "none", mb, t, e)
        # recomputing block j rebuilds its whole set while blocks < j still keep theirs (later ones are freed);
        # its backward follows at once: the MLP's gradients and the residual stream's two; the δ_N of the blocks
        # after j (and the head's) are captured by then, j's own come as its recomputed set is freed
        past = ai or [0.0] * len(modes)      # blocks after j, past I, keep theirs until W
        for j, md in enumerate(modes):
            if md in ("full", "selective"):
                d = _weight_deltas(spec, mb, t, e, (a + j + 1, z), last) if delta else 0.0
                options.append((sum(kept[:j]) + none + sum(past[j + 1:]), grads_in_block + 2 * sb * h * e + dy, d,
                                (len(modes) - j - 1) / len(modes)))
        msg = sb * h * e / (t if lay.sp else 1) if dev == "cpu" else 0.0      # a sent activation or gradient
        terms[k] = (fwd, options, post, msg * (not last and k + 1 not in own), msg * (k > 0 and k - 1 not in own))
    direct = grad_moved(lay.zero, lay.zero_n, tr.precision, tr.optimizer, lay.ep) == 0 and tr.offload == "none"
    act, transient, absent = _walk(acts, terms, own[0], states["grads"] if direct else 0.0, lay.micro_batches)
    activations = act
    buffers = gathered = 0.0
    normal = [bk for bk in buckets if not getattr(bk, "deferred", False)]
    deferred = sum(bk.numel for bk in buckets if getattr(bk, "deferred", False)) * e
    if lay.zero >= 2:
        if lay.micro_batches > 1 or len(normal) == 1:
            buffers = sum(bk.padded for bk in normal) * e
        else:                # the two buffers kept from the last step, each the largest bucket's size
            buffers = KEEP_BUFFERS * max(bk.padded for bk in normal) * e
        buffers += deferred
    if lay.zero == 3:    # the current unit and the prefetched one; at backward's start the kept ones + one
        units = sorted((bk.padded for bk in normal if bk.unit), reverse=True)
        kept = [bk.padded for bk in normal if getattr(bk, "kept", False)]
        rest = sorted((bk.padded for bk in normal if bk.unit and not getattr(bk, "kept", False)), reverse=True)
        gathered = max(sum(units[:2]), sum(kept) + sum(rest[:1])) * e
    data = 16 * (tr.global_batch // lay.dp) * spec.seq * lay.cp        # the dp share, whole on every cp rank
    if lay.cp > 1:                       # + its shards (x, y, positions): all up front under pp, else one
        data += 24 * (tr.global_batch // lay.dp if lay.pp > 1 else mb) * spec.seq
    fb = states["total"] - absent + activations + transient + buffers + gathered + data
    if lay.zero >= 1:    # end of backward: a bucket's reduce-scatter output (stage 1; stage 2/3 reduce into last
        big = max(buckets, key=lambda bk: bk.padded)      # step's shard, in the states), on gloo a staging copy
        rs = ((big.padded // lay.zero_n if lay.zero == 1 else 0) + (big.padded if tr.device == "cpu" else 0)) * e
        end = states["total"] + buffers + gathered + data + rs
        if end > fb:
            fb, activations, transient = end, 0.0, rs
    opt_temp = 4 * owned if tr.device == "cuda" else 2 * 4 * max_piece
    step = states["total"] + deferred * (lay.zero >= 2) + (4 * owned if mixed else 0) + opt_temp + data
    out = {"activations": activations, "buffers": buffers, "gathered": gathered, "transient": transient,
           "optimizer_temp": opt_temp, "data": data}
    out["peak"], out["peak_at"] = max((fb, "backward"), (step, "optimizer"))
    return out
