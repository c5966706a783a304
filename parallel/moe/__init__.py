"""Mixture of Experts with expert parallelism (the ``ep`` axis, carved out of dp).

:class:`MoE` is the layer (router, capacity, all-to-all dispatch, batched experts, aux losses);
:func:`apply_expert_parallel` splits the experts of a built model over the ep group;
:mod:`.groups` builds the ep / expert-data-parallel groups of the mesh.
"""
from parallel.moe.experts import GroupedExperts
from parallel.moe.layer import MoE
from parallel.moe.parallel import apply_expert_parallel, moe_counters, moe_layers, set_aux_scale
from parallel.moe.router import TopKRouter, load_balancing_loss, router_z_loss

__all__ = ["MoE", "GroupedExperts", "TopKRouter", "load_balancing_loss", "router_z_loss",
           "apply_expert_parallel", "moe_layers", "set_aux_scale", "moe_counters"]
