"""Expert tensor parallelism: every expert's matrices split over the tp axis (Megatron-Core's expert tensor
parallelism; Megatron-LM, Shoeybi et al., arXiv 1909.08053, §3, applied to each expert).

An expert y = W2 act(W1 x + b1) + b2 (or, gated, y = D (act(G x) ⊙ U x)) is split as Megatron splits an
MLP: W1 = [W1_1 … W1_p] (and G, U, b1) by columns, W2 by rows, so tp rank i computes
y_i = W2_i act(W1_i x + b1_i) + b2⁽ⁱ⁾ (b2⁽ⁱ⁾: b2 on rank i's h/tp columns, zero elsewhere) and y = Σ_i y_i.
The routing is the same on every tp rank (same tokens, replicated router), so each rank dispatches the same
slots, runs its slice of every expert, and combines its partial outputs with the routing weights; as the
combine is linear, ONE all-reduce over tp after it gives y_t = Σ_j w_tj · expert_{e_tj}(x_t) (g: all-reduce
forward, identity backward). Its conjugate f
(identity forward, all-reduce backward) goes on what the partial path reads: the tokens x (∂L/∂x through
the experts is a partial sum over the slices) and the routing weights w (∂L/∂w_tj = ⟨∂L/∂y_t, y_i⟩ is
partial too); both gradients are all-reduced together, once per layer and micro-batch (:func:`enter`).
b2 is split by columns (h/tp each): rank i adds its columns of b2 to the same columns of its partial output,
so the sum has every column's bias once and ∂L/∂b2_i is whole on rank i (no communication). The router and
aux losses see only replicated values, so their gradients are already whole on every tp rank.

Layouts split here (rank i keeps piece i of each dim named; ``param_info(p).tp_dim`` records it):
* :class:`parallel.moe.experts.GroupedExperts`: W1 [E, h, f] dim 2, b1 [E, f] dim 1, W2 [E, f, h] dim 1,
  b2 [E, h] dim 1.
* transformers fused experts: gate_up_proj [E, 2f, h] dim 1 in two sections (gate, up, each split: rank i
  holds [G_i; U_i]), down_proj [E, h, f] dim 2.
* Llama-4's dense experts (every token of every expert, pre-scaled; transformers' own ``moe_tp_experts``
  layout): gate_up_proj [E, h, 2f] dim 2 in two sections, down_proj [E, f, h] dim 1; f on the input and g
  on the output by forward hooks, the module's own forward running on the slices.
With ep the ep split (dim 0) and this one compose: a rank holds (E/ep)·(1/tp) of the expert parameters.
Sequence parallelism is refused for MoE layers (tokens would be a sequence shard per tp rank).
"""
from __future__ import annotations

import functools
import inspect
import weakref

import torch
import torch.nn as nn

from parallel import comm
from parallel.comm import Group
from parallel.parameters import param_info

__all__ = ["expert_tp_problem", "split_experts_tp", "enter", "leave", "is_experts_module", "is_dense_experts",
           "fused_layout_problem", "copy_tp_info"]


def _gate_up_down(m: nn.Module) -> bool:
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return (isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3
            and hasattr(m, "act_fn") and hasattr(m, "num_experts"))


def is_dense_experts(m: nn.Module) -> bool:
    """Llama-4's experts: forward(hidden_states [E·n, h]) on tokens already sorted by expert and scaled by their
    router scores, y_e = (up_e ⊙ act(gate_e)) · down_e with gate_up_proj [E, h, 2f] and down_proj [E, f, h]
    applied as x·W; the caller sums the experts' outputs (transformers' ``moe_tp_experts`` layout)."""
    if not _gate_up_down(m):
        return False
    gu, dn = m.gate_up_proj, m.down_proj
    try:
        params = list(inspect.signature(m.forward).parameters)
    except (TypeError, ValueError):
        return False
    return (params == ["hidden_states"] and gu.shape[0] == dn.shape[0] and gu.shape[1] == dn.shape[2]
            and gu.shape[2] == 2 * dn.shape[1] and [n for n, _ in m.named_parameters()] == ["gate_up_proj",
                                                                                           "down_proj"])


