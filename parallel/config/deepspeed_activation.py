"""DeepSpeed's ``activation_checkpointing`` block → ``activation_checkpointing.policy``.

DeepSpeed recomputes only what the model wraps in ``deepspeed.checkpointing.checkpoint``; the block
configures that function. parallel3d applies the policy to the repeated blocks itself, so a present
block means the nearest policy, printed:

  (block present)                 -> policy = full   (each repeated block recomputed in backward)
  cpu_checkpointing: true         -> policy = offload (DeepSpeed moves the checkpointed inputs to CPU
                                     and still recomputes; offload moves every saved tensor to CPU and
                                     recomputes nothing: device memory near zero either way)
  partition_activations: true     not honoured, printed: DeepSpeed splits the checkpointed inputs over
                                     the tp ranks; here they stay whole (parallel.sequence_parallel
                                     shards them); the numbers do not change
  number_checkpoints, contiguous_memory_optimization, synchronize_checkpoint_boundary, profile:
                                     buffer layout, synchronisation and profiling: ignored, printed.
"""
from __future__ import annotations

from parallel.config.deepspeed_mapper import AUTO, Mapper

KEY = "activation_checkpointing"
IGNORED = {"number_checkpoints": "sizes DeepSpeed's contiguous checkpoint buffer; the policy chooses the blocks",
           "contiguous_memory_optimization": "DeepSpeed's buffer layout for checkpointed inputs; memory only",
           "synchronize_checkpoint_boundary": "a device synchronisation at each checkpoint; timing only",
           "profile": "timing printout only"}


def map_activation_checkpointing(m: Mapper) -> None:
    block = m.block(KEY)
    if block is None:
        return
    m.sub_keys(block, KEY, ("partition_activations", "cpu_checkpointing"), IGNORED)
    cpu = m.value(block, "cpu_checkpointing", None, False)
    if cpu not in (True, False, AUTO):
        m.fail(f"{KEY}.cpu_checkpointing", f"expected true or false, got {cpu!r}")
    if cpu is True:
        m.set(f"{KEY}.cpu_checkpointing", True, "activation_checkpointing.policy", "offload",
              "nearest policy: saved activations in CPU memory, nothing recomputed")
    else:
        m.set(KEY, "(present)", "activation_checkpointing.policy", "full", "each repeated block recomputed in backward")
    if m.value(block, "partition_activations", None, False) is True:
        m.ignore(f"{KEY}.partition_activations", "not honoured: the checkpointed inputs stay whole on every tp rank "
                                                 "(parallel.sequence_parallel shards them); the numbers do not change")
