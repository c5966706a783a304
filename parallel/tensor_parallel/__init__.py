"""Megatron-style tensor parallelism: column/row-parallel layers, vocab-parallel embedding and
cross-entropy, sequence parallelism, and plans that convert a user's model."""
from parallel.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from parallel.tensor_parallel.layers import (
                                             SEQ_DIM,
                                             ColumnParallelLinear,
                                             RowParallelLinear,
                                             VocabParallelEmbedding,
                                             seq_all_gather,
                                             seq_gather,
                                             seq_scatter,
                                             shard_tensor,
                                             sum_grads_over_tp,
)
from parallel.tensor_parallel.plan import apply_tensor_parallel, resolve_plan
from parallel.tensor_parallel.uneven import gather_vocab_logits

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
           "shard_tensor", "seq_scatter", "seq_gather", "seq_all_gather", "sum_grads_over_tp", "SEQ_DIM",
           "apply_tensor_parallel", "resolve_plan", "gather_vocab_logits"]
