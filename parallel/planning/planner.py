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
  (stage 3), each padded to a multiple of N = dp for stages ≥ 1 (partition.py);
* params b·padded (stage 3: b·padded/N, the deferred bucket full), grads b·padded (stage 0–1) or
  b·padded/N (2–3), fp32 master 4·shard under bf16/fp16 (none in fp32: it aliases the params),
  Adam 8 bytes per owned element + a 4-byte step per owned parameter piece (SGD+momentum 4).
Activations (an estimate, not measured by the tests): per block and micro-batch, elements
b·s·h·(4 + 13/t) (SP: 2 + 15/t), plus the head's b·s·(2h + 2V/t), times the micro-batches a
rank holds at once (:func:`parallel.pipeline.schedules.max_in_flight`).

Communication per rank and step (ring model, parallel/comm.py; DESIGN.md), per micro-batch m:
* dp: stage 0 all-reduce 2(N−1)/N·Ψb; 1–2 reduce-scatter + all-gather of the padded buckets;
  3 reduce-scatter + two all-gathers per unit per micro-batch (a tied head gathers the embedding
  once more in forward); stages ≥ 1 add a 24-byte grad-norm all-reduce (also over tp and pp);
* tp per micro-batch: 4 all-reduces of b·s·h per block, the embedding's forward, the head's
  backward and the loss's two (3·b·s·4 bytes); sequence parallel: the same b·s·h as all-gathers +
  reduce-scatters and small all-reduces of the sequence-sharded norm/bias gradients;
* pp: b·s·h (SP: b·s·h/t) per micro-batch each way per stage boundary; the tied embedding's
  gradient V·h·b/t once per step between the end ranks (axis "pp_tied").

Step time (cost model): each stage's micro-batch F+B = its FLOPs (6N + 12Lhs per token, 1/t of it)
/ peak, plus its tp traffic at the given latency and bandwidth; the schedule is simulated with
F:B:I:W = 1:2:1:1 (parallel/pipeline/simulate.py); pp messages add to their actions; dp traffic is
exposed except what fits under the last micro-batch's backward (stages 0–2).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from parallel.pipeline.schedules import get_schedule, max_in_flight
from parallel.pipeline.simulate import simulate
from parallel.pipeline.split import _partition
from parallel.planning.flops import gpt_matmul_params

__all__ = ["ModelSpec", "Layout", "Hardware", "TrainSpec", "Prediction", "inventory", "stage_bounds",
           "check_layout", "predict"]

NORM_BYTES = 24          # the grad-norm all-reduce: three float64


@dataclass(frozen=True)
class ModelSpec:
    n_layer: int
    hidden: int
    heads: int
    vocab: int
    seq: int
    ffn: int | None = None          # MLP width, default 4h
    kv_heads: int | None = None     # grouped-query attention, default heads
    mlp_matrices: int = 2           # 2: fc/proj (GELU); 3: gate/up/down (SwiGLU)
    fused_qkv: bool = True
    bias: bool = True               # Linear biases
    norm_bias: bool = True          # LayerNorm (w, b) vs RMSNorm (w)
    learned_pos: bool = True
    tied: bool = True
    tp_layout: str = "megatron"     # sequence-parallel layout: "megatron" (examples/gpt.py) or "region" (HF)

    @property
    def ffn_(self) -> int:
        return self.ffn or 4 * self.hidden

    @property
    def kv_hidden(self) -> int:
        return self.hidden // self.heads * (self.kv_heads or self.heads)

    def check_tp(self, t: int) -> str | None:
        """Why tensor parallel degree ``t`` cannot split this model (None when it can)."""
        for what, n in (("heads", self.heads), ("kv heads", self.kv_heads or self.heads),
                        ("vocab", self.vocab), ("ffn", self.ffn_)):
            if n % t:
                return f"{what} = {n} is not divisible by tp = {t}"
        return None


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro_batches: int = 1          # per dp rank per step
    schedule: str = "1f1b"          # pp > 1: gpipe | 1f1b | interleaved | zero_bubble
    v: int = 1
    sp: bool = False
    units: str = "module"           # stage 3: module | block (zero.units)

    def __str__(self):
        s = f"dp{self.dp} tp{self.tp}{'+sp' if self.sp else ''} pp{self.pp} zero{self.zero} m{self.micro_batches}"
        return s + (f" {self.schedule}{f'(v={self.v})' if self.v > 1 else ''}" if self.pp > 1 else "")


