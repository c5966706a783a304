"""What sequence parallelism (arXiv 2205.05198) leaves wrong: a module that the plan neither splits nor marks,
running where the residual stream is sequence-sharded, sees the rank's sequence shard alone.

Where the stream is [b, s/tp, h]: in the region layout (transformers models) the blocks, from the first block's
input to the final norm (to the last block's output when that norm holds no parameters: OLMo, NanoChat); in the
Megatron layout (no ``seq_scatter_input``: the vocab embedding reduce-scatters) everything from the embedding to
the output layer. An "island" — a module holding column-parallel layers (the
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

from parallel.tensor_parallel.layers import seq_scatter
from parallel.tensor_parallel.styles import COLWISE, MARKERS, ROWWISE, _is_norm

__all__ = ["unsplit_in_region", "region_problems", "gathered_only_modules"]

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
    covered = {n for n, s, _ in matches if s != "seq_scatter_input"      # a marker on a block (the exit after the
               and not (s in MARKERS and inside and n.startswith(inside))}  # last one) covers none of its mixers
    covered |= {n.rpartition(".")[0] for n, s, _ in matches          # islands: parents of column layers
                if s in COLWISE and (s not in _HEADS or (s == "colwise_gather" and inside and n.startswith(inside)))}
    norms = {n for n, m in mods.items() if _is_norm(m)}
    bad: list[str] = []
    for name, m in roots:
        _walk(name, m, covered, norms, bad, True)
    return bad


def region_problems(matches: list, mods: dict, tp: int) -> list[str]:
    """The reasons a plan's sequence-parallel layout cannot keep the model's numbers (empty when none): modules
    that would run on the sequence shard unsplit (:func:`unsplit_in_region`); a region entered and never left;
    split layers outside the region (a second block list HRM-Text runs after the region has been left, a vision
    tower): their module's f̄ would all-gather an input that is already the whole sequence, doubling it. With
    tp = 1 (the plan only checked) only the missing exit."""
    out = []
    if tp > 1 and (unsplit := unsplit_in_region(matches, mods)):
        more = f" (and {len(unsplit) - 3} more)" if len(unsplit) > 3 else ""
        out.append(f"sequence parallel: {', '.join(unsplit[:3])}{more} would run on the rank's sequence shard "
                   f"alone (the plan neither splits nor marks it: a sequence mixer would see s/tp tokens, its "
                   f"gradient only theirs); set parallel.sequence_parallel=false, or split it in parallel.tp_plan")
    entry = next((n for n, s, _ in matches if s == "seq_scatter_input"), None)
    if entry is None:
        return out
    if not any(s == "seq_gather_output" for _, s, _ in matches):
        out.append("sequence parallel: the plan enters the region (seq_scatter_input) but never leaves it; "
                   "mark the final norm 'seq_gather_output'")
    inside = entry.rpartition(".")[0] + "."
    outside = sorted(n for n, s, _ in matches if s in COLWISE + ROWWISE and s not in _HEADS
                     and not n.startswith(inside))
    if outside and tp > 1:
        out.append(f"sequence parallel: {', '.join(outside[:3])}{' …' if len(outside) > 3 else ''} "
                   f"split outside the region ({inside}*, where the sequence is sharded) would all-gather a whole "
                   f"sequence; set parallel.sequence_parallel=false, or leave them out of parallel.tp_plan")
    return out


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


def gathered_only_modules(matches: list, blocks: str | None) -> set:
    """The modules in the region whose split layers all gather their outputs (Qwen3.5's gated-delta mixer: every
    projection ``colwise_gather``, no row layer to reduce-scatter). They run as without sequence parallel — the
    whole sequence, replicated outputs, an f (all-reduce of the gradient) on each column layer's input, complete
    gradients throughout — between an all-gather of their input (backward: keep own chunk) and a cut of their
    output to the rank's chunk (backward: all-gather). (With f̄ on the input instead, a column layer reading a
    tensor made inside the module — out_proj — got a partial gradient that the next gather's backward sliced:
    Qwen3.5 tp2 sp 2.7e-3 relative off one process.)"""
    if blocks is None:
        return set()
    gathered = {n.rpartition(".")[0] for n, s, _ in matches if s == "colwise_gather" and n.startswith(blocks)}
    return gathered - {n.rpartition(".")[0] for n, s, _ in matches if s in COLWISE + ROWWISE and s != "colwise_gather"}


# --- the hooks that move the sequence in and out of the region (installed by .plan._convert) ---

def _first_input_hook(module, args, kwargs, fn, what):
    """Forward pre-hook applying ``fn`` to the module's hidden states (first positional or hidden_states=); the
    same tensor given again (CTRL's attention takes ``normed`` as v, k and q) becomes the same result."""
    if args:
        x, y = args[0], fn(args[0])
        return tuple(y if a is x else a for a in args), {k: y if v is x else v for k, v in kwargs.items()}
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    raise ValueError(f"{what} on {type(module).__name__}: no positional input or hidden_states= to apply it to")


def _scatter_once(x, group):
    """Enter the region: this rank's sequence chunk of ``x`` — unless ``x`` is such a chunk already, as when
    activation checkpointing re-runs the block from the inputs its pre-hook kept, which this hook had cut."""
    if getattr(x, "_sp_chunk", False):
        return x
    y = seq_scatter(x, group)
    y._sp_chunk = True
    return y


def _output_hook(module, args, output, fn):
    """Forward hook applying ``fn`` to the module's output (or the first element of a tuple output)."""
    if isinstance(output, tuple):
        return (fn(output[0]),) + output[1:]
    return fn(output)
