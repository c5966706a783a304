"""Activation checkpointing of the repeated blocks, from the outside: none | full | every | selective | offload.

A block's forward keeps, for its backward, the tensors autograd saves — for a GPT layer about
s·b·h·(34 + 5·a·s/h) bytes in fp16 (Korthikanti et al., arXiv 2205.05198, §4; :mod:`.memory` counts
ours exactly). The policies trade that memory for compute or transfers, per *repeated block* (the
pipeline split's body: ``GPT.blocks``, ``model.layers``, ``transformer.h``):

  none       everything saved.
  full       only the block's input is kept; the backward re-runs the block's forward (one extra
             forward per block: +2·Ψ_block FLOPs per token, ≈ +33% of a layer's training FLOPs)
             and then backpropagates through the recomputed graph.
  every k    ``full`` on the blocks with global index i ≡ 0 (mod k): blocks 0, k, 2k, …; the rest keep all.
  selective  torch's selective activation checkpoint (``create_selective_checkpoint_contexts``): the
             outputs of the ops in ``save_ops`` (default: matmuls and attention — aten.mm, addmm, bmm,
             _scaled_dot_product_*) are kept, every other op (norms, GELU, softmax, adds, views) is
             recomputed; the recompute reuses the kept outputs instead of re-running the matmuls.
  offload    nothing is recomputed: every tensor the block saves is copied to CPU memory in forward
             (pinned, non-blocking, where CUDA exists) and back to the device when backward unpacks it
             (``torch.autograd.graph.saved_tensors_hooks``, as ``save_on_cpu``). On a CPU device the
             tensors stay where they are and are only counted.

How, without editing the model: as torch's composable ``checkpoint`` (torch.distributed._composable)
does, a non-reentrant checkpoint (:class:`.recompute.Frame`, torch.utils.checkpoint's
``use_reentrant=False`` method with one recompute shared by all backward passes) is entered in a
forward pre-hook of the block and left in its forward hook, so parameter names,
``state_dict`` keys and the model's own forward stay as they are. (Ours rather than the composable
one: its recompute context is one-shot, and the zero-bubble W pass backpropagates a second time.)
The recompute calls the block again *through its hooks* (the checkpoint's own standing aside), so:

* the recompute runs the whole block (``early_stop=False``): torch's early stop raises out of the
  op that packs the last needed tensor, skipping the forward hooks of the modules around it —
  ZeRO-3's post-hook would never release that module's unit, and its next forward would use the
  stale gathered copy. So full recompute costs exactly one more forward of each block.
* RNG: the CPU and device generator states at the block's entry are replayed (preserve_rng_state):
  dropout draws the same mask in the recompute, and the numbers equal those without checkpointing.
* tensor parallel: its hooks sit on the block's children (f/f̄ regions, SP all-gather, LayerNorm
  gradient sums), so they run again in the recompute: the forward collectives inside the block
  (sequence-parallel all-gathers, the row-parallel all-reduces) run twice per step; backward ones once.
* pipeline: applied to each stage copy's own blocks (global index from the stage's SplitPlan), after
  the split; the stage's inject pre-hook is registered before ours, so the checkpoint keeps the
  injected activation as the block's input; the record hook of a stage's last block runs again in the
  recompute (it re-records the recomputed hidden state, which the stage no longer reads).
* ZeRO-3: its pre-hooks are prepended, so they run before the checkpoint's; in the recompute each
  module's pre-hook gathers its units again. ``zero.units=block``: the block's unit is gathered by the
  block output's gradient hook before the recompute starts and kept (``bwd``) until its gradients are
  reduced, so the recompute costs no extra all-gather. ``zero.units=module``: the units of the modules
  whose backward has not begun are re-gathered for the recompute and freed after it, then gathered
  again for their backward: up to (N−1)/N·Ψ_block·b more all-gather bytes per block and step.
* zero-bubble pipeline (ZB-H1, ZB-V, DualPipeV): I (``autograd.grad(retain_graph=True)``) and W (a
  second backward) share one recompute (:mod:`.recompute`: torch's frame recomputed per backward call,
  twice or more per block, and held I's unused tensors until W): one extra forward per block, and
  from I to W a block keeps only what W needs — its weight consumers' saved inputs (GPT: the block
  input, both norms' inputs and statistics, the three matmul inputs: 5βsh + βsf + 4βs·4 bytes fp32)
  besides the captured δ_N. ``selective`` works there too (one recompute, so its cache is read once).
* BatchNorm (incl. sync_batchnorm) inside a block: the recompute would update the running statistics
  a second time; they are saved before and restored after the recompute (sync BN's forward
  all-reduces run again, with the same numbers).

Where the engine applies it: after tensor parallelism and the pipeline split (the blocks are then
the stage copies' blocks, which a deepcopy of a hooked block would not be), before ZeRO wraps the
stage modules — ZeRO's stage-3 hooks are prepended and need no ordering from us.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from parallel.activation.recompute import Frame
from parallel.pipeline.split import find_body

__all__ = ["POLICIES", "DEFAULT_SAVE_OPS", "BlockRecord", "ActivationCheckpointing", "repeated_blocks",
           "apply_activation_checkpointing", "resolve_ops"]

POLICIES = ("none", "full", "every", "selective", "offload")
DEFAULT_SAVE_OPS = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
                    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                    "_scaled_dot_product_cudnn_attention")


def resolve_ops(names) -> list:
    """aten op packets for names like ``"mm"`` or ``"aten.addmm"``; unknown names raise ValueError."""
    ops, bad = [], []
    for n in names:
        short = n.split(".", 1)[1] if n.startswith("aten.") else n
        if hasattr(torch.ops.aten, short):
            ops.append(getattr(torch.ops.aten, short))
        else:
            bad.append(n)
    if bad:
        raise ValueError(f"activation_checkpointing.save_ops: {bad} are not aten operators (e.g. 'mm', 'addmm', "
                         f"'bmm', '_scaled_dot_product_flash_attention')")
    return ops


def repeated_blocks(stage: nn.Module) -> list:
    """[(global block index, block)] of the blocks this stage module runs: a pipeline stage's own
    range of its SplitPlan's body, else the model's body (:func:`parallel.pipeline.find_body`)."""
    info = getattr(stage, "stage_info", None)
    if info is None:
        return list(enumerate(find_body(stage)[1]))
    plan, (a, b) = info.plan, info.blocks
    body = stage.get_submodule(plan.body) if plan.body else stage
    if plan.kind == "model":
        return [(i, body[i]) for i in range(a, b)]
    return [(a + j, blk) for j, blk in enumerate(body.children())]


class BlockRecord:
    """One block under a policy; ``sac_storage`` holds the outputs selective checkpointing kept in the
    block's latest forward (read by :class:`parallel.activation.memory.SavedActivations`)."""

    def __init__(self, index: int, block: nn.Module, mode: str):
        self.index, self.block, self.mode = index, block, mode
        self.sac_storage = None
        self.recomputes = 0
        self.recomputing = False
        self.active = None


