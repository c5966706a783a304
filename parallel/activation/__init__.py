"""Activation memory: checkpointing policies for the repeated blocks (:mod:`.checkpointing`) and a
counter of saved-activation bytes per block with the theory it is checked against (:mod:`.memory`)."""
from parallel.activation.checkpointing import (
    POLICIES,
    ActivationCheckpointing,
    apply_activation_checkpointing,
    repeated_blocks,
)
from parallel.activation.memory import SavedActivations, gpt_layer_bytes, korthikanti_layer_bytes

__all__ = ["POLICIES", "ActivationCheckpointing", "apply_activation_checkpointing", "repeated_blocks",
           "SavedActivations", "gpt_layer_bytes", "korthikanti_layer_bytes"]
