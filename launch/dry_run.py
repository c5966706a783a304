"""``python -m launch --dry-run``: the resolved config, the mesh, each rank's pipeline stage and
shard sizes, the tensor-parallel plan, and the planner's per-rank memory estimate — without starting workers.

The model is built on the meta device (structure only: no memory, no initialisation)."""
from __future__ import annotations

import json

import torch
import yaml

from launch.plan import spec_from_model
from parallel.config import Config, import_object
from parallel.mesh import coords_of
from parallel.moe.groups import ep_layout
from parallel.pipeline import describe_split
from parallel.planning.fit import fit
from parallel.planning.optim_states import ONEBIT_NOTE
from parallel.planning.planner import Layout, TrainSpec, predict
from parallel.tensor_parallel.auto_plan import derive_plan
from parallel.tensor_parallel.plan import _checked_plan, apply_tensor_parallel
from parallel.tensor_parallel.styles import resolve_plan


def _mib(x: float) -> str:
    return f"{x / 2 ** 20:9.2f} MiB"


def _meta_model(cfg: Config):
    factory = import_object(cfg.model.factory, "model.factory")
    with torch.device("meta"):
        return factory(**cfg.model.kwargs)


def planner_inputs(cfg: Config, model, device: str | None = None):
    """(ModelSpec, Layout, TrainSpec) of a config (``device``: cuda | cpu, default: this machine's)."""
    seq = cfg.data.kwargs.get("seq_len") or cfg.model.kwargs.get("seq_len")
    spec = spec_from_model(model, seq)
    p = cfg.parallel
    lay = Layout(p.dp, p.tp, p.pp, cfg.zero.stage, cfg.micro_batches, p.pp_schedule, p.pp_virtual_stages,
                 p.sequence_parallel, cfg.zero.units, p.ep, cp=p.cp, cp_algorithm=p.cp_algorithm,
                 unit_mb=cfg.zero.unit_mb)
    ac = cfg.activation_checkpointing
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tr = TrainSpec(cfg.data.global_batch_size, cfg.precision, cfg.optimizer.name, bool(cfg.optimizer.momentum),
                   cfg.zero.bucket_mb, ac.policy, ac.every, device, cfg.optimizer.state_dtype or "fp32",
                   keep=cfg.zero.keep_after_forward, reuse=cfg.zero.max_reuse_distance,
                   offload=cfg.zero.offload.optimizer)
    return spec, lay, tr


def _prediction(cfg: Config, model):
    return predict(*planner_inputs(cfg, model))


def _split(model, cfg: Config) -> str | None:
    if cfg.parallel.pp == 1:
        return None
    args = (cfg.parallel.pp, cfg.parallel.pp_virtual_stages, cfg.parallel.pp_split)
    try:
        return str(describe_split(model, *args))
    except Exception as e:                       # a model whose forward needs real tensors
        if sum(p.numel() for p in model.parameters()) > 200_000_000:
            return f"(stage split not shown: the model's forward does not run on the meta device: {e})"
    real = import_object(cfg.model.factory, "model.factory")(**cfg.model.kwargs)     # small: build it for real
    return str(describe_split(real, *args))


def _tp_plan(model, cfg: Config) -> str:
    """The tensor-parallel plan the ranks will apply, as YAML for ``parallel.tp_plan`` (save and edit it): the
    configured one, the model's or transformers' published one, or the one derived from the module graph
    (verified on a real copy of the model when it is small, else shown unverified)."""
    tp, derived = cfg.parallel.tp, []

    def derive(meta_model):
        m = meta_model
        if sum(p.numel() for p in m.parameters()) <= 200_000_000:
            m = import_object(cfg.model.factory, "model.factory")(**cfg.model.kwargs)
        derived.append(derive_plan(m, tp, apply_tensor_parallel))
        return derived[-1].plan

    try:
        plan = resolve_plan(model, cfg.parallel.tp_plan, derive)
    except ValueError as e:
        return f"# (no tensor-parallel plan: {e})"
    if derived:
        return derived[-1].describe(tp)
    how = "as configured" if isinstance(cfg.parallel.tp_plan, dict) else "published by the model"
    text = yaml.safe_dump({"parallel": {"tp_plan": plan}}, sort_keys=False).rstrip()
    try:                                         # what every rank would refuse at setup, said here first
        _checked_plan(model, plan, tp, cfg.parallel.sequence_parallel)
    except ValueError as e:
        text += "\n# REFUSED: the ranks will stop at setup with: " + "\n#   ".join(str(e).splitlines())
    return f"# tensor-parallel plan ({how})\n{text}"


