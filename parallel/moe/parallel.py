"""Expert parallelism applied to a built model, and the engine's per-step hooks for MoE layers.

:func:`apply_expert_parallel` splits every :class:`~parallel.moe.layer.MoE` layer's experts (and every
transformers fused-experts module's, :mod:`parallel.moe.hf`) over the
ep group (rank r of ep keeps experts [r·E/ep, (r+1)·E/ep)); their parameters carry
``param_info(p).ep_split``, which makes ZeRO reduce and partition them over the expert-data-parallel
group (dp/ep ranks) with the gradient divided by the full dp size (Megatron-Core's
expert_gradient_scaling_factor = 1/dp): an expert on ep rank r already sums the gradients of the
tokens of all ep ranks, so Σ_edp / dp is the mean over the global batch.

Per-rank expert state = E/ep of the expert parameters (:func:`expert_param_counts`); with the tp plan's
``moe_tp_experts`` (:func:`split_experts_over_tp`, :mod:`parallel.moe.tp`) 1/(ep·tp) of W1/W2 (gate/up/down).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from parallel import comm
from parallel.comm import Group
from parallel.moe.experts import GroupedExperts
from parallel.moe.hf import convert_hf_experts, find_hf_experts
from parallel.moe.layer import MoE
from parallel.moe.tp import expert_tp_problem, is_dense_experts, split_experts_tp
from parallel.parameters import param_info

__all__ = ["apply_expert_parallel", "moe_layers", "set_aux_scale", "moe_counters", "expert_param_counts",
           "tp_experts_problem", "split_experts_over_tp", "has_experts"]


def has_experts(model: nn.Module) -> bool:
    """Whether ``model`` holds MoE layers or transformers fused experts."""
    return bool(moe_layers(model) or find_hf_experts(model))


def tp_experts_problem(name: str, m: nn.Module, parent: nn.Module, tp: int, sequence_parallel: bool) -> str | None:
    """Why the tp plan's ``moe_tp_experts`` cannot split module ``name`` (child of ``parent``); None if it can."""
    why = expert_tp_problem(name, m, tp, sequence_parallel)
    if why is None and isinstance(m, GroupedExperts) and not (isinstance(parent, MoE) and parent.experts is m):
        why = f"{name}: moe_tp_experts splits the experts of a parallel.moe.MoE layer, not a free GroupedExperts"
    return why


def split_experts_over_tp(model: nn.Module, name: str, group: Group) -> nn.Module:
    """Split the experts module ``name`` of ``model`` over the tp ``group`` (a transformers fused experts module is
    first replaced by :class:`parallel.moe.hf.ExpertParallelExperts`; Llama-4's dense experts are split in place,
    with f / g forward hooks); returns the module now in its place."""
    m = model.get_submodule(name)
    if not isinstance(m, GroupedExperts) and not is_dense_experts(m):      # Llama-4's keep their own forward
        m = convert_hf_experts(model, None, names={name})[0]
    split_experts_tp(m, group)
    return m


def moe_layers(modules, reset: bool = False) -> list:
    """The MoE layers of a module or a list of modules (pipeline stages), in order, each once; ``reset``:
    zero their counters (the pipeline split's trace forward runs them before training)."""
    mods = modules if isinstance(modules, (list, tuple, nn.ModuleList)) else [modules]
    seen = {}
    for m in mods:
        for sub in m.modules():
            if isinstance(sub, MoE):
                seen[id(sub)] = sub
                if reset:
                    sub.pop_counters()
    return list(seen.values())