class ActivationCheckpointing:
    """The blocks a policy was applied to (``records``), and the offload packing's listeners."""

    def __init__(self, policy: str, records: list):
        self.policy, self.records = policy, records
        self.pack_listeners: list = []          # fn(record, tensor) per tensor the offload hooks pack
        self.handles: list = []

    def record_of(self, block: nn.Module):
        return next((r for r in self.records if r.block is block), None)


class _RecomputeGuard:
    """Around each recompute: count it, and restore BatchNorm running statistics the recompute
    updated. Re-enterable: a second backward over the graph (the zero-bubble W pass re-walks it with
    retain_graph) recomputes the block again."""

    def __init__(self, record: BlockRecord):
        self.record = record
        self.bns = [m for m in record.block.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]

    def __enter__(self):
        self.saved = [{k: v.clone() for k, v in m._buffers.items() if v is not None} for m in self.bns]
        self.record.recomputes += 1
        self.record.recomputing = True           # our checkpoint hooks stand aside; the block's others run
        return self

    def __exit__(self, *exc):
        self.record.recomputing = False
        for m, buf in zip(self.bns, self.saved):
            for k, v in buf.items():
                m._buffers[k].copy_(v)
        return False


def _context_fn(record: BlockRecord, save_ops):
    """The checkpoint's (forward, recompute) contexts: plain, or selective caching of ``save_ops``."""
    if save_ops is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    ops = frozenset(save_ops)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op.overloadpacket in ops else CheckpointPolicy.PREFER_RECOMPUTE

    fwd, rec = create_selective_checkpoint_contexts(policy)
    record.sac_storage = fwd.storage            # the caching mode's {op: [outputs]} of this forward
    return fwd, rec


