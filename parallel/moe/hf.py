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
    """This ep rank's experts of a fused transformers experts module, with its forward signature."""

    def __init__(self, src: nn.Module, ep_group: Group, name: str = "experts"):
        super().__init__()
        E, ep = src.num_experts, ep_group.size
        gu, dn = src.gate_up_proj, src.down_proj
        extra = [n for n, _ in src.named_parameters() if n not in ("gate_up_proj", "down_proj")]
        fused = gu.shape[0] == dn.shape[0] == E and gu.shape[1] == 2 * dn.shape[2] and gu.shape[2] == dn.shape[1]
        if extra or not fused:
            raise ValueError(f"{name} ({type(src).__name__}): expected only gate_up_proj [E, 2f, h] and down_proj "
                             f"[E, h, f] (got {tuple(gu.shape)}, {tuple(dn.shape)}, other parameters {extra}); this "
                             f"experts layout (biases / transposed weights) is not supported by parallel.ep yet")
        if E % ep:
            raise ValueError(f"{name}: {E} experts do not split over parallel.ep={ep} ranks: choose ep dividing {E}")
        n, lo = E // ep, ep_group.rank * (E // ep)
        self.num_experts, self.first, self.ep_group, self.act_fn = E, lo, ep_group, src.act_fn
        self.gate_up_proj = nn.Parameter(gu.data[lo:lo + n].clone(), requires_grad=gu.requires_grad)
        self.down_proj = nn.Parameter(dn.data[lo:lo + n].clone(), requires_grad=dn.requires_grad)
        for p in (self.gate_up_proj, self.down_proj):
            param_info(p).ep_split = True
        self.last_load, self.last_dropped = None, 0

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.bmm(x, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        return torch.bmm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        E = self.num_experts
        s = plan_slots(top_k_index, top_k_weights, E, lambda load: dropless_capacity(load, self.ep_group))
        out = run_experts(dispatch(hidden_states, s, E), self._local, self.ep_group)
        self.last_load = s.load.detach()
        return combine(out, s, hidden_states.shape[0]).to(hidden_states.dtype)


def convert_hf_experts(model: nn.Module, ep_group: Group) -> list:
    """Replace every fused transformers experts module of ``model`` by this rank's
    :class:`ExpertParallelExperts` (in place); returns the new modules."""
    out = []
    for name, m in find_hf_experts(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = ExpertParallelExperts(m, ep_group, name)
        setattr(parent, attr, new)
        out.append(new)
    return out