@dataclass(frozen=True)
class TrainSpec:
    global_batch: int
    precision: str = "fp32"
    optimizer: str = "adamw"        # adamw | adam | sgd
    momentum: bool = False          # sgd with momentum keeps a buffer
    bucket_mb: float = 25.0


@dataclass(frozen=True)
class Hardware:
    memory_bytes: float = 80 * 2 ** 30
    peak_flops: float = 1e12        # per device
    bandwidth: float = 1e9          # bytes/s per rank, every axis
    latency_s: float = 1e-3         # per collective or message


@dataclass
class Prediction:
    layout: Layout
    memory: dict = field(default_factory=dict)    # rank -> {params, grads, master, optimizer, states, activations, ...}
    comm: dict = field(default_factory=dict)      # rank -> {axis: {op: {calls, payload_bytes, wire_bytes}}}
    step_s: float = 0.0
    bubble: float = 0.0
    peak_bytes: float = 0.0
    fits: bool = True

    def wire_bytes(self, rank: int, axis: str) -> float:
        return sum(c["wire_bytes"] for c in self.comm[rank].get(axis, {}).values())


@dataclass(frozen=True)
class _P:                            # one parameter: module path, local numel, owner module kind
    module: str
    numel: int
    place: object                    # "pre", "post" or the block index
    tied: bool = False