def _fused(m: nn.Module) -> bool:
    return _gate_up_down(m) and not is_dense_experts(m)


def _grouped(m: nn.Module) -> bool:
    w1, w2 = getattr(m, "w1", None), getattr(m, "w2", None)
    return isinstance(w1, nn.Parameter) and isinstance(w2, nn.Parameter) and w1.dim() == 3 and w2.dim() == 3


def is_experts_module(m: nn.Module) -> bool:
    """A module this file can split: GroupedExperts (w1, w2 [E, …]), a transformers fused experts module, or
    Llama-4's dense experts."""
    return _grouped(m) or _gate_up_down(m)


# transformers' @use_experts_implementation flags, and the values whose forward parallel.moe computes:
# y = Σ_j w_j · down_e(act(gate_e x) ⊙ up_e x), [gate; up] concatenated, x·Wᵀ, no biases, no post-expert norm
_HF_FLAGS = {"is_concatenated": True, "is_transposed": False, "has_bias": False, "has_gate": True,
             "has_post_expert_norm": False}


def fused_layout_problem(name: str, m: nn.Module) -> str | None:
    """Why a transformers fused experts module does not compute what :mod:`parallel.moe` computes for it."""
    gu, dn = m.gate_up_proj, m.down_proj
    extra = [n for n, _ in m.named_parameters() if n not in ("gate_up_proj", "down_proj")]
    flags = {k: getattr(m, k) for k, v in _HF_FLAGS.items() if hasattr(m, k) and getattr(m, k) != v}
    gate = getattr(type(m), "_apply_gate", None)
    own_gate = gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate"
    E = getattr(m, "num_experts", None)
    shapes = gu.shape[0] == dn.shape[0] == E and gu.shape[1] == 2 * dn.shape[2] and gu.shape[2] == dn.shape[1]
    if extra or flags or own_gate or not shapes:
        return (f"{name} ({type(m).__name__}): parallel.moe computes fused experts with gate_up_proj [E, 2f, h] "
                f"([gate; up]) and down_proj [E, h, f] only (got {tuple(gu.shape)}, {tuple(dn.shape)}, E = {E}"
                + (f", other parameters {extra}" if extra else "") + (f", {flags}" if flags else "")
                + (", its own _apply_gate" if own_gate else "") + ")")
    return None


def _ffn(m: nn.Module) -> int:
    return m.w1.shape[2] if _grouped(m) else m.down_proj.shape[1] if is_dense_experts(m) else m.down_proj.shape[2]


def expert_tp_problem(name: str, m: nn.Module, tp: int, sequence_parallel: bool = False) -> str | None:
    """Why ``moe_tp_experts`` cannot split module ``name`` over ``tp`` ranks (None when it can)."""
    kind = type(m).__name__
    if not is_experts_module(m):
        return (f"{name}: style 'moe_tp_experts' needs an experts module (parallel.moe GroupedExperts, or a "
                f"transformers fused experts module with gate_up_proj [E, 2f, h] / down_proj [E, h, f]), found {kind}")
    if _fused(m) and (why := fused_layout_problem(name, m)):
        return why + "; leave it out of the tp plan (its experts then stay whole on every tp rank)"
    if getattr(m, "tp_group", None) is not None:
        return f"{name}: its experts are already split over tp"
    if _ffn(m) % tp:
        return f"{name}: the experts' hidden size f = {_ffn(m)} is not divisible by tp = {tp}"
    if _grouped(m) and getattr(m, "b2", None) is not None and m.b2.shape[-1] % tp:
        return f"{name}: the experts' output bias b2 has h = {m.b2.shape[-1]} columns, not divisible by tp = {tp}"
    if sequence_parallel and tp > 1:
        return (f"{name}: MoE experts under sequence parallelism are not supported (each tp rank would route "
                f"only its sequence shard): set parallel.sequence_parallel=false")
    return None


