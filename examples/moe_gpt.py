"""A small Mixture-of-Experts GPT: examples/gpt.py with every block's MLP replaced by
:class:`parallel.moe.MoE` (top-k routing, capacity factor, aux losses). ``model.factory:
examples.moe_gpt:build``; train it with ``parallel.ep`` > 1 to split the experts over ranks."""
from __future__ import annotations

from examples.gpt import GPT, TP_PLAN
from parallel.moe import MoE


def build(vocab_size=64, seq_len=32, n_layer=2, n_head=4, n_embd=32, num_experts=8, top_k=2,
          capacity_factor=1.25, normalize_topk=True, aux_loss_coef=0.01, z_loss_coef=0.001, ffn_mult=4,
          tie=True) -> GPT:
    """The GPT built as examples.gpt builds it, then one MoE layer per block (deterministic under a seed)."""
    model = GPT(vocab_size=vocab_size, seq_len=seq_len, n_layer=n_layer, n_head=n_head, n_embd=n_embd, tie=tie)
    for block in model.blocks:
        block.mlp = MoE(n_embd, ffn_mult * n_embd, num_experts, top_k, capacity_factor, normalize_topk,
                        aux_loss_coef, z_loss_coef)
    # tensor parallelism splits attention, the embeddings and every expert (parallel.moe.tp); the router is replicated
    model.TP_PLAN = {**{k: v for k, v in TP_PLAN.items() if ".mlp." not in k}, "blocks.*.mlp.experts": "moe_tp_experts"}
    return model