def apply_expert_parallel(model: nn.Module, ep_group: Group, cp_group: Group | None = None,
                          sequence_parallel: bool = False) -> list:
    """Split the experts of every MoE layer of ``model`` over ``ep_group`` (in place); returns the
    layers. Raises when ep > 1 and the model has no experts to split. ``cp_group`` (context parallel):
    every MoE layer decides capacity and its aux loss over the whole sequence (:mod:`.sequence`);
    ``sequence_parallel`` (tp's, with cp): refused, the layer would see a tp slice of its cp shard."""
    layers = moe_layers(model)
    if cp_group is not None and cp_group.size > 1:
        _check_hf_aux(model, cp_group.size)
        if sequence_parallel and layers:
            raise ValueError(f"parallel.cp={cp_group.size} with parallel.sequence_parallel: an MoE layer would route a "
                             f"tensor-parallel slice of its cp shard, whose places in the sequence (which decide its "
                             f"capacity drops) it does not know; set parallel.sequence_parallel=false")
        for layer in layers:
            layer.seq_group = cp_group
    if ep_group.size > 1 and not layers and not find_hf_experts(model):
        raise ValueError(f"parallel.ep={ep_group.size}: the model has no Mixture-of-Experts layers whose experts could "
                         f"be split (parallel.moe.MoE, or a transformers fused-experts module with gate_up_proj / "
                         f"down_proj [E, …]); use parallel.ep=1 for a dense model")
    for layer in layers:
        if layer.num_experts % ep_group.size:
            raise ValueError(f"an MoE layer has {layer.num_experts} experts, which do not split over "
                             f"parallel.ep={ep_group.size} ranks: choose ep dividing the number of experts")
    if ep_group.size > 1:
        for layer in layers:
            layer.shard(ep_group)
        convert_hf_experts(model, ep_group)           # transformers models: their own router and aux loss stay
    return layers


def _check_hf_aux(model: nn.Module, cp: int) -> None:
    """transformers MoE models compute their own load-balancing loss from the router logits of the tokens
    they see: under cp a shard's, not the sequence's (f·P is not linear in the tokens) — refused."""
    if any(getattr(getattr(m, "config", None), "output_router_logits", False) for m in model.modules()) \
            and find_hf_experts(model):
        raise ValueError(f"parallel.cp={cp}: this transformers MoE model computes its load-balancing loss "
                         f"(output_router_logits=True) from the router logits of each rank's sequence shard, "
                         f"which is not the whole sequence's loss; set output_router_logits=False, or "
                         f"parallel.cp=1, or use parallel.moe.MoE layers (their loss is taken over the sequence)")


def set_aux_scale(layers: list, scale: float) -> None:
    """∂objective/∂(aux losses) for the coming backwards: loss_scale / micro-batches (see MoE)."""
    for layer in layers:
        layer.aux_scale = scale


def moe_counters(layers: list, group: Group | None = None) -> dict | None:
    """Summed counters of ``layers`` since the last call, totalled over ``group`` (the dp group; control
    traffic): {"expert_load": [tokens per expert, per layer], "dropped_tokens", "drop_fraction", "aux_loss",
    "z_loss"} (the losses are means over layers, micro-batches and ranks). None without MoE layers."""
    if not layers:
        return None
    cs = [layer.pop_counters() for layer in layers]
    E = max(layer.counters["load"].numel() for layer in layers)
    load = torch.zeros(len(cs), E, dtype=torch.float64)
    for i, c in enumerate(cs):
        load[i, :c["load"].numel()] = c["load"].double()
    rest = torch.tensor([sum(c["dropped"] for c in cs), sum(c["assignments"] for c in cs),
                         sum(c["aux_loss"] for c in cs), sum(c["z_loss"] for c in cs),
                         sum(c["calls"] for c in cs)], dtype=torch.float64)
    flat = torch.cat([load.reshape(-1), rest])
    if group is not None and group.size > 1:
        comm.all_reduce(flat, group.control())
    load, rest = flat[:-5].reshape(len(cs), E), flat[-5:]
    calls = max(rest[4].item(), 1.0)
    return {"expert_load": [[int(v) for v in row] for row in load.tolist()], "dropped_tokens": int(rest[0]),
            "drop_fraction": rest[0].item() / max(rest[1].item(), 1.0),
            "aux_loss": rest[2].item() / calls, "z_loss": rest[3].item() / calls}


def expert_param_counts(module: nn.Module) -> tuple[int, int]:
    """(expert elements held by this rank, other trainable elements)."""
    ex = sum(p.numel() for p in module.parameters() if param_info(p).ep_split)
    return ex, sum(p.numel() for p in module.parameters() if p.requires_grad) - ex