# --- parameters, stages, buckets ------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def inventory(spec: ModelSpec, t: int = 1) -> tuple:
    """The model's parameters in named_parameters order with their local (tp-sharded) sizes."""
    h, kv, f = spec.hidden, spec.kv_hidden, spec.ffn_
    out = [_P("wte", spec.vocab // t * h, "pre", tied=spec.tied)]
    if spec.learned_pos:
        out.append(_P("wpe", spec.seq * h, "pre"))
    nb = 2 if spec.norm_bias else 1
    for i in range(spec.n_layer):
        pre = f"blocks.{i}."
        mods = [(pre + "ln1", [h] * nb)]
        if spec.fused_qkv:
            mods.append((pre + "attn.qkv", [(h + 2 * kv) * h // t] + ([(h + 2 * kv) // t] if spec.bias else [])))
        else:
            mods += [(pre + f"attn.{n}", [w * h // t] + ([w // t] if spec.bias else [])) for n, w in
                     (("q", h), ("k", kv), ("v", kv))]
        mods.append((pre + "attn.proj", [h * h // t] + ([h] if spec.bias else [])))
        mods.append((pre + "ln2", [h] * nb))
        ins = ["mlp.fc"] if spec.mlp_matrices == 2 else ["mlp.gate", "mlp.up"]
        mods += [(pre + n, [f * h // t] + ([f // t] if spec.bias else [])) for n in ins]
        mods.append((pre + "mlp.proj", [h * f // t] + ([h] if spec.bias else [])))
        out += [_P(m, n, i) for m, sizes in mods for n in sizes]
    out += [_P("ln_f", h, "post") for _ in range(nb)]
    out.append(_P("lm_head", spec.vocab // t * h, "post", tied=spec.tied))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def stage_bounds(spec: ModelSpec, t: int, pp: int, v: int = 1) -> list:
    """(start, end) blocks per stage, exactly as split_model(balance="params") partitions them."""
    S = pp * v
    if S == 1:
        return [(0, spec.n_layer)]
    if S > spec.n_layer:
        raise ValueError(f"planner: pp·v = {S} stages but the model has {spec.n_layer} blocks")
    inv = inventory(spec, t)
    costs = [float(sum(p.numel for p in inv if p.place == i)) for i in range(spec.n_layer)]
    pre = float(sum(p.numel for p in inv if p.place == "pre"))
    post = float(sum(p.numel for p in inv if p.place == "post"))
    return _partition(costs, S, pre, post)


@functools.lru_cache(maxsize=1024)
def _rank_params(spec: ModelSpec, tp: int, pp: int, v: int, pp_rank: int) -> tuple:
    """[(param, deferred)] of one pp rank's stage modules, in the engine's named_parameters order."""
    inv, S = inventory(spec, tp), pp * v
    bounds = stage_bounds(spec, tp, pp, v)
    out = []
    for s in range(pp_rank, S, pp):
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


@dataclass
class _Bucket:
    numel: int
    sizes: list
    padded: int
    gathers: int = 1                 # stage 3: all-gathers per step
    unit: bool = False               # stage-3 unit (sharded params)


def _buckets(params: list, lay: Layout, b: int, bucket_mb: float, tied_head: bool) -> list:
    """The rank's flat buckets (stages 0–2, make_buckets' reverse greedy fill) or stage-3 units
    (one per module, pre-order), then the deferred bucket of tied pipeline copies."""
    N, pad = lay.dp, lay.zero > 0

    def mk(sizes):
        n = sum(sizes)
        return _Bucket(n, sizes, -(-n // N) * N if pad else n)
    normal = [p for p, d in params if not d]
    deferred = [p.numel for p, d in params if d]
    out = []
    if lay.zero < 3:
        cur, cur_b = [], 0
        for p in reversed(normal):
            if cur and cur_b + p.numel * b > bucket_mb * 2 ** 20:
                out.append(mk(cur))
                cur, cur_b = [], 0
            cur.append(p.numel)
            cur_b += p.numel * b
        if cur:
            out.append(mk(cur))
    else:
        units: dict = {}
        for p in normal:         # zero.units=block: one unit per block, one for the rest (pre-order: root first)
            key = p.module if lay.units == "module" else (-1 if not isinstance(p.place, int) else p.place)
            units.setdefault(key, []).append(p.numel)
        if lay.units == "block":
            units = dict(sorted(units.items()))
        for mod, sizes in units.items():
            u = mk(sizes)
            u.unit = True        # gathered in forward and again in backward; a tied head re-gathers wte
            u.gathers = lay.micro_batches * (2 + (mod == "wte" and tied_head))
            out.append(u)
    if deferred:
        out.append(mk(deferred))
    return out


def _shard_pieces(bk: _Bucket, N: int, r: int, pad: bool) -> tuple[int, int]:
    """(elements, parameter pieces) of bucket ``bk`` inside dp rank r's shard."""
    if not pad:
        return bk.numel, len(bk.sizes)
    shard = bk.padded // N
    lo, hi, off, n, k = r * shard, (r + 1) * shard, 0, 0, 0
    for s in bk.sizes:
        a, e = max(off, lo), min(off + s, hi)
        if a < e:
            n, k = n + e - a, k + 1
        off += s
    return n, k


# --- memory -----------------------------------------------------------------------------------------

def _bytes(tr: TrainSpec) -> tuple[int, bool]:
    if tr.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"planner: precision={tr.precision!r} must be fp32, bf16 or fp16")
    return (4, False) if tr.precision == "fp32" else (2, True)


def _states(buckets: list, lay: Layout, tr: TrainSpec, r: int) -> dict:
    b, mixed = _bytes(tr)
    N, pad = lay.dp, lay.zero > 0
    per_elem, per_piece = {"adamw": (8, 4), "adam": (8, 4)}.get(tr.optimizer, (4 if tr.momentum else 0, 0))
    m = {"params": 0, "grads": 0, "master": 0, "optimizer": 0}
    for bk in buckets:
        shard = bk.padded // N if pad else bk.numel
        n, k = _shard_pieces(bk, N, r, pad)
        m["params"] += b * (shard if bk.unit else bk.padded)
        m["grads"] += b * (bk.padded if lay.zero < 2 else shard)
        m["master"] += 4 * shard if mixed else 0
        m["optimizer"] += per_elem * n + per_piece * k
    m["total"] = sum(m.values())
    return m


def _activations(spec: ModelSpec, lay: Layout, tr: TrainSpec, own: list, bounds: list, mb: int) -> float:
    """Estimated activation bytes held at peak by a pp rank (see the module docstring)."""
    e = _bytes(tr)[0]
    t, s, h, S = lay.tp, spec.seq, spec.hidden, lay.pp * lay.v
    per_block = mb * s * h * ((2 + 15 / t) if lay.sp else (4 + 13 / t)) * e
    head = mb * s * (2 * h + 2 * spec.vocab / t) * e
    per_stage = max((bounds[k][1] - bounds[k][0]) * per_block + (k == S - 1) * head for k in own)
    held = _in_flight(lay.schedule, lay.pp, lay.micro_batches, lay.v)[own[0] % lay.pp] if lay.pp > 1 else 1
    return held * per_stage


@functools.lru_cache(maxsize=4096)
def _in_flight(name: str, p: int, m: int, v: int) -> tuple:
    sched = get_schedule(name, p, m, v)
    return tuple(max_in_flight(sched, r) for r in range(p))


# --- communication ------------------------------------------------------------------------------------

def _add(out: dict, axis: str, op: str, calls: int, payload: float, n: int) -> None:
    if calls <= 0 or n <= 1 and op != "send" and op != "recv":
        return
    wire = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
            "send": 1.0, "recv": 0.0}[op] * payload
    c = out.setdefault(axis, {}).setdefault(op, {"calls": 0, "payload_bytes": 0, "wire_bytes": 0.0})
    c["calls"] += calls
    c["payload_bytes"] += int(payload)
    c["wire_bytes"] += wire


def _tp_micro(spec: ModelSpec, lay: Layout, blocks: int, first: bool, last: bool, mb: int, e: int) -> dict:
    """tp traffic of one micro-batch through one stage: {op: (calls, payload bytes)}."""
    act, ce, h = mb * spec.seq * spec.hidden * e, 3 * mb * spec.seq * 4, spec.hidden
    if not lay.sp:
        n = 4 * blocks + first + last
        return {"all_reduce": (n + 2 * last, n * act + last * ce)}
    nb = 2 if spec.norm_bias else 1
    small = blocks * (2 * nb + 2 * spec.bias) + last * nb
    ar = (small + 2 * last, small * h * e + last * ce)
    if spec.tp_layout == "megatron":
        pos = first and spec.learned_pos
        return {"all_gather": (4 * blocks + 2 * first + last - (first and not pos),
                               (4 * blocks + first + last) * act + pos * spec.seq * h * e),
                "reduce_scatter": (4 * blocks + first + last, (4 * blocks + first + last) * act),
                "all_reduce": ar}
    return {"all_gather": (4 * blocks + first + last, (4 * blocks + first + last) * act),
            "reduce_scatter": (4 * blocks, 4 * blocks * act),
            "all_reduce": (ar[0] + first + last, ar[1] + (first + last) * act)}


def _comm(spec: ModelSpec, lay: Layout, tr: TrainSpec, buckets: list, own: list, bounds: list, mb: int) -> dict:
    b = _bytes(tr)[0]
    N, t, p, S, m = lay.dp, lay.tp, lay.pp, lay.pp * lay.v, lay.micro_batches
    out: dict = {}
    if lay.zero == 0:
        _add(out, "dp", "all_reduce", len(buckets), sum(bk.numel for bk in buckets) * b, N)
    else:
        _add(out, "dp", "reduce_scatter", len(buckets), sum(bk.padded for bk in buckets) * b, N)
        _add(out, "dp", "all_gather", sum(bk.gathers for bk in buckets),
             sum(bk.gathers * bk.padded for bk in buckets) * b, N)
        _add(out, "dp", "all_reduce", 1, NORM_BYTES, N)
    for k in own:
        for op, (calls, payload) in _tp_micro(spec, lay, bounds[k][1] - bounds[k][0], k == 0, k == S - 1, mb, b).items():
            _add(out, "tp", op, m * calls, m * payload, t)
    _add(out, "tp", "all_reduce", 1, NORM_BYTES, t)
    if p > 1:
        act = mb * (spec.seq // t if lay.sp else spec.seq) * spec.hidden * b
        msgs = m * sum((k < S - 1) + (k > 0) for k in own)
        _add(out, "pp", "send", msgs, msgs * act, p)
        _add(out, "pp", "recv", msgs, msgs * act, p)
        _add(out, "pp", "all_reduce", 1, NORM_BYTES, p)
        if spec.tied and (0 in own or S - 1 in own):
            tied = spec.vocab // t * spec.hidden * b
            _add(out, "pp_tied", "send", 1, tied, p)
            _add(out, "pp_tied", "recv", 1, tied, p)
    return out


# --- time ---------------------------------------------------------------------------------------------

def _seconds(ops: dict, hw: Hardware) -> float:
    return sum(c["calls"] * hw.latency_s + c["wire_bytes"] / hw.bandwidth for c in ops.values())


def _step_time(spec: ModelSpec, lay: Layout, tr: TrainSpec, hw: Hardware, bounds: list, mb: int,
               dp_ops: dict) -> tuple[float, float]:
    """(seconds per step, pipeline bubble fraction) of the slowest rank (module docstring)."""
    h, s, S, b = spec.hidden, spec.seq, lay.pp * lay.v, _bytes(tr)[0]
    block = 6 * (gpt_matmul_params(1, h, 0, spec.ffn_, spec.kv_hidden, spec.mlp_matrices)) + 12 * h * s
    stage = []
    for k, (a, e) in enumerate(bounds):
        flops = mb * s * ((e - a) * block + (k == S - 1) * 6 * spec.vocab * h) / lay.tp
        tp: dict = {}
        for op, (calls, payload) in _tp_micro(spec, lay, e - a, k == 0, k == S - 1, mb, b).items():
            _add(tp, "tp", op, calls, payload, lay.tp)
        act = mb * (s // lay.tp if lay.sp else s) * h * b
        p2p = ((k < S - 1) + (k > 0)) * (hw.latency_s + act / hw.bandwidth) if S > 1 else 0.0
        stage.append(flops / hw.peak_flops + _seconds(tp.get("tp", {}), hw) + p2p)
    if S == 1:
        span, bubble = lay.micro_batches * stage[0], 0.0
    else:
        frac = {"F": 1 / 3, "B": 2 / 3, "I": 1 / 3, "W": 1 / 3}
        sim = simulate(get_schedule(lay.schedule, lay.pp, lay.micro_batches, lay.v),
                       lambda a: stage[a.stage] * frac[a.kind])
        span, bubble = float(sim.makespan), float(sim.bubble)
    reduce = {op: c for op, c in dp_ops.items() if op != "all_gather"}
    gather = _seconds({op: c for op, c in dp_ops.items() if op == "all_gather"}, hw)
    if lay.zero < 3:       # bucketed reduction under the last micro-batch's backward; gathers after the step
        exposed = max(0.0, _seconds(reduce, hw) - 2 / 3 * max(stage)) + gather
    else:                  # prefetched gathers under compute
        exposed = _seconds(reduce, hw) + max(0.0, gather - span)
    return span + exposed, bubble


# --- putting it together ----------------------------------------------------------------------------

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
    return None


def predict(spec: ModelSpec, lay: Layout, tr: TrainSpec, hw: Hardware | None = None,
            ranks: str = "all") -> Prediction:
    """Predict ``lay``. ``ranks="all"``: every global rank; "worst": dp = tp = 0 of each pp rank
    (dp rank 0 owns the most real elements; tp ranks are alike)."""
    why = check_layout(spec, lay, tr)
    if why:
        raise ValueError(f"planner: layout {lay} is invalid: {why}")
    hw = hw or Hardware()
    b = _bytes(tr)[0]
    mb = tr.global_batch // (lay.dp * lay.micro_batches)
    bounds = stage_bounds(spec, lay.tp, lay.pp, lay.v)
    S = lay.pp * lay.v
    pred, dp_ops = Prediction(lay), {}
    for pr in range(lay.pp):
        own = list(range(pr, S, lay.pp))
        bks = _buckets(_rank_params(spec, lay.tp, lay.pp, lay.v, pr), lay, b, tr.bucket_mb, spec.tied and S == 1)
        comm = _comm(spec, lay, tr, bks, own, bounds, mb)
        act = _activations(spec, lay, tr, own, bounds, mb)
        big = max(bk.padded for bk in bks) * b
        transient = (2 * big if lay.zero == 3 else 0) + (3 * big if lay.zero >= 2 else 0)
        for dr in range(lay.dp) if ranks == "all" else [0]:
            mem = _states(bks, lay, tr, dr)
            mem.update(activations=act, transient=transient, peak=mem["total"] + act + transient)
            for tr_ in range(lay.tp) if ranks == "all" else [0]:
                g = (pr * lay.dp + dr) * lay.tp + tr_
                pred.memory[g], pred.comm[g] = mem, comm
        if _seconds(comm.get("dp", {}), hw) >= _seconds(dp_ops, hw):
            dp_ops = comm.get("dp", {})
    pred.step_s, pred.bubble = _step_time(spec, lay, tr, hw, bounds, mb, dp_ops)
    pred.peak_bytes = max(m["peak"] for m in pred.memory.values())
    pred.fits = pred.peak_bytes <= hw.memory_bytes
    return pred
