"""What sequence parallelism in the region layout (transformers models: the blocks' input is sequence-sharded
from the first block to the final norm, arXiv 2205.05198) leaves wrong: a module of a block that the plan
neither splits nor marks runs on the rank's sequence shard alone.

Inside the region the residual stream is [b, s/tp, h]. A split attention/MLP module (an "island": it holds
column/row layers) all-gathers its input and reduce-scatters its output, so it sees the whole sequence; a
norm acts per token and its gradient is summed over tp. Any other module of a block that holds parameters —
a linear-attention or recurrent mixer the published plan does not name (OLMo-Hybrid's gated-delta layers), a
replicated MLP — would mix or score only s/tp tokens, and its gradient would cover only them: a silent wrong
number (OLMo-Hybrid tp 2: 8.9e-4 relative off one process in 3 steps). :func:`unsplit_in_region` names them so
the plan is refused before anything is converted.
"""
from __future__ import annotations

import torch.nn as nn

from parallel.tensor_parallel.styles import COLWISE, EXPERTS, ROWWISE, _is_norm

__all__ = ["unsplit_in_region"]


def unsplit_in_region(matches: list, mods: dict) -> list[str]:
    """The direct children of each block (``<blocks>.<i>.<child>``) that hold parameters and that the plan
    neither splits (no split layer at or below them), marks, nor treats as a norm; empty when none."""
    entry = next((n for n, s, _ in matches if s == "seq_scatter_input"), None)
    if entry is None:
        return []
    blocks_name = entry.rpartition(".")[0]
    blocks = mods.get(blocks_name)
    if not isinstance(blocks, nn.ModuleList):
        return []
    named = {n for n, _, _ in matches}
    split = {n for n, s, _ in matches if s in COLWISE + ROWWISE + EXPERTS}
    bad = []
    for i, block in enumerate(blocks):
        for child, m in block.named_children():
            full = f"{blocks_name}.{i}.{child}"
            if not any(True for _ in m.parameters()) or _is_norm(m) or full in named:
                continue
            if any(n.startswith(full + ".") for n in split):
                continue
            bad.append(f"{full} ({type(m).__name__})")
    return bad