def _piece(p: nn.Parameter, dim: int, group: Group, sections=None) -> nn.Parameter:
    full = p.data
    if sections is None:
        t = full.chunk(group.size, dim)[group.rank]
    else:
        t = torch.cat([s.chunk(group.size, dim)[group.rank] for s in full.split(list(sections), dim)], dim)
    q = nn.Parameter(t.contiguous().clone(), requires_grad=p.requires_grad)
    old, info = param_info(p), param_info(q)
    info.ep_split, info.source = old.ep_split, old.source or weakref.ref(p)   # the checkpoint's meta probe follows it
    info.tp_dim, info.sections = dim, None if sections is None else tuple(int(s) for s in sections)
    return q


@torch.no_grad()
def split_experts_tp(m: nn.Module, group: Group) -> None:
    """Keep tp rank ``group.rank``'s slice of every expert of ``m`` (in place; sets ``m.tp_group``)."""
    if _grouped(m):
        for name, dim in (("w1", 2), ("b1", 1), ("w2", 1), ("b2", 1)):
            if getattr(m, name, None) is not None:
                setattr(m, name, _piece(getattr(m, name), dim, group))
    elif is_dense_experts(m):       # Llama-4: gate_up [E, h, 2f] dim 2 in (gate, up) sections, down [E, f, h] dim 1
        f = m.down_proj.shape[1]
        m.gate_up_proj = _piece(m.gate_up_proj, 2, group, (f, f))
        m.down_proj = _piece(m.down_proj, 1, group)
        m.register_forward_pre_hook(functools.partial(_enter_hook, group=group))
        m.register_forward_hook(functools.partial(_leave_hook, group=group))
    else:
        f = m.down_proj.shape[2]
        m.gate_up_proj = _piece(m.gate_up_proj, 1, group, (f, f))
        m.down_proj = _piece(m.down_proj, 2, group)
    m.tp_group = group


def _enter_hook(module, args, group):
    """Dense experts: f on the (scaled, expert-sorted) tokens."""
    return (comm.copy_to_group(args[0], group),) + tuple(args[1:])


def _leave_hook(module, args, output, group):
    """Dense experts: g, the tp ranks' partial outputs summed."""
    return comm.reduce_from_group(output, group)


def copy_tp_info(src: nn.Parameter, dst: nn.Parameter) -> None:
    """Carry the tp facts of ``src`` to ``dst`` (an ep slice of it along dim 0)."""
    a, b = param_info(src), param_info(dst)
    b.tp_dim, b.sections = a.tp_dim, a.sections


class _Enter(torch.autograd.Function):
    """f on (tokens, routing weights): identity forward; backward one all-reduce of both gradients (per
    dtype: one call in fp32 training, where the fp32 router weights and the tokens share it)."""

    @staticmethod
    def forward(ctx, group, *ts):
        ctx.group, ctx.meta = group, [(t.shape, t.dtype, t.device) for t in ts]
        return tuple(t.view_as(t) for t in ts)

    @staticmethod
    def backward(ctx, *grads):
        grads = [g if g is not None else torch.zeros(s, dtype=d, device=dev)
                 for g, (s, d, dev) in zip(grads, ctx.meta)]
        by_dtype: dict = {}
        for i, g in enumerate(grads):
            by_dtype.setdefault(g.dtype, []).append(i)
        out = list(grads)
        for idx in by_dtype.values():
            flat = torch.cat([grads[i].reshape(-1) for i in idx])
            comm.all_reduce(flat, ctx.group)
            for i, piece in zip(idx, flat.split([grads[i].numel() for i in idx])):
                out[i] = piece.view(ctx.meta[i][0])
        return (None, *out)


def enter(x: torch.Tensor, w: torch.Tensor, group: Group | None):
    """(x, w) unchanged forward; their gradients summed over tp in one all-reduce backward."""
    if group is None or group.size == 1 or not torch.is_grad_enabled():
        return x, w
    return _Enter.apply(group, x, w)


def leave(y: torch.Tensor, group: Group | None) -> torch.Tensor:
    """g: the tp ranks' partial combined outputs summed (one all-reduce forward, identity backward)."""
    if group is None or group.size == 1:
        return y
    return comm.reduce_from_group(y, group)
