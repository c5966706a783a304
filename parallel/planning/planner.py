"""The layout planner: per-rank memory, communication bytes and step time of a (dp, tp, pp, ZeRO
stage, micro-batches, schedule) layout, predicted without running it — mirroring what OUR engine
does, so that predictions meet measured runs (tests/test_planner.py: within 10%, most exact).

Model. A GPT-style decoder (:class:`ModelSpec`): L blocks of [norm, q/k/v (fused or not), o,
norm, MLP of 2 (GELU) or 3 (SwiGLU) matrices], a token embedding (vocabulary-split under tp), an
optional learned position embedding, a final norm and a head (tied or not). Parameters are laid out
in ``named_parameters`` order with their tensor-parallel shapes (Megatron, arXiv 1909.08053:
column-parallel q/k/v and MLP-in, row-parallel o and MLP-out whose biases stay replicated).

Model states per rank (ZeRO, arXiv 1910.02054; parallel/zero/optimizer.py), b = bytes per param:
* pipeline split as parallel/pipeline/split.py does it (contiguous blocks balanced by parameter
  count, embeddings on the first stage, head on the last; a tied embedding is duplicated on the
  last stage and both copies go to a separate "deferred" bucket);
* buckets of ``bucket_mb`` in reverse order (stages 0–2) or one unit per parameter-owning module
  (stage 3), each padded to a multiple of N = dp for stages ≥ 1 (data_parallel/bucket.py);
* params b·padded (stage 3: b·padded/N, the deferred bucket full), grads b·padded (stage 0–1; stage 0 with
  N > 1: + b per reduction group, the unused-parameter flag of parallel/zero/unused.py) or b·padded/N (2–3),
  fp32 master 4·shard under bf16/fp16 (none in fp32: it aliases the params),
  Adam 8 bytes per owned element + a 4-byte step per owned parameter piece (SGD+momentum 4; LAMB, 8-bit
  moments, 1-bit Adam: :mod:`parallel.planning.optim_states`).
Peak per rank (:mod:`parallel.planning.peak`): the larger of the start of the last micro-batch's
backward (states + activations per checkpointing policy of the (micro-batch, stage) pairs the schedule's
actions keep alive, walked in order + the loss's gradients + stage-2/3 gradient buckets +
stage-3 gathered units) and the optimizer step (states + its temporaries); checked against the measured
peak of live tensor bytes (:mod:`parallel.planning.measure`), within 10% on every tested layout.

Communication and step time: :mod:`parallel.planning.cost`; the records: :mod:`parallel.planning.spec`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from parallel.data_parallel.bucket import fill_buckets
from parallel.mesh import rank_of
from parallel.pipeline.schedules import get_schedule, max_in_flight
from parallel.pipeline.split import contiguous_partition
from parallel.planning.context import check_cp, cp_per_step, local_spec
from parallel.planning.cost import add_op, comm_per_step, optimizer_seconds, recomputed_blocks, seconds, step_time
from parallel.planning.moe import check_moe, moe_entries, routing_control_per_micro
from parallel.planning.offload_states import offload_state_bytes
from parallel.planning.optim_states import ONEBIT, state_bytes
from parallel.planning.optim_states import check as check_optimizer
from parallel.planning.peak import rank_peak
from parallel.planning.spec import Hardware, Layout, ModelSpec, ParamEntry, Prediction, TrainSpec, element_bytes
from parallel.planning.time_terms import memory_seconds, optimizer_moved
from parallel.zero.unit_life import reuse_keep
from parallel.zero.unit_plan import greedy_groups

__all__ = ["ModelSpec", "Layout", "Hardware", "TrainSpec", "Prediction", "inventory", "stage_bounds",
           "check_layout", "predict"]


# --- parameters, stages, buckets ------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def inventory(spec: ModelSpec, t: int = 1, ep: int = 1) -> tuple:
    """The model's parameters in named_parameters order with their local (tp-sharded; experts ep-split:
    :mod:`parallel.planning.moe`) sizes."""
    h, kv, f = spec.hidden, spec.kv_hidden, spec.ffn_
    out = [ParamEntry("wte", spec.vocab // t * h, "pre", tied=spec.tied, matrix=True)]
    if spec.learned_pos:
        out.append(ParamEntry("wpe", spec.seq * h, "pre", matrix=True))
    nb = 2 if spec.norm_bias else 1
    for i in range(spec.n_layer):
        pre = f"blocks.{i}."
        ln1, ln2 = (pre + "ln1", [h] * nb), (pre + "ln2", [h] * nb)
        mods = [] if spec.norms_last else [ln1]
        if spec.fused_qkv:
            mods.append((pre + "attn.qkv", [(h + 2 * kv) * h // t] + ([(h + 2 * kv) // t] if spec.bias else [])))
        else:
            mods += [(pre + f"attn.{n}", [w * h // t] + ([w // t] if spec.bias else [])) for n, w in
                     (("q", h), ("k", kv), ("v", kv))]
        mods.append((pre + "attn.proj", [h * h // t] + ([h] if spec.bias else [])))
        mods += [] if spec.norms_last else [ln2]
        if spec.experts:                               # the MLP is an MoE layer (experts split over ep and tp)
            out += [ParamEntry(m, n, i) for m, sizes in mods for n in sizes] + moe_entries(spec, i, ep, t)
            out += [ParamEntry(m, n, i) for m, sizes in ([ln1, ln2] if spec.norms_last else []) for n in sizes]
            continue
        ins = ["mlp.fc"] if spec.mlp_matrices == 2 else ["mlp.gate", "mlp.up"]
        mods += [(pre + n, [f * h // t] + ([f // t] if spec.bias else [])) for n in ins]
        mods.append((pre + "mlp.proj", [h * f // t] + ([h] if spec.bias else [])))
        mods += [ln1, ln2] if spec.norms_last else []
        out += [ParamEntry(m, n, i, matrix=k == 0 and not m.endswith(("ln1", "ln2")))
                for m, sizes in mods for k, n in enumerate(sizes)]
    out += [ParamEntry("ln_f", h, "post") for _ in range(nb)]
    out.append(ParamEntry("lm_head", spec.vocab // t * h, "post", tied=spec.tied, matrix=True))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def stage_bounds(spec: ModelSpec, t: int, pp: int, v: int = 1, ep: int = 1) -> list:
    """(start, end) blocks per stage, exactly as split_model(balance="params") partitions them."""
    S = pp * v
    if S == 1:
        return [(0, spec.n_layer)]
    if S > spec.n_layer:
        raise ValueError(f"planner: pp·v = {S} stages but the model has {spec.n_layer} blocks")
    inv = inventory(spec, t, ep)
    costs = [float(sum(p.numel for p in inv if p.place == i)) for i in range(spec.n_layer)]
    pre = float(sum(p.numel for p in inv if p.place == "pre"))
    post = float(sum(p.numel for p in inv if p.place == "post"))
    return contiguous_partition(costs, S, pre, post)


@functools.lru_cache(maxsize=1024)
def _rank_params(spec: ModelSpec, tp: int, pp: int, v: int, stages: tuple, ep: int = 1) -> tuple:
    """[(param, deferred)] of the stage modules of one pp rank (its ``stages``: :meth:`Layout.stages`), in the
    engine's named_parameters order."""
    inv, S = inventory(spec, tp, ep), pp * v
    bounds = stage_bounds(spec, tp, pp, v, ep)
    out = []
    for s in stages:
        a, e = bounds[s]
        for p in inv:
            if p.place == "pre" and s != 0 or p.place == "post" and s != S - 1:
                continue
            if isinstance(p.place, int) and not a <= p.place < e:
                continue
            if p.module == "lm_head" and p.tied and S == 1:
                continue                                    # the same Parameter as wte: listed once
            out.append((p, p.tied and S > 1))
    return tuple(out)


