"""The rows of the benchmark protocol: each configuration built as its users build it.

Every row trains examples/gpt.py's GPT (fp32, same seed, same weights) on this rank's share of one
global batch (``per`` sequences per rank), with AdamW at lr 1e-4 and torch's weight decay 0.01
(passed explicitly where a peer's default differs: DeepSpeedCPUAdam's is 0.0):

* ``local``: no communication, each rank trains its own copy on its own share (the compute floor);
* ``ddp``, ``ddp_aa``: ``DistributedDataParallel(model)`` with its defaults, twice (the A/A control);
* ``ddp_tuned``: ``gradient_as_bucket_view=True, static_graph=True``;
* ``fsdp2``: ``fully_shard`` per block, then the root (torch defaults);
  ``fsdp2_prefetch``: the same with explicit ``set_modules_to_forward_prefetch`` (next block) and
  ``set_modules_to_backward_prefetch`` (previous block); ``fsdp2_ring``: that plus FSDP2's
  ``set_custom_all_gather`` / ``set_custom_reduce_scatter`` hooks running our collectives (the p2p
  ring of parallel/comm/ring.py at ≥ 256 KiB on gloo, as our ZeRO rows), its bytes counted;
* ``ds1``, ``ds2``, ``ds3``: DeepSpeed as shipped, its own ``DeepSpeedCPUAdam`` op (adamw_mode),
  CPU accelerator, ZeRO-3 with ``stage3_param_persistence_threshold: 0`` (else it shards nothing at
  this size); only when ``import deepspeed`` works (else skipped with the reason);
* ``zero0`` … ``zero3``: ours through ``parallel.engine.parallelize`` with the config defaults
  (ZeRO-3 per block, ``zero.units=block``, as FSDP2 wraps);
* ``zero3_keep``: ours ZeRO-3 per block keeping every unit gathered from forward into backward
  (``zero.keep_after_forward`` = the number of units): the memory behaviour of DeepSpeed ZeRO-3 as shipped at
  these sizes — its default ``stage3_max_reuse_distance`` (1e9 elements) keeps every parameter of a model under
  ~1e9 elements gathered until its backward, so ds3 all-gathers once a step. The pair for ds3; ``zero3``
  (frees all but two units, as FSDP2 frees all but the root) is the pair for FSDP2;
* ``zero3_ds``: ``zero3_keep`` with DeepSpeed ZeRO-3's default prefetch bucket as the unit budget
  (``zero.unit_mb`` = 5e7 elements × 4 B / 2**20, parallel/zero/unit_plan.merge_units): consecutive block units
  merged into one FlatBucket up to 190.7 MiB, every unit kept — DeepSpeed ZeRO-3's behaviour as shipped (one
  all-gather of the whole model and one reduce-scatter per step below 5e7 elements). Also paired with ds3.

A row is a :class:`Row`: ``step()`` runs one training step and returns this rank's loss (ours: the
global mean it already computes); ``finish()`` waits for any work the step left in flight (ours:
``overlap_param_gather`` all-gathers) so it cannot leak into the next row's time. ``comm`` is the
per-step traffic per op ({op: {calls, wire_bytes}}): measured by our CommStats for our rows,
the ring-model theory for peers (DESIGN.md); ``impl`` says whose bandwidth each op runs at.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

LR = 1e-4
WD = 0.01      # torch.optim.AdamW's default, which our rows use; DeepSpeedCPUAdam's default is 0.0, so it is passed
PEERS = ["local", "ddp", "ddp_aa", "ddp_tuned", "fsdp2", "fsdp2_prefetch", "fsdp2_ring", "ds1", "ds2", "ds3"]
OURS = ["zero0", "zero1", "zero2", "zero3", "zero3_keep", "zero3_ds"]
DS_UNIT_MB = 5e7 * 4 / 2 ** 20       # DeepSpeed's default stage3_prefetch_bucket_size (elements) × fp32 bytes, MiB
from benchmarks.proto_rows_mp import MP_ROWS, PEER_OF_MP, WHAT_MP, build_mp, micro_sizes  # noqa: E402, F401

ROWS = PEERS + OURS + MP_ROWS
WHAT = {"local": "no communication (compute floor)", "ddp": "torch DDP, defaults", "ddp_aa": "torch DDP again (A/A)",
        "ddp_tuned": "torch DDP, gradient_as_bucket_view + static_graph", "fsdp2": "torch FSDP2 fully_shard per block",
        "fsdp2_prefetch": "FSDP2 + explicit forward/backward prefetch", "fsdp2_ring": "FSDP2 + prefetch + our ring",
        "ds1": "DeepSpeed ZeRO-1, DeepSpeedCPUAdam",
        "ds2": "DeepSpeed ZeRO-2, DeepSpeedCPUAdam", "ds3": "DeepSpeed ZeRO-3, persistence threshold 0",
        "zero0": "ours ZeRO-0 (data parallel)", "zero1": "ours ZeRO-1", "zero2": "ours ZeRO-2",
        "zero3": "ours ZeRO-3 per block", "zero3_keep": "ours ZeRO-3 per block, every unit kept into backward",
        "zero3_ds": "ours ZeRO-3, units merged up to DeepSpeed's prefetch bucket (5e7 elements), all kept",
        **WHAT_MP}
# the natural peer of each row, for the paired ratios
PEER_OF = {"ddp_aa": "ddp", "ddp_tuned": "ddp", "fsdp2_prefetch": "fsdp2", "fsdp2_ring": "fsdp2_prefetch",
           "zero0": "ddp_tuned", "zero1": "ddp_tuned", "zero2": "ddp_tuned", "zero3": "fsdp2_prefetch",
           "zero3_keep": "zero3", "zero3_ds": "zero3_keep",
           "ds1": "ddp_tuned", "ds2": "ddp_tuned", "ds3": "fsdp2", "fsdp2": "ddp", "local": "ddp", **PEER_OF_MP}
DS_PEER = {"zero1": "ds1", "zero2": "ds2", "zero3": "ds3", "zero3_keep": "ds3", "zero3_ds": "ds3"}
# What a peer's step moves through memory besides forward/backward (parallel/planning/time_terms.py's
# accounting, bytes moved per element, write-allocates included), replacing our engine's terms in the
# planner's prediction: (per owned element: optimizer + norm, per local gradient element: bookkeeping).
# torch AdamW single-tensor 88; DeepSpeedCPUAdam one fused pass 28 + its norm 4. Gradients: plain
# autograd with set_to_none hands over its own tensors (0); DDP copies each gradient into its bucket
# (read 4, write 4 + write-allocate 4) and divides it in place (8), and by default copies it back (12):
# 32, with gradient_as_bucket_view 20; FSDP2 copies the gathered parameters out in forward and again in
# backward (2 × 12), the gradients into its reduce-scatter buffer (12) and divides them (8): 44;
# DeepSpeed ZeRO-1/2/3 copies gradients into its reduction buffer and divides them: 20.
UPDATE_MOVED = {"local": (88, 0), "ddp": (88, 32), "ddp_aa": (88, 32), "ddp_tuned": (88, 20),
                "fsdp2": (88, 44), "fsdp2_prefetch": (88, 44), "fsdp2_ring": (88, 44),
                "ds1": (32, 20), "ds2": (32, 20), "ds3": (32, 20), "tp_dtensor": (88, 0), "pp_torch": (88, 0)}
ALSO = {"zero3": ["fsdp2", "fsdp2_ring"], "zero3_keep": ["fsdp2_ring"], "zero0": ["ddp"], "zero1": ["zero0"],
        "zero2": ["zero0"]}   # further pairs


@dataclass
class Row:
    name: str
    step: object
    finish: object = lambda: None
    owned: int = 0                       # elements this rank's optimizer updates
    comm: dict = field(default_factory=dict)
    source: str = "theory"
    impl: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)    # planner Layout kwargs
    ours: bool = False
    global_loss: bool = False                     # step() returns the global-batch loss already (ours do too)
    keep: int = 0                                 # stage 3: units kept gathered from forward to backward (planner)


def _op(out: dict, op: str, calls: int, wire: float, impl: str = "gloo") -> None:
    c = out.setdefault(op, {"calls": 0, "wire_bytes": 0.0, "impl": impl})
    c["calls"] += calls
    c["wire_bytes"] += wire


def _model(kw):
    from examples.gpt import GPT
    torch.manual_seed(0)
    return GPT(**kw)


def _batch(kw, per, world, rank):
    from examples.gpt import random_tokens
    ds = random_tokens(per * world, kw["seq_len"], kw["vocab_size"])
    x, y = (torch.stack(t) for t in zip(*(ds[i] for i in range(rank * per, (rank + 1) * per))))
    return x, y


def _plain_step(mod, opt, x, y, V):
    def step():
        opt.zero_grad()
        loss = F.cross_entropy(mod(x).reshape(-1, V), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss.item()
    return step


def _psi(model) -> int:
    return sum(p.numel() for p in model.parameters())


FLAT_ROWS = ("ds1", "ds2")     # one gloo all-reduce and one all-gather over the whole flat gradient per step


def flat_elements(kw: dict, rows) -> int:
    """Ψ of model ``kw`` when a row of :data:`FLAT_ROWS` runs (the message benchmarks/proto_calib.py then times gloo
    at: ``flat.gloo.*``), else 0."""
    return _psi(_model(kw)) if set(FLAT_ROWS) & set(rows) else 0


def build(name: str, kw: dict, per: int, world: int, rank: int) -> Row:
    """Row ``name`` (module docstring) on this rank; raises ImportError etc. when it cannot run."""
    if name in OURS:
        return _ours(name, kw, per, world, rank)
    if name in MP_ROWS:
        row = build_mp(name, kw, per, world, rank, Row, _op, LR, WD)
        row.name, row.global_loss = name, True
        row.ours = name.endswith("_ours") or name.endswith("_m8")
        return row
    if name.startswith("ds"):
        return _deepspeed(name, kw, per, world, rank)
    model, V, N = _model(kw), kw["vocab_size"], world
    x, y = _batch(kw, per, world, rank)
    psi, b = _psi(model), 4
    comm: dict = {}
    if name == "local":
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        return Row(name, _plain_step(model, opt, x, y, V), owned=psi, layout={"dp": 1})
    if name.startswith("ddp"):
        extra = {"gradient_as_bucket_view": True, "static_graph": True} if name == "ddp_tuned" else {}
        mod = torch.nn.parallel.DistributedDataParallel(model, **extra)
        opt = torch.optim.AdamW(mod.parameters(), lr=LR)
        first = dist._DEFAULT_FIRST_BUCKET_BYTES
        buckets = 1 + max(0, math.ceil((psi * b - first) / (25 * 2 ** 20)))
        _op(comm, "all_reduce", buckets, 2 * (N - 1) / N * psi * b)
        return Row(name, _plain_step(mod, opt, x, y, V), owned=psi, comm=comm, layout={"dp": N, "zero": 0})
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    blocks = list(model.blocks)
    for blk in blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if name in ("fsdp2_prefetch", "fsdp2_ring"):
        for i, blk in enumerate(blocks):
            if i + 1 < len(blocks):
                blk.set_modules_to_forward_prefetch([blocks[i + 1]])
            if i > 0:
                blk.set_modules_to_backward_prefetch([blocks[i - 1]])
    stats = _ring_comms(blocks + [model]) if name == "fsdp2_ring" else None
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    p_blocks = sum(_psi(blk) for blk in blocks)
    # blocks: all-gather in forward and again in backward; the root keeps its parameters after forward
    _op(comm, "all_gather", 2 * len(blocks) + 1, (N - 1) / N * (2 * p_blocks + psi - p_blocks) * b)
    _op(comm, "reduce_scatter", len(blocks) + 1, (N - 1) / N * psi * b)
    row = Row(name, _plain_step(model, opt, x, y, V), owned=-(-psi // N), comm=comm,
              layout={"dp": N, "zero": 3, "units": "block"}, keep=1)          # FSDP2 keeps the root's unit
    if stats is not None:
        row.stats, row.source = stats, "measured"
    return row


def _ring_comms(modules) -> object:
    """FSDP2's all-gather and reduce-scatter through parallel.comm (ring on gloo); returns the CommStats."""
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

    from parallel.comm.collectives import CommStats, Group, all_gather_into, reduce_scatter_into
    stats, groups = CommStats(), {}

    def grp(pg):
        if pg not in groups:
            groups[pg] = Group(pg, "dp", tuple(dist.get_process_group_ranks(pg)), dist.get_rank(pg), stats)
        return groups[pg]

    class _Alloc:
        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

    class RingAG(_Alloc, AllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            return all_gather_into(output_tensor, input_tensor, grp(group), async_op=async_op)

    class RingRS(_Alloc, ReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            avg = op == dist.ReduceOp.AVG
            if not avg and op != dist.ReduceOp.SUM:
                raise NotImplementedError(f"fsdp2_ring: reduce-scatter op {op} (only SUM and AVG)")
            work = reduce_scatter_into(output_tensor, input_tensor, grp(group), async_op=async_op)
            if work is not None:
                work.wait()
            if avg:
                output_tensor.div_(grp(group).size)
            return None
    for m in modules:
        m.set_custom_all_gather(RingAG())
        m.set_custom_reduce_scatter(RingRS())
    return stats


def _ours(name, kw, per, world, rank) -> Row:
    from examples.gpt import random_tokens
    from parallel.config import load_config
    from parallel.data import rank_batch
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    stage = int(name[4])
    G = per * world
    zero = {"stage": stage, **({"units": "block"} if stage == 3 else {})}
    if name in ("zero3_keep", "zero3_ds"):    # every unit: n_layer blocks + the root's (merged: fewer)
        zero["keep_after_forward"] = kw["n_layer"] + 1
    if name == "zero3_ds":
        zero["unit_mb"] = DS_UNIT_MB
    cfg = load_config(data={
        "model": {"factory": "examples.gpt:build", "kwargs": kw},
        "data": {"factory": "examples.gpt:random_tokens", "global_batch_size": G, "micro_batch_size": per,
                 "kwargs": {"n": G, "seq_len": kw["seq_len"], "vocab_size": kw["vocab_size"]}},
        "parallel": {"dp": world}, "zero": zero, "optimizer": {"name": "adamw", "lr": LR}}).validate(world)
    ds = random_tokens(G, kw["seq_len"], kw["vocab_size"])
    mesh = Mesh(dp=world)
    engine = parallelize(_model(kw), cfg, mesh)
    local = rank_batch(ds, 0, G, world, mesh.local_rank("dp"), 0, False)
    z = engine.zero
    owned = sum(sum(p.numel() for p in g["params"]) for g in z.optimizer.param_groups)

    def finish():
        if getattr(z, "_pending", None):
            z.wait_param_gather()
    if stage == 3 and name == "zero3_keep" and len(z.stage3.units) != zero["keep_after_forward"]:
        raise RuntimeError(f"zero3_keep: {len(z.stage3.units)} stage-3 units, {zero['keep_after_forward']} kept")
    row = Row(name, lambda: engine.train_step(local), finish, owned=owned, source="measured", ours=True,
              layout={"dp": world, "zero": stage, **({"units": "block"} if stage == 3 else {}),
                      **({"unit_mb": DS_UNIT_MB} if name == "zero3_ds" else {})},
              keep=cfg.zero.keep_after_forward if stage == 3 else 0)
    row.stats, row.engine = mesh.stats, engine                 # engine: benchmarks/proto_profile.py's phases
    return row


def measure_comm(row: Row) -> float:
    """Rows with a CommStats (ours, fsdp2_ring): one step's traffic (run between warm-up steps). Reduce-scatter and
    all-gather of ≥ parallel.comm.ring.MIN_BYTES run on our ring; the rest on gloo."""
    from parallel.comm.ring import MIN_BYTES
    before = row.stats.snapshot()
    loss = row.step()
    row.finish()
    diff = row.stats.diff(row.stats.snapshot(), before)
    row.comm, row.comm_axes = {}, diff
    for ops in diff.values():
        for op, c in ops.items():
            big = c["payload_bytes"] / c["calls"] >= MIN_BYTES
            impl = "ring" if op in ("reduce_scatter", "all_gather") and big else "gloo"
            _op(row.comm, op, c["calls"], c["wire_bytes"], impl)
    return loss


def _deepspeed(name, kw, per, world, rank) -> Row:
    import deepspeed  # ImportError: the row is skipped
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    stage, N, b = int(name[-1]), world, 4
    model, V = _model(kw), kw["vocab_size"]
    x, y = _batch(kw, per, world, rank)
    psi = _psi(model)
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    # gradient_clipping 0: DeepSpeed 0.19.8 clips at 1.0 when the key is absent (GRADIENT_CLIPPING_DEFAULT), which
    # the other rows do not do (Adam's first update is scale-free, so losses agreed at step 2 and split at step 3)
    cfg = {"train_micro_batch_size_per_gpu": per, "gradient_accumulation_steps": 1, "zero_optimization": zero,
           "steps_per_print": 10 ** 9, "gradient_clipping": 0.0}
    # its defaults differ from torch.optim.AdamW's only in weight_decay (0.0 vs 0.01): pass torch's, the rest
    # (betas 0.9/0.999, eps 1e-8 outside the square root, bias correction, decoupled decay) is the same math
    opt = DeepSpeedCPUAdam(model.parameters(), lr=LR, weight_decay=WD, adamw_mode=True)
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)

    def step():
        loss = F.cross_entropy(eng(x).reshape(-1, V), y.reshape(-1))
        eng.backward(loss)
        eng.step()
        return loss.item()
    comm: dict = {}
    if stage == 3:
        _op(comm, "reduce_scatter", 1, (N - 1) / N * psi * b)
        _op(comm, "all_gather", 2, 2 * (N - 1) / N * psi * b)
    else:     # counted (benchmarks/proto_profile.py): ZeRO-1/2 all-reduce the whole flat gradient on CPU/gloo, then
        _op(comm, "all_reduce", 1, 2 * (N - 1) / N * psi * b)        # keep their partition; one parameter all-gather
        _op(comm, "all_gather", 1, (N - 1) / N * psi * b)
    return Row(name, step, owned=-(-psi // N), comm=comm, layout={"dp": N, "zero": stage})
