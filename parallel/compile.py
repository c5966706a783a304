"""``compile``: torch.compile on each repeated block, as torchtitan's ``apply_compile`` does.

What is compiled: the ``forward`` of every repeated block of this rank's stage modules (the pipeline
split's body, :func:`parallel.activation.checkpointing.repeated_blocks`: ``GPT.blocks``,
``model.layers``, ``transformer.h``) — not the embedding, the head or the loss. Per-block rather than
whole-model ("regional compilation"): the blocks share one code object, so Dynamo traces and the
backend compiles one graph that every block reuses (its parameters are graph inputs), compile time
does not grow with depth, and the engine's own code between blocks stays eager.

How: the block's instance gets ``forward = MethodType(torch.compile(type(block).forward), block)``.
``nn.Module.__call__`` still runs in eager, so every hook *on the block* (activation checkpointing's
frame, ZeRO-3 block units, the pipeline's inject/record hooks) runs outside the graph, parameter
names and ``state_dict`` keys are unchanged (no ``_orig_mod.`` prefix), and a deepcopy of the block
rebinds its forward to the copy. Gradients leave the compiled backward as ordinary outputs and are
accumulated by autograd's AccumulateGrad nodes in eager, so the ZeRO/DP post-accumulate-grad hooks
fire as before.

What is refused (:func:`parallel.config.compile_keys.check_compile`, before any work): hooks or
collectives *inside* the block that the graph would have to trace (tensor parallel's f/g regions and
sequence-parallel gathers, ZeRO-3's per-module gathers, context parallel's ring attention, sync
BatchNorm's all-reduces), per-step Python decisions inside the block (progressive layer dropping),
and selective activation checkpointing (its op policy cannot see inside generated kernels); MoE
layers (data-dependent routing) at build. ZeRO-2's optimizer offload composes (it acts after backward).
Pipeline stages compose: the blocks
compiled are each stage copy's own (after the split), and the stage's inject / record hooks sit on
the blocks, outside the graph; the zero-bubble I/W split backpropagates twice through the compiled
backward (retain_graph), as in eager.

Activation checkpointing (full / every / offload) composes: its frame is entered in the block's
pre-hook, outside the compiled forward, so the compiled function's saved tensors are dropped (or moved
to the host) by the frame's saved-tensor hooks and the recompute calls the compiled forward again.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn

from parallel.activation.checkpointing import repeated_blocks

__all__ = ["CompiledBlocks", "apply_compile", "compile_blocks", "dynamo_counts", "is_compiled"]


class CompiledBlocks:
    """The blocks whose forward was compiled, and how (``describe()`` for the log)."""

    def __init__(self, blocks: list, backend: str, mode, fullgraph: bool):
        self.blocks, self.backend, self.mode, self.fullgraph = blocks, backend, mode, fullgraph

    def describe(self) -> str:
        kinds = sorted({type(b).__name__ for b in self.blocks})
        return (f"compile: {len(self.blocks)} blocks ({', '.join(kinds)}) with backend={self.backend}, "
                f"mode={self.mode}, fullgraph={self.fullgraph}")

    def remove(self) -> None:
        """Back to the eager forward."""
        for b in self.blocks:
            b.__dict__.pop("forward", None)


def compile_blocks(stages: list, backend: str = "inductor", mode=None, fullgraph: bool = False) -> CompiledBlocks:
    """Compile the forward of every repeated block of ``stages`` (see the module docstring)."""
    kwargs = {"backend": backend, "fullgraph": fullgraph}
    if mode is not None:
        kwargs["mode"] = mode
    fns: dict = {}
    blocks = []
    for st in stages:
        try:
            found = repeated_blocks(st)
        except ValueError as e:
            raise ValueError(f"compile.enabled compiles the model's repeated blocks, but {e}") from None
        for _, b in found:
            cls = type(b)
            if cls not in fns:
                fns[cls] = torch.compile(cls.forward, **kwargs)
            b.forward = types.MethodType(fns[cls], b)
            blocks.append(b)
    return CompiledBlocks(blocks, backend, mode, fullgraph)


def dynamo_counts() -> dict:
    """Dynamo's process-wide counters: frames it compiled (a recompile is one more), graphs captured
    (``unique_graphs``; a graph break splits a frame into more) and graph breaks; compare two readings to
    see what a stretch of steps cost (none, once every block shape has been seen)."""
    counters = torch._dynamo.utils.counters          # torch loads _dynamo lazily: no import cost until used
    return {"frames": int(counters["frames"]["total"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def is_compiled(block: nn.Module) -> bool:
    return "forward" in block.__dict__


def apply_compile(stages: list, cfg, has_moe: bool, device_type: str):
    """The engine's entry: ``cfg`` is ``config.compile``; None when disabled or on the meta device (the
    planner's simulation runs no kernels). MoE layers route tokens data-dependently: refused."""
    if not cfg.enabled or device_type == "meta":
        return None
    if has_moe:
        raise ValueError("compile.enabled=true with MoE layers: their routing is data-dependent (a graph break or "
                         "recompile per step): set compile.enabled=false")
    return compile_blocks(stages, cfg.backend, cfg.mode, cfg.fullgraph)