@dataclass(eq=False)         # identity: the reuse rule keys units by object (unit_life.reuse_keep)
class _Bucket:
    numel: int
    sizes: list
    padded: int
    gathers: int = 1                 # stage 3: all-gathers per step
    kept: bool = False               # stage 3: kept gathered from forward to backward (zero.keep_after_forward)
    unit: bool = False               # stage-3 unit (sharded params)
    deferred: bool = False           # tied pipeline copies: reduced after backward
    expert: bool = False             # expert parameters: padded to / partitioned over edp = dp/ep
    mats: tuple = ()                 # per parameter: a 2-D weight?


def _buckets(params: list, lay: Layout, b: int, bucket_mb: float, tied_head: bool, keep: int = 0,
             reuse: float | None = None) -> list:
    """The rank's flat buckets (stages 0–2, make_buckets' reverse greedy fill:
    :func:`parallel.data_parallel.bucket.fill_buckets`) or stage-3 units
    (one per module, pre-order), then the deferred bucket of tied pipeline copies. Expert parameters
    (:mod:`parallel.planning.moe`) come last in buckets / units of their own, padded to edp = dp/ep.
    Stage 3 keeps the ``keep`` units freed last in forward gathered into backward (pp = 1 only;
    :mod:`parallel.zero.stage3`): one gather each per micro-batch instead of two (:func:`_kept`); with ``reuse``
    (zero.max_reuse_distance) the count comes from DeepSpeed's rule instead (:func:`_reuse_count`)."""
    N, pad = lay.zero_n, lay.zero > 0

    def mk(entries, expert=False):
        sizes = [p.numel for p in entries]
        n, parts = sum(sizes), N // lay.ep if expert else N
        return _Bucket(n, sizes, -(-n // parts) * parts if pad else n, expert=expert,
                       mats=tuple(p.matrix for p in entries))
    experts = [p for p, d in params if p.expert]
    params = [(p, d) for p, d in params if not p.expert]
    normal = [p for p, d in params if not d]
    deferred = [p for p, d in params if d]
    out = []
    if lay.zero < 3:
        out += [mk([normal[i] for i in idx]) for idx in fill_buckets([p.numel * b for p in normal],
                                                                            bucket_mb * 2 ** 20)]
        out += [mk([experts[i] for i in idx], True)
                for idx in fill_buckets([p.numel * b for p in experts], bucket_mb * 2 ** 20)]
    else:
        units: dict = {}
        for p in normal:         # zero.units=block: one unit per block, one for the rest (pre-order: root first)
            key = p.module if lay.units == "module" else (-1 if not isinstance(p.place, int) else p.place)
            units.setdefault(key, []).append(p)
        if lay.units == "block":
            units = dict(sorted(units.items()))
        made = {}
        for keys in _merge(units, lay.unit_mb * 2 ** 20 / b):      # zero.unit_mb: consecutive units as one
            u = mk([p for k in keys for p in units[k]])
            made.update({k: u for k in keys})
            u.unit = True        # gathered in forward and again in backward; a tied head re-gathers wte (unless
            u.gathers = lay.micro_batches * (2 + (keys == ["wte"] and tied_head))   # merged: the head is waited for)
            out.append(u)
        if reuse is not None:
            keep = _reuse_count(_kept(made, lay, tied_head, len(made)), reuse)
        for u in _kept(made, lay, tied_head, keep if lay.pp == 1 else 0):
            u.kept = True
            u.gathers -= lay.micro_batches
        per_module: dict = {}
        for p in experts:
            per_module.setdefault(p.module, []).append(p)
        for entries in per_module.values():
            u = mk(entries, True)
            u.unit, u.gathers = True, 2 * lay.micro_batches
            out.append(u)
    if deferred:
        out.append(mk(deferred))
        out[-1].deferred = True
    return out


def _kept(units: dict, lay: Layout, tied_head: bool, keep: int) -> list:
    """The ``keep`` units freed last in forward, last first. Block units: the rest's unit (key −1: embeddings,
    final norm, head) is the root's, freed when the whole forward ends, then the blocks' in reverse. Module
    units (pre-order = forward order for these models): the last modules', the tied head's being wte's."""
    keys = list(units)
    if lay.units == "block" and -1 in units:
        keys = [k for k in keys if k != -1] + [-1]
    elif tied_head and "wte" in units:
        keys = [k for k in keys if k != "wte"] + ["wte"]
    return list({id(units[k]): units[k] for k in keys[::-1]}.values())[:keep]      # merged: each unit once


def _reuse_count(last_first: list, distance: float) -> int:
    """How many of the units ``last_first`` (freed last in forward first: :func:`_kept`'s order) DeepSpeed's reuse
    rule keeps — u is kept iff 2·(elements of the units freed after it) < ``distance``: the engine's
    :func:`parallel.zero.unit_life.reuse_keep` on the planner's units (unpadded elements, as the engine counts)."""
    return reuse_keep([(u, None) for u in reversed(last_first)], distance)


def _merge(units: dict, budget: float) -> list:
    """Groups of unit keys, as :func:`parallel.zero.unit_plan.merge_units` merges them (greedy in unit order while
    the elements fit ``budget``)."""
    keys = list(units)
    return [[keys[i] for i in g] for g in greedy_groups([sum(p.numel for p in units[k]) for k in keys], budget)]


def _piece_sizes(bk: _Bucket, N: int, r: int, pad: bool) -> list:
    """(elements, 2-D weight?) of the pieces of bucket ``bk`` inside dp rank r's shard."""
    if not pad:
        return list(zip(bk.sizes, bk.mats))
    shard, off, out = bk.padded // N, 0, []
    for s, mat in zip(bk.sizes, bk.mats):
        a, e = max(off, r * shard), min(off + s, (r + 1) * shard)
        if a < e:
            out.append((e - a, mat))
        off += s
    return out


def _shard_pieces(bk: _Bucket, N: int, r: int, pad: bool, largest: bool = False) -> tuple[int, int]:
    """(elements, parameter pieces) of bucket ``bk`` inside dp rank r's shard (``largest``: (elements,
    the largest piece's elements))."""
    if not pad:
        return bk.numel, max(bk.sizes) if largest else len(bk.sizes)
    shard = bk.padded // N
    lo, hi, off, n, k, big = r * shard, (r + 1) * shard, 0, 0, 0, 0
    for s in bk.sizes:
        a, e = max(off, lo), min(off + s, hi)
        if a < e:
            n, k, big = n + e - a, k + 1, max(big, e - a)
        off += s
    return (n, big) if largest else (n, k)


def _group(bk: _Bucket, lay: Layout, r: int) -> tuple[int, int]:
    """(size, this rank's index) of the group bucket ``bk`` is partitioned over: dp×cp (``r`` = dp·cp + c), or
    edp = dp·cp/ep for experts."""
    return (lay.zero_n // lay.ep, r // lay.ep) if bk.expert else (lay.zero_n, r)


# --- memory -----------------------------------------------------------------------------------------

def _states(buckets: list, lay: Layout, tr: TrainSpec, r: int) -> dict:
    b, mixed = element_bytes(tr)
    pad = lay.zero > 0
    m, pieces = {"params": 0, "grads": 0, "master": 0, "optimizer": 0}, []
    for bk in buckets:
        N, rb = _group(bk, lay, r)
        shard = bk.padded // N if pad else bk.numel
        pieces.append(_piece_sizes(bk, N, rb, pad))
        m["params"] += b * (shard if bk.unit else bk.padded)
        full_grad = lay.zero < 2 or tr.optimizer in ONEBIT               # 1-bit keeps g_i whole (stage 2)
        m["grads"] += b * (bk.padded if full_grad else shard)
        m["master"] += 4 * shard if mixed else 0
    if lay.zero == 0:                   # one more element on each group's last bucket: the unused flag (reducer.py)
        m["grads"] += b * len({bk.expert for bk in buckets if _group(bk, lay, r)[0] > 1})
    m["optimizer"] = state_bytes(tr, lay, buckets, pieces)        # by optimizer: planning/optim_states.py
    if tr.offload != "none":            # master and moments live in the store (host / disk): planning/offload_states.py
        m["master"] = m["optimizer"] = 0
    m["total"] = sum(m.values())
    if tr.offload != "none":            # not in the device total
        m["offload"] = offload_state_bytes(tr, [n for ps in pieces for n, _ in ps])
    return m


@functools.lru_cache(maxsize=4096)
def _in_flight(name: str, p: int, m: int, v: int) -> tuple:
    sched = get_schedule(name, p, m, v)
    return tuple(max_in_flight(sched, r) for r in range(p))


# --- putting it together ----------------------------------------------------------------------------

def _update_seconds(bks: list, lay: Layout, tr: TrainSpec, hw: Hardware) -> tuple[float, float]:
    """(optimizer, norm and gradient bookkeeping of dp rank 0; of that, the optimizer's passes alone: what the
    parameter all-gathers of stages 1–2 can hide under, time_terms' docstring)."""
    owned = sum(_shard_pieces(bk, *_group(bk, lay, 0), lay.zero > 0)[0] for bk in bks)
    return (optimizer_seconds(owned, tr, hw, local_grads=sum(bk.padded for bk in bks), zero=lay.zero,
                              micro_batches=lay.micro_batches, n=lay.zero_n, ep=lay.ep),
            memory_seconds(owned * optimizer_moved(tr.optimizer, tr.momentum), hw))


def check_layout(spec: ModelSpec, lay: Layout, tr: TrainSpec) -> str | None:
    """Why ``lay`` cannot run this model and batch (None when it can)."""
    G = tr.global_batch
    if G % lay.dp or (G // lay.dp) % lay.micro_batches:
        return f"global batch {G} does not split into dp {lay.dp} × {lay.micro_batches} micro-batches"
    why = spec.check_tp(lay.tp) if lay.tp > 1 else None
    if why:
        return why
    if lay.sp and (lay.tp == 1 or spec.seq % lay.tp):
        return f"sequence parallel needs tp > 1 dividing seq = {spec.seq}"
    if lay.pp * lay.v > spec.n_layer:
        return f"pp·v = {lay.pp * lay.v} stages exceed the {spec.n_layer} blocks"
    if lay.pp > 1:
        try:
            _in_flight(lay.schedule, lay.pp, lay.micro_batches, lay.v)
        except ValueError as e:
            return str(e)
    elif lay.v != 1:
        return "virtual stages need pp > 1"
    if lay.zero not in (0, 1, 2, 3):
        return f"zero stage {lay.zero} must be 0..3"
    return check_moe(spec, lay) or check_optimizer(tr, lay) or check_cp(spec, lay)


def predict(spec: ModelSpec, lay: Layout, tr: TrainSpec, hw: Hardware | None = None,
            ranks: str = "all") -> Prediction:
    """Predict ``lay``. ``ranks="all"``: every global rank; "worst": dp = cp = tp = 0 of each pp rank
    (dp×cp rank 0 owns the most real elements; tp ranks are alike). With cp > 1 activations, tp and pp
    traffic follow the local spec (seq = s/cp; :mod:`parallel.planning.context`), ZeRO shards over dp×cp."""
    why = check_layout(spec, lay, tr)
    if why:
        raise ValueError(f"planner: layout {lay} is invalid: {why}")
    hw = hw or Hardware()
    b = element_bytes(tr)[0]
    mb = tr.global_batch // (lay.dp * lay.micro_batches)
    bounds = stage_bounds(spec, lay.tp, lay.pp, lay.v, lay.ep)
    S = lay.pp * lay.v
    pred, dp_ops, loc = Prediction(lay), {}, local_spec(spec, lay)
    shape, dpax = {"pp": lay.pp, "dp": lay.dp, "cp": lay.cp, "tp": lay.tp}, "dp" if lay.cp == 1 else "dp_cp"
    for pr in range(lay.pp):
        own = list(lay.stages(pr))
        bks = _buckets(_rank_params(spec, lay.tp, lay.pp, lay.v, lay.stages(pr), lay.ep), lay, b, tr.bucket_mb,
                       spec.tied and S == 1, tr.keep, tr.reuse)
        comm = comm_per_step(loc, lay, tr, bks, own, bounds, mb)
        if lay.cp > 1:                  # gradients reduce over dp×cp; cp's own ring / all-to-all traffic
            comm = {(dpax if a == "dp" else a): ops for a, ops in comm.items()}
            comm.update(cp_per_step(loc, lay, tr, own, bounds, mb, lambda a, z: recomputed_blocks(lay, tr, a, z)))
        control: dict = {}                 # the MoE routing's control collectives (planning/moe.py), per step
        fwd = lay.micro_batches * sum(z - a + recomputed_blocks(lay, tr, a, z) for a, z in (bounds[k] for k in own))
        for axis, ops in routing_control_per_micro(loc, lay, fwd, mb).items():
            for op, (calls, payload) in ops.items():
                add_op(control, axis, op, calls, payload, lay.cp if axis == "control:cp" else lay.ep)
        for j in range(lay.zero_n) if ranks == "all" else [0]:         # j = dp·cp + c: the dp×cp group's order
            mem = _states(bks, lay, tr, j)
            pieces = [_shard_pieces(bk, *_group(bk, lay, j), lay.zero > 0, largest=True) for bk in bks]
            mem.update(rank_peak(loc, lay, tr, own, bounds, mb, bks, mem, max(p[1] for p in pieces),
                                 sum(p[0] for p in pieces)))
            for tr_ in range(lay.tp) if ranks == "all" else [0]:
                g = rank_of(pr, j // lay.cp, tr_, shape, j % lay.cp)
                pred.memory[g], pred.comm[g], pred.control[g] = mem, comm, control
        if seconds(comm.get(dpax, {}), hw) >= seconds(dp_ops, hw):
            dp_ops = comm.get(dpax, {})
    hide = 0.0
    if hw.mem_bandwidth:                  # dp rank 0 owns the most elements; the slowest pp rank's share
        per_rank = [_update_seconds(_buckets(_rank_params(spec, lay.tp, lay.pp, lay.v, lay.stages(pr), lay.ep), lay,
                                             b, tr.bucket_mb, spec.tied and S == 1, tr.keep, tr.reuse), lay, tr, hw)
                    for pr in range(lay.pp)]
        pred.update_s = max(u for u, _ in per_rank)
        hide = min(h for _, h in per_rank) if tr.interleave and lay.zero in (1, 2) else 0.0
    pred.step_s, pred.bubble = step_time(loc, lay, tr, hw, bounds, mb, dp_ops, hide)
    pred.step_s += pred.update_s
    pred.peak_bytes = max(m["peak"] for m in pred.memory.values())
    pred.fits = pred.peak_bytes <= hw.memory_bytes
    pred.activation = tr.activation if tr.activation != "every" else f"every:{tr.every}"
    return pred
