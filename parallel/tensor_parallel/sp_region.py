"""What sequence parallelism (arXiv 2205.05198) leaves wrong: a module that the plan neither splits nor marks,
running where the residual stream is sequence-sharded, sees the rank's sequence shard alone.

Where the stream is [b, s/tp, h]: in the region layout (transformers models) the blocks, from the first block's
input to the final norm; in the Megatron layout (no ``seq_scatter_input``: the vocab embedding reduce-scatters)
everything from the embedding to the output layer. An "island" — a module holding column-parallel layers (the
attention, the MLP) — all-gathers its input (f̄, a pre-hook on the module), so everything in it sees the whole
sequence; a norm acts per token and its gradient is summed over tp. Any other module there that holds parameters
— a linear-attention, recurrent or convolutional mixer the plan does not name (OLMo-Hybrid's gated-delta layers,
at any depth: a wrapper holding a split attention beside an unsplit mixer), a replicated attention or MLP (a
published plan that splits only the embedding: Falcon-H1, LFM2, LFM2.5, DiffLlama, …), a parameter the block holds
itself — would mix or score only s/tp tokens, and its gradient would cover only them: a silent wrong number
(OLMo-Hybrid tp 2: 8.9e-4 relative off one process in 3 steps; Falcon-H1: 9.1e-3; LFM2: 2.0e-2).
:func:`unsplit_in_region` names them so the plan is refused before anything is converted.

The walk is recursive: a module is covered when it is an island, a norm, or named by the plan (a split layer, a
marker, the embedding, the output layer); one with a covered module (not a norm) below it, a block and a block
list are entered (their own parameters, if any, are named); any other module holding parameters is named.
"""
from __future__ import annotations

import torch.nn as nn

from parallel.tensor_parallel.styles import COLWISE, _is_norm

__all__ = ["unsplit_in_region"]

_HEADS = ("colwise_vocab", "colwise_gather")


def unsplit_in_region(matches: list, mods: dict) -> list[str]:
    """The modules holding parameters that would run on the rank's sequence shard with no split layer at or
    below them and no plan entry or norm covering them, as ``"<name> (<class>)"`` (a module's own parameters as
    ``"<name>: its parameters a, b (<class>)"``); empty when none. ``matches``: the plan's [(name, style, module)]
    under sequence parallel; ``mods``: the model's named modules."""
    styles = {s for _, s, _ in matches}
    entry = next((n for n, s, _ in matches if s == "seq_scatter_input"), None)
    if entry is not None:                            # region layout: the block list
        blocks_name = entry.rpartition(".")[0]
        blocks = mods.get(blocks_name)
        if not isinstance(blocks, nn.ModuleList):
            return []
        roots = [(f"{blocks_name}.{i}", b) for i, b in enumerate(blocks)]
    elif "vocab" in styles or "seq_scatter_output" in styles:   # Megatron layout: the whole model
        roots = [("", mods[""])]
    else:
        return []
    inside = entry.rpartition(".")[0] + "." if entry else None
    covered = {n for n, s, _ in matches if s != "seq_scatter_input"}
    covered |= {n.rpartition(".")[0] for n, s, _ in matches          # islands: parents of column layers
                if s in COLWISE and (s not in _HEADS or (s == "colwise_gather" and inside and n.startswith(inside)))}
    norms = {n for n, m in mods.items() if _is_norm(m)}
    bad: list[str] = []
    for name, m in roots:
        _walk(name, m, covered, norms, bad, True)
    return bad


def _walk(name: str, m: nn.Module, covered: set, norms: set, bad: list, enter: bool) -> None:
    """Name ``m`` in ``bad`` or enter it: entered when something the plan covers lies below it, or when it is a
    block or a block list (``enter``: its norms alone do not cover its mixers)."""
    if name in covered or name in norms or not any(True for _ in m.parameters()):
        return
    below = name + "." if name else ""
    if not (enter or any(c.startswith(below) for c in covered)):
        bad.append(f"{name} ({type(m).__name__})")
        return
    own = [k for k, p in m._parameters.items() if p is not None]
    if own:
        bad.append(f"{name or 'the model'}: its parameters {', '.join(own)} ({type(m).__name__})")
    for child, c in m.named_children():
        _walk(f"{below}{child}", c, covered, norms, bad, isinstance(m, nn.ModuleList) or isinstance(c, nn.ModuleList))
