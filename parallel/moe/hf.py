"""Expert parallelism for unmodified transformers MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

Current transformers store a layer's experts fused (``@use_experts_implementation`` classes such as
``MixtralExperts``): ``gate_up_proj`` [E, 2f, h] ([gate; up] concatenated, applied as x·Wᵀ),
``down_proj`` [E, h, f], ``act_fn``, and ``forward(hidden_states [T, h], top_k_index [T, k],
top_k_weights [T, k]) → [T, h]`` computing Σ_j w_tj · down_e(act(gate_e x) ⊙ up_e x) with e = idx_tj.
The model's own router (its ``gate``) and aux loss (``output_router_logits``, computed from the
router logits of the local tokens) stay as they are; :func:`convert_hf_experts` replaces each such
experts module by :class:`ExpertParallelExperts`, which keeps experts [r·E/ep, (r+1)·E/ep) under
the same parameter names and computes the same function dropless: tokens are dispatched to their
experts' ranks by all-to-all (:mod:`parallel.moe.dispatch`) and each rank's experts run as two
batched matmuls.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from parallel.comm import Group
from parallel.moe.dispatch import combine, dispatch, dropless_capacity, plan_slots, run_experts
from parallel.moe.tp import copy_tp_info, enter, fused_layout_problem, is_dense_experts, leave
from parallel.parameters import param_info

__all__ = ["ExpertParallelExperts", "find_hf_experts", "convert_hf_experts"]


def _is_fused_experts(m: nn.Module) -> bool:
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return (isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3
            and hasattr(m, "act_fn") and hasattr(m, "num_experts"))


def find_hf_experts(model: nn.Module) -> list:
    """(name, module) of every fused transformers experts module."""
    return [(n, m) for n, m in model.named_modules() if _is_fused_experts(m)]


class ExpertParallelExperts(nn.Module):
    """This rank's experts of a fused transformers experts module, with its forward signature: experts
    [r·E/ep, (r+1)·E/ep) of ep rank r (:meth:`shard_ep`), each split over tp when ``tp_group`` is set
    (:mod:`parallel.moe.tp`: gate/up by columns, down by rows, one tp all-reduce after the combine)."""

    def __init__(self, src: nn.Module, ep_group: Group | None, name: str = "experts"):
        super().__init__()
        why = fused_layout_problem(name, src)
        if why:
            raise ValueError(why + "; this experts layout is not supported by parallel.ep / moe_tp_experts yet")
        gu, dn, E = src.gate_up_proj, src.down_proj, src.num_experts
        self.name, self.num_experts, self.first, self.act_fn = name, E, 0, src.act_fn
        self.ep_group, self.tp_group = None, None
        self.gate_up_proj, self.down_proj = gu, dn
        self.last_load, self.last_dropped = None, 0
        if ep_group is not None and ep_group.size > 1:
            self.shard_ep(ep_group)

    @torch.no_grad()
    def shard_ep(self, ep_group: Group) -> None:
        """Keep experts [r·E/ep, (r+1)·E/ep) of ep rank r (new Parameters, flagged ``ep_split``)."""
        E, ep = self.num_experts, ep_group.size
        if E % ep:
            raise ValueError(f"{self.name}: {E} experts do not split over parallel.ep={ep} ranks: "
                             f"choose ep dividing {E}")
        n, lo = E // ep, ep_group.rank * (E // ep)
        for attr in ("gate_up_proj", "down_proj"):
            p = getattr(self, attr)
            q = nn.Parameter(p.data[lo:lo + n].clone(), requires_grad=p.requires_grad)
            param_info(q).ep_split = True
            copy_tp_info(p, q)
            setattr(self, attr, q)
        self.first, self.ep_group = lo, ep_group

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.bmm(x, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        return torch.bmm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        E = self.num_experts
        x, w = enter(hidden_states, top_k_weights, self.tp_group)
        s = plan_slots(top_k_index, w, E, lambda load: dropless_capacity(load, self.ep_group))
        out = run_experts(dispatch(x, s, E), self._local, self.ep_group)
        self.last_load = s.load.detach()
        return leave(combine(out, s, hidden_states.shape[0]), self.tp_group).to(hidden_states.dtype)


def convert_hf_experts(model: nn.Module, ep_group: Group | None, names=None) -> list:
    """Replace every fused transformers experts module of ``model`` (or those named in ``names``) by an
    :class:`ExpertParallelExperts` holding this ep rank's experts (in place; one already converted, by the
    tp plan's ``moe_tp_experts``, is split over ep where it is); returns the modules."""
    out = []
    for name, m in find_hf_experts(model):
        if names is not None and name not in names:
            continue
        if isinstance(m, ExpertParallelExperts):
            if ep_group is not None and ep_group.size > 1 and m.ep_group is None:
                m.shard_ep(ep_group)
            out.append(m)
            continue
        if is_dense_experts(m):
            raise ValueError(f"{name} ({type(m).__name__}): these experts take every token (pre-scaled by the router), "
                             f"so there is nothing to dispatch over parallel.ep; use parallel.ep=1 (parallel.tp > 1 "
                             f"splits each of them: moe_tp_experts)")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = ExpertParallelExperts(m, ep_group, name)
        setattr(parent, attr, new)
        out.append(new)
    return out
