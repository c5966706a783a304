"""The planner's model of a Mixture-of-Experts GPT under expert parallelism (examples/moe_gpt.py: every
block's MLP a :class:`parallel.moe.MoE`; or, ``mlp_matrices`` 3, a transformers model with a router and fused
gated experts in every block — Mixtral's layout, dropless, launch/plan.py's ``_hf_moe_spec``; the ep axis
carved out of dp — of dp×cp under context parallelism, whose index j = dp·cp + c takes dp's place below —
parallel/moe/groups.py).

Parameters of block i's MoE layer (in ``named_parameters`` order): the router W_r [E, h] — replicated
over tp, an ordinary parameter, reduced and partitioned over dp — then this rank's experts, E/ep of them
(ep) and f/t of each (tp: the MoE GPT's plan splits every expert, ``moe_tp_experts``, parallel/moe/tp.py):
W1 [E/ep, h, f/t], W2 [E/ep, f/t, h], b1 [E/ep, f/t], b2 [E/ep, h/t] (``ParamEntry.expert``). ZeRO keeps the
expert parameters in buckets of their own (stage 3: one unit per experts module), padded to and
partitioned over the expert-data-parallel group edp = dp/ep; dp rank d is edp rank ⌊d/ep⌋
(dp = edp·ep + e). So per rank: expert parameters Ψ_E/ep (stage 3: /dp), their gradients Ψ_E/ep
(stages 2–3: /dp), master and optimizer state Ψ_E/dp at stage ≥ 1 (DeepSpeed-MoE, Rajbhandari et al.,
arXiv 2201.05596, §4.1; ZeRO's formulas with N = edp on the expert part).

Communication per rank and step, added to the dense model's (b = bytes per element, m micro-batches,
L_r = MoE layers on the rank, β = micro-batch size, T = β·s tokens):
* all-to-all on ep, 4·L_r·m calls (dispatch and combine, forward and backward), each of the
  [E, C, h] slot buffer: E·C·h·b bytes, C = max(1, ⌈cf·T·k/E⌉) slots per expert, wire (ep−1)/ep of it
  (GShard, Lepikhin et al., arXiv 2006.16668). Dropless: C is the largest load, known only at run
  time; the planner takes its bound C = T (top-k experts are distinct, so no expert gets more than T);
  under cp the rank's T = β·s/cp tokens keep their share of the whole sequence's ⌈cf·cp·T·k/E⌉
  (parallel/moe/sequence.py), also known at run time: the bound min(that, T);
* edp: the expert buckets' reduction, as the dense buckets' over dp (stage 0 all-reduce; 1–2
  reduce-scatter + all-gather; 3 one reduce-scatter and 2·m all-gathers per unit) and at stage ≥ 1
  the 24-byte norm all-reduce; ep: the expert part of the norm, 24 bytes, every stage.
* tp (:func:`tp_moe_per_micro`): per MoE layer and micro-batch, in place of the dense MLP's 2 all-reduces of
  T·h·b: g after the combine (T·h·b) and f's backward all-reduce of the token and routing-weight
  gradients (T·h·b + T·k·4; one call when b = 4, else the fp32 weights' a second call);
  sequence parallelism with MoE layers is refused (by the engine too).

Control traffic (CommStats axes ``control:cp`` / ``control:ep``: not the algorithm's, but blocking — each result
is read on the host before the layer goes on — so in the step time), per MoE layer forward and micro-batch
(:func:`routing_control_per_micro`; a block activation checkpointing recomputes runs them again):
* under cp (our MoE layer, parallel/moe/sequence.py): the global expert counts, an all-reduce over cp of E int64
  (E·8 bytes); with a capacity factor, the all-gather of every cp rank's expert choices, β·s·k int64 out
  (β·s·k·8 bytes, wire (cp−1)/cp of it); and the slot buffer's size, an all-reduce max over ep of one int64;
* without cp: a dropless layer's largest load, the same 8-byte all-reduce max over ep (a transformers model's
  experts are dropless; under cp they see their shard alone: no cp traffic).

FLOPs: the experts run on all E·C slots (empty ones included): 2·2hf·E·C/T FLOPs per token forward,
plus the router's 2hE.
"""
from __future__ import annotations

import math

from parallel.planning.spec import Layout, ModelSpec, ParamEntry

__all__ = ["moe_entries", "capacity", "all_to_all_per_micro", "tp_moe_per_micro", "mlp_matmul_params", "check_moe",
           "activation_bytes", "routing_control_per_micro"]