def _ep_lines(pred) -> list:
    """The planner's expert-parallel figures of rank 0: expert state and all-to-all bytes per step."""
    c = pred.comm[0]
    a2a = c.get("ep", {}).get("all_to_all", {"calls": 0, "payload_bytes": 0, "wire_bytes": 0})
    edp = sum(o["wire_bytes"] for o in c.get("edp", {}).values())
    return [f"#   rank 0 per step: all-to-all {a2a['calls']} calls, {a2a['payload_bytes']:,} B payload, "
            f"{round(a2a['wire_bytes']):,} B on the wire; expert gradient traffic over edp {round(edp):,} B "
            f"(model states above: expert parameters E/ep per rank, 1/tp of each expert under tp (moe_tp_experts), "
            f"their master / optimizer state 1/edp of that "
            f"at ZeRO ≥ 1)"]


def describe(cfg: Config, memory: float | None = None) -> str:
    """The dry run's text; ``memory`` (bytes per device): also whether the job fits, and if not the smallest
    change that does (:func:`parallel.planning.fit.fit`)."""
    p = cfg.parallel
    lines = ["# resolved config", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "",
             f"# mesh: pp={p.pp} × dp={p.dp} × cp={p.cp} × tp={p.tp} = {cfg.world_size} ranks (tp innermost), "
             f"ZeRO stage {cfg.zero.stage} over dp×cp = {p.dp * p.cp}, {cfg.precision}"
             + (f"; context parallel: {p.cp_algorithm}, sequence split in 2·cp = {2 * p.cp} zig-zag chunks"
                if p.cp > 1 else ""),
             f"# micro-batches per dp rank per step: {cfg.micro_batches} "
             f"(global batch {cfg.data.global_batch_size}, micro-batch {cfg.data.micro_batch_size})"]
    model = pred = None
    try:
        model = _meta_model(cfg)
        pred = _prediction(cfg, model)
    except Exception as e:
        lines.append(f"# (no per-rank estimate: {type(e).__name__}: {e})")
    if model is not None:
        split = _split(model, cfg)
        if split:
            lines += ["", "# pipeline stages", split]
        if p.tp > 1:
            lines += ["", _tp_plan(model, cfg)]
    lines += ["", "# per rank: coordinates and the planner's model-state / activation estimate (activation "
                  f"checkpointing: {cfg.activation_checkpointing.policy})"]
    for r in range(cfg.world_size):
        c = coords_of(r, {"pp": p.pp, "dp": p.dp, "cp": p.cp, "tp": p.tp})
        row = f"rank {r}: pp={c['pp']} dp={c['dp']} " + (f"cp={c['cp']} " if p.cp > 1 else "") + f"tp={c['tp']}"
        if pred is not None and r in pred.memory:
            m = pred.memory[r]
            row += (f"  params {_mib(m['params'])}  grads {_mib(m['grads'])}  optimizer "
                    f"{_mib(m['optimizer'] + m.get('master', 0))}  activations {_mib(m.get('activations', 0))}  "
                    f"peak {_mib(m.get('peak', m['total']))}")
            if "offload" in m:      # parallel/planning/offload_states.py
                row += f"  offloaded to {cfg.zero.offload.optimizer} {_mib(m['offload'])} (read+written each step)"
        lines.append(row)
    if p.ep > 1:
        eps, edps = ep_layout(p.pp, p.dp * p.cp, p.tp, p.ep)          # carved from dp×cp
        lines += [f"# expert parallelism: ep={p.ep} (experts split over ep, token all-to-all), expert gradients "
                  f"reduced over expert-data-parallel groups of {p.dp * p.cp // p.ep}; everything else over dp"
                  f"{'×cp' if p.cp > 1 else ''}",
                  f"#   ep groups:  {[list(g) for g in eps]}", f"#   edp groups: {[list(g) for g in edps]}"]
        if pred is not None:
            lines += _ep_lines(pred)
    if p.cp > 1 and pred is not None:
        seq = cfg.data.kwargs.get("seq_len") if isinstance(cfg.data.kwargs, dict) else None
        cp = {op: round(c["wire_bytes"]) for op, c in pred.comm[0].get("cp", {}).items()}
        lines.append(f"# context parallel ({p.cp_algorithm}): each rank holds s/cp = {seq}/{p.cp} tokens of every "
                     f"sequence (the activations above); cp wire bytes per step, rank 0: {json.dumps(cp)}")
    if pred is not None:
        axes = {}
        for ops in pred.comm.values():
            for axis, o in ops.items():
                axes[axis] = max(axes.get(axis, 0), sum(c["wire_bytes"] for c in o.values()))
        wire = json.dumps({a: round(v) for a, v in axes.items()})
        note = ONEBIT_NOTE.get(cfg.optimizer.name, "")                  # 1-bit optimizers: which step this is
        lines.append(f"# predicted wire bytes per step (max over ranks): {wire}{note}")
        if memory is not None:
            ans = fit(*planner_inputs(cfg, model), memory)
            lines += ["", *(f"# {line}" for line in ans.describe().splitlines())]
    elif memory is not None:
        lines.append("# (no answer to --memory: the planner could not read this model)")
    return "\n".join(lines)
