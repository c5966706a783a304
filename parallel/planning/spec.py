"""The planner's records: the model (:class:`ModelSpec`), the layout (:class:`Layout`), the training
run (:class:`TrainSpec`), the machine (:class:`Hardware`) and the answer (:class:`Prediction`).
See :mod:`parallel.planning.planner` for what is predicted from them."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ModelSpec", "Layout", "TrainSpec", "Hardware", "Prediction", "ParamEntry", "element_bytes"]


V_SCHEDULES = ("zb_v", "dualpipe_v")


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
    norms_last: bool = False        # the block registers its two norms after attention and MLP (transformers' Llama)
    tp_layout: str = "megatron"     # sequence-parallel layout: "megatron" (examples/gpt.py) or "region" (HF)
    experts: int = 0                # > 0: each block's MLP is a parallel.moe.MoE of this many experts (planning/moe.py)
    top_k: int = 2                  # experts per token
    capacity_factor: float | None = 1.25    # slots per expert ⌈cf·T·k/E⌉; None: dropless (bounded by T)

    @property
    def ffn_(self) -> int:
        return self.ffn or 4 * self.hidden

    @property
    def kv_hidden(self) -> int:
        return self.hidden // self.heads * (self.kv_heads or self.heads)

    def check_tp(self, t: int) -> str | None:
        """Why tensor parallel degree ``t`` cannot split this model (None when it can)."""
        for what, n in (("heads", self.heads), ("kv heads", self.kv_heads or self.heads),
                        ("vocab", self.vocab), ("ffn", self.ffn_)):       # experts: split over tp too
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
    ep: int = 1                     # expert parallelism, carved out of dp (parallel.moe)
    cp: int = 1                     # context parallel: the sequence split over cp ranks (planning/context.py)
    cp_algorithm: str = "ring"      # ring | ulysses
    unit_mb: float = 0.0            # stage 3: consecutive units merged up to this many MiB (zero.unit_mb)

    def stages(self, pp_rank: int) -> tuple:
        """The pipeline stages on pp rank r: r, r+p, … (loop placement) or r and 2p−1−r (the V placement of
        zb_v / dualpipe_v, :mod:`parallel.pipeline.schedules_v`)."""
        if self.schedule in V_SCHEDULES:
            return (pp_rank, 2 * self.pp - 1 - pp_rank)
        return tuple(range(pp_rank, self.pp * self.v, self.pp))

    def owner(self, stage: int) -> int:
        """The pp rank holding ``stage`` (inverse of :meth:`stages`)."""
        if self.schedule in V_SCHEDULES:
            return stage if stage < self.pp else 2 * self.pp - 1 - stage
        return stage % self.pp

    @property
    def zero_n(self) -> int:
        """Ranks gradients reduce and ZeRO shards over: dp × cp."""
        return self.dp * self.cp

    def __str__(self):
        s = f"dp{self.dp} tp{self.tp}{'+sp' if self.sp else ''} pp{self.pp} zero{self.zero} m{self.micro_batches}"
        s += f" ep{self.ep}" if self.ep > 1 else ""
        s += f" cp{self.cp}({self.cp_algorithm})" if self.cp > 1 else ""
        return s + (f" {self.schedule}{f'(v={self.v})' if self.v > 1 else ''}" if self.pp > 1 else "")


@dataclass(frozen=True)
class TrainSpec:
    global_batch: int
    precision: str = "fp32"
    optimizer: str = "adamw"        # adamw adam sgd lamb muon onebit_adam onebit_lamb zero_one_adam (optim_states.py)
    momentum: bool = False          # sgd with momentum keeps a buffer
    bucket_mb: float = 25.0
    activation: str = "none"        # activation_checkpointing.policy: none | full | every | selective | offload
    every: int = 1                  # policy every: blocks 0, k, 2k, … recomputed
    device: str = "cuda"            # cuda: offload leaves the device, foreach AdamW; cpu: it stays, per-tensor AdamW
    state_dtype: str = "fp32"       # adam/adamw moments: fp32 | int8 (parallel/optim/adam8bit.py)
    interleave: bool = False        # zero 1/2: bucket k's all-gather under bucket k+1's update (zero/interleave.py;
                                    # off by default: slower on gloo, see its ENABLED)
    keep: int = 2                   # zero 3: units kept gathered from forward to backward (zero.keep_after_forward;
                                    # pp > 1: none, the engine sets 0)
    reuse: float | None = None      # zero 3: DeepSpeed's reuse rule replaces keep (zero.max_reuse_distance, elements:
                                    # a unit is kept iff 2·(elements freed after it) < reuse; parallel/zero/unit_life)
    offload: str = "none"           # zero.offload.optimizer: none | cpu | nvme (planning/offload_states.py)


@dataclass(frozen=True)
class Hardware:
    memory_bytes: float = 80 * 2 ** 30
    peak_flops: float = 1e12        # per device
    bandwidth: float = 1e9          # bytes/s per rank, every axis
    latency_s: float = 1e-3         # per collective or message
    op_bandwidth: tuple = ()        # ((op, bytes/s), ...): measured bus bandwidth of an op; else `bandwidth`
    op_latency: tuple = ()          # ((op, seconds), ...): measured latency of an op; else `latency_s`
    mem_bandwidth: float = 0.0      # bytes/s, STREAM-add counted (planning/time_terms.py); 0: not modelled
    comm_shares_core: bool = False  # collectives copy on the compute core (gloo CPU ranks): time_terms.exposed_dp
    flops_at: tuple = ()            # ((tokens per micro-batch, FLOP/s), ...): the rate measured at that size
    tp_flops: tuple = ()            # (((tp, tokens per micro-batch), FLOP/s), ...): measured at the tp-split shapes
    chain_wait_s: float = 0.0       # stage 3 on CPU ranks: per blocking unit collective, beyond its latency
    chain_bandwidth: tuple = ()     # ((op, bytes/s), ...): an op's bandwidth inside such a chain; else `bw(op)`
    call_wait_s: float = 0.0        # tp on CPU ranks: per blocking collective issued from running compute, beyond
                                    # its isolated call (time_terms.tp_waits: the call timed after a tp matmul)
    split_frac: tuple = ()          # ((tokens, (I, W)), ...): the I/W split's seconds ÷ a plain B's at that size
    p2p_wait_s: float = 0.0         # pp on CPU ranks: per stage-boundary message of an action, beyond its latency
                                    # (time_terms.py: a blocking call issued from running work; δ/2 when calibrated)

    def bw(self, op: str) -> float:
        return dict(self.op_bandwidth).get(op, self.bandwidth)

    def lat(self, op: str) -> float:
        return dict(self.op_latency).get(op, self.latency_s)

    def chain_bw(self, op: str) -> float:
        return dict(self.chain_bandwidth).get(op, self.bw(op))

    def rate(self, tokens: int, tp: int = 1) -> float:
        """FLOP/s of a forward + backward over ``tokens`` tokens (model FLOPs ÷ ``tp`` per rank under tensor
        parallelism): measured at those tp-split shapes, else at that size, else ``peak_flops``."""
        if tp > 1 and (tp, tokens) in dict(self.tp_flops):
            return dict(self.tp_flops)[(tp, tokens)]
        return dict(self.flops_at).get(tokens, self.peak_flops)


@dataclass
class Prediction:
    layout: Layout
    memory: dict = field(default_factory=dict)    # rank -> {params, grads, master, optimizer, states, activations, ...}
    comm: dict = field(default_factory=dict)      # rank -> {axis: {op: {calls, payload_bytes, wire_bytes}}}
    control: dict = field(default_factory=dict)   # rank -> as comm: the MoE routing control axes (planning/moe.py)
    step_s: float = 0.0
    update_s: float = 0.0           # of step_s: optimizer, norm, gradient bookkeeping (planning/time_terms.py)
    bubble: float = 0.0
    peak_bytes: float = 0.0
    fits: bool = True
    activation: str = "none"                      # the activation checkpointing policy predicted

    def wire_bytes(self, rank: int, axis: str) -> float:
        return sum(c["wire_bytes"] for c in self.comm[rank].get(axis, {}).values())


@dataclass(frozen=True)
class ParamEntry:                    # one parameter: module path, local numel, owner module kind
    module: str
    numel: int
    place: object                    # "pre", "post" or the block index
    tied: bool = False
    expert: bool = False             # split over ep; reduced / partitioned over edp (parallel.moe)
    matrix: bool = False             # a 2-D weight (Muon orthogonalises these)



def element_bytes(tr: TrainSpec) -> tuple[int, bool]:
    """(bytes per element, mixed precision) of the training precision."""
    if tr.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"planner: precision={tr.precision!r} must be fp32, bf16 or fp16")
    return (4, False) if tr.precision == "fp32" else (2, True)

