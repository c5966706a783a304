"""The engine's side of context parallelism (a mixin of :class:`parallel.engine.Engine`): shard each
micro-batch (:mod:`.micro`), keep the cp attention active during the step, and — with pp > 1 — give the
attention the document ids of the micro-batch each pipeline action runs.

cp × pp: the mesh puts the pp ranks of one pipeline at the same (dp, cp, tp) coordinate, so stage k at cp
coordinate c receives from stage k−1 at cp coordinate c: the activations on the pipeline's wire are the
sequence shard (b, s/cp, h) — the zig-zag tokens of that cp rank — and each stage's attention runs the
cp algorithm on the cp group of its own pipeline coordinate. All cp ranks of a stage run the same
schedule, so their ring / all-to-all calls meet at the same action (forward in F; the ring's backward
in B or I — or in W for stage 0, whose I is empty, :mod:`parallel.pipeline.backward_split`). Positions
and document ids are per micro-batch: every stage gets the shard's global ``position_ids`` with its
batch keys (the engine's stage-input callback), and an action callback sets the document ids before
each action (forward, and the recompute of activation checkpointing inside a backward).

State on the engine: ``context`` (:class:`.context.ContextParallel` or None), ``loss_mode``,
``label_name``, ``template``, ``executor``, ``_cp_docs``.
"""
from __future__ import annotations

import contextlib

from parallel.batch import Targets
from parallel.context_parallel.micro import shard_micro

__all__ = ["ContextInputs"]


class ContextInputs:
    _cp_docs: list = []

    def _cp_active(self):
        return self.context.active(self.stages) if self.context is not None else contextlib.nullcontext()

    def _cp_shard(self, mb):
        """cp > 1: this rank's zig-zag shard of micro-batch ``mb`` (:func:`.micro.shard_micro`); sets the
        attention's document ids to the micro-batch's."""
        if self.context is None:
            return mb
        n = self.context.group.size
        if self.loss_mode == "plain" and isinstance(mb.y, Targets):
            raise ValueError(f"parallel.cp={n}: dict batches with loss={self.cfg.loss!r} are not supported (only "
                             f"per-token cross_entropy or the model's own token-mean loss split exactly over the "
                             f"sequence): use loss=cross_entropy or loss=model, or parallel.cp=1")
        try:
            mb, self.context.docs = shard_micro(self.context, mb, self.loss_mode, self.label_name, self.template)
        except ValueError as e:
            raise ValueError(f"parallel.cp={n}: {e}") from None
        return mb

    def _cp_micro(self, micro: list) -> list:
        """Pipeline: every micro-batch sharded up front; their document ids kept for :meth:`_cp_action`."""
        if self.context is None:
            return micro
        out, docs = [], []
        for mb in micro:
            out.append(self._cp_shard(mb))
            docs.append(self.context.docs)
        self._cp_docs = docs
        return out

    def _cp_action(self, action) -> None:
        """Before each pipeline action: the attention masks by this action's micro-batch's documents."""
        if self.context is not None and action.microbatch < len(self._cp_docs):
            self.context.docs = self._cp_docs[action.microbatch]