class _OffloadHooks(torch.autograd.graph.saved_tensors_hooks):
    """saved_tensors_hooks moving each saved tensor to CPU memory and back (``save_on_cpu``)."""

    def __init__(self, ac: ActivationCheckpointing, record: BlockRecord):
        pin = torch.cuda.is_available()

        def pack(t):
            for fn in ac.pack_listeners:
                fn(record, t)
            if t.device.type == "cpu":     # detached: a block's output packed with its own grad_fn would
                return t.device, t.detach()  # make a cycle that outlives a retained graph (the I/W split)
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin)
            host.copy_(t, non_blocking=pin)
            return t.device, host

        def unpack(packed):
            dev, t = packed
            return t.to(dev, non_blocking=pin)

        super().__init__(pack, unpack)


def _hook_checkpoint(ac: ActivationCheckpointing, record: BlockRecord, save_ops) -> None:
    """The non-reentrant checkpoint as a pre-hook / hook pair on the block (as torch's composable
    ``checkpoint``), with our frame (:class:`.recompute.Frame`): one recompute serves every backward
    pass over the forward, the zero-bubble split's I and W included."""
    def pre(mod, args, kwargs):
        if record.recomputing or not torch.is_grad_enabled():
            return
        frame = Frame(mod, f"block {record.index}", args, kwargs,
                      functools.partial(_context_fn, record, save_ops), _RecomputeGuard(record))
        record.active = frame.forward()
        record.active.__enter__()

    def post(mod, args, out):
        ctx, record.active = record.active, None
        if ctx is not None and not record.recomputing:
            ctx.__exit__(None, None, None)

    ac.handles += [record.block.register_forward_pre_hook(pre, with_kwargs=True),
                   record.block.register_forward_hook(post, prepend=True, always_call=True)]


def _hook_offload(ac: ActivationCheckpointing, record: BlockRecord) -> None:
    stack = []

    def pre(mod, args):
        if torch.is_grad_enabled():
            ctx = _OffloadHooks(ac, record)
            ctx.__enter__()
            stack.append(ctx)

    def post(mod, args, out):
        if stack:
            stack.pop().__exit__(None, None, None)

    ac.handles += [record.block.register_forward_pre_hook(pre), record.block.register_forward_hook(post,
                                                                                                    always_call=True)]


def block_modes(policy: str, indices, every: int = 1) -> dict:
    """{global block index: mode} for ``policy`` (``every``: full on indices ≡ 0 mod k, none elsewhere)."""
    if policy not in POLICIES:
        raise ValueError(f"activation_checkpointing.policy={policy!r} is not one of {list(POLICIES)}")
    if policy == "every":
        if every < 1:
            raise ValueError(f"activation_checkpointing.every={every} must be >= 1")
        return {i: "full" if i % every == 0 else "none" for i in indices}
    return {i: policy for i in indices}


def apply_activation_checkpointing(stages, policy: str, every: int = 1, save_ops=None) -> ActivationCheckpointing:
    """Apply ``policy`` to the repeated blocks of each stage module (in place, hooks only)."""
    if policy == "none":
        return ActivationCheckpointing(policy, [])
    ops = resolve_ops(DEFAULT_SAVE_OPS if save_ops is None else save_ops) if policy == "selective" else None
    records = []
    for st in stages:
        try:
            blocks = repeated_blocks(st)
        except ValueError as e:
            raise ValueError(f"activation_checkpointing.policy={policy}: {e}; checkpointing needs the repeated "
                             f"blocks of the model (a ModuleList of one class), or use policy=none") from None
        modes = block_modes(policy, [i for i, _ in blocks], every)
        records += [BlockRecord(i, blk, modes[i]) for i, blk in blocks if modes[i] != "none"]
    ac = ActivationCheckpointing(policy, records)
    for r in records:
        if r.mode == "offload":
            _hook_offload(ac, r)
        else:
            _hook_checkpoint(ac, r, ops if r.mode == "selective" else None)
    return ac