def moe_entries(spec: ModelSpec, block: int, ep: int, t: int = 1) -> list:
    """The MoE layer's parameters of ``block`` on one rank of ep and tp: the router, then the experts — W1, W2, b1,
    b2 (parallel.moe.MoE); gated (``mlp_matrices`` 3, transformers' fused experts): gate_up [E/ep, 2f/t, h],
    down [E/ep, h, f/t], no biases."""
    h, f, n = spec.hidden, spec.ffn_ // t, spec.experts // ep
    pre = f"blocks.{block}.mlp."
    out = [ParamEntry(pre + "router", spec.experts * h, block)]
    if spec.mlp_matrices == 3:
        sizes = [n * 2 * f * h, n * h * f]
    else:
        sizes = [n * h * f, n * f * h] + ([n * f, n * h // t] if spec.bias else [])
    return out + [ParamEntry(pre + "experts", s, block, expert=ep > 1) for s in sizes]    # ep 1: ordinary


def capacity(spec: ModelSpec, tokens: int, cp: int = 1) -> int:
    """Slots per expert for ``tokens`` tokens of one micro-batch on one rank (dropless: the bound T). Under
    cp > 1 (``tokens`` = the rank's shard) the buffer holds the rank's share of the whole sequence's
    C = ⌈cf·cp·T·k/E⌉ kept assignments, known at run time: the planner takes its bound min(C, T)."""
    if spec.capacity_factor is None:
        return tokens
    C = max(1, math.ceil(spec.capacity_factor * tokens * cp * spec.top_k / spec.experts))
    return C if cp == 1 else min(C, tokens)


def all_to_all_per_micro(spec: ModelSpec, blocks: int, mb: int, e: int, cp: int = 1) -> tuple[int, int]:
    """(calls, payload bytes) of the ep all-to-alls of one micro-batch through ``blocks`` MoE blocks (``spec``:
    the rank's, seq = s/cp)."""
    C = capacity(spec, mb * spec.seq, cp)
    return 4 * blocks, 4 * blocks * spec.experts * C * spec.hidden * e


def routing_control_per_micro(spec: ModelSpec, lay: Layout, forwards: int, mb: int) -> dict:
    """{axis: {op: (calls, payload bytes)}} of the routing's control collectives in ``forwards`` MoE layer forwards
    of one micro-batch (module docstring; ``spec``: the rank's, seq = s/cp)."""
    out: dict = {}
    ours = spec.mlp_matrices != 3                   # parallel.moe.MoE; 3: a transformers model's dropless experts
    if not spec.experts or forwards <= 0:
        return out
    if lay.cp > 1 and ours:
        cp = out["control:cp"] = {"all_reduce": (forwards, forwards * spec.experts * 8)}
        if spec.capacity_factor is not None:
            cp["all_gather"] = (forwards, forwards * mb * spec.seq * lay.cp * spec.top_k * 8)
    if lay.ep > 1 and (lay.cp > 1 and ours or spec.capacity_factor is None):
        out["control:ep"] = {"all_reduce": (forwards, forwards * 8)}
    return out


def tp_moe_per_micro(spec: ModelSpec, blocks: int, mb: int, e: int) -> tuple[int, int]:
    """(calls, payload bytes) of the tp all-reduces of ``blocks`` MoE layers (experts split over tp), one
    micro-batch: g forward (T·h·e) and f backward (T·h·e + T·k·4, per dtype one call)."""
    T, h = mb * spec.seq, spec.hidden
    back = T * h * e + T * spec.top_k * 4
    return blocks * (2 + (e != 4)), blocks * (T * h * e + back)


def mlp_matmul_params(spec: ModelSpec, mb: int, cp: int = 1) -> float:
    """Matmul parameters per token of one MoE layer (the MLP's place in 6N): E·C/T experts' 2hf (gated 3hf),
    router hE."""
    T = mb * spec.seq
    return (spec.experts * capacity(spec, T, cp) / T * spec.mlp_matrices * spec.hidden * spec.ffn_
            + spec.hidden * spec.experts)


def check_moe(spec: ModelSpec, lay: Layout) -> str | None:
    """Why ``lay.ep`` cannot split this model (None when it can)."""
    if lay.ep < 1 or lay.zero_n % lay.ep:
        return f"ep = {lay.ep} must divide dp·cp = {lay.zero_n} (expert parallelism is carved out of dp×cp)"
    if lay.ep > 1 and not spec.experts:
        return f"ep = {lay.ep} needs a Mixture-of-Experts model (the spec has no experts)"
    if spec.experts and spec.experts % lay.ep:
        return f"{spec.experts} experts do not split over ep = {lay.ep}"
    if spec.experts and lay.sp and lay.tp > 1:
        return "MoE layers under sequence parallelism are not supported (parallel/moe/tp.py refuses them)"
    return None


def activation_bytes(spec: ModelSpec, mb: int, e: int, t: int = 1) -> float:
    """An estimate (not asserted) of what one MoE layer keeps for backward, one micro-batch, in place of the
    dense MLP's 2βsf·b: the router's fp32 logits and probabilities 2·T·E·4, the slot buffer the experts read
    E·C·h·b, their hidden pre- and post-activation 2·E·C·(f/t)·b, and the combine's gathered outputs T·k·h·b."""
    T = mb * spec.seq
    C = capacity(spec, T)
    return 8 * T * spec.experts + (spec.experts * C * (spec.hidden + 2 * spec.ffn_ / t)
                                   + T * spec.top_k * spec.hidden) * e
