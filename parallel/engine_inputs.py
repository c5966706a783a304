"""How the engine turns a rank's batch into micro-batches and stage inputs (:mod:`parallel.batch`): the
loss weighting mode, dict-batch checks, the forward's keyword inputs, and — with pp > 1 — each stage's
masks / position ids (and the labels on the last stage with ``loss=model``) before each pipeline action.
State (``cfg``, ``template``, ``tensor_parallel``, ``loss_mode``, ``label_name``, ``executor``, ``stages``,
``_current``) lives on the engine."""
from __future__ import annotations

from parallel import batch as batches
from parallel.config import ConfigError

__all__ = ["BatchInputs"]


class BatchInputs:
    def _loss_mode(self) -> tuple:
        """How micro-batch losses are weighted (:mod:`parallel.batch`): token | model | plain."""
        name = self.cfg.loss
        if name != "model":
            return ("token" if name == "cross_entropy" else "plain"), None
        if self.tensor_parallel is not None and self.tensor_parallel.vocab_parallel_output:
            raise ConfigError("loss=model: the tensor-parallel plan leaves the logits split by vocabulary, so the "
                              "model's own loss would see V/tp classes; use loss=cross_entropy (vocab-parallel) or a "
                              "plan whose head gathers (colwise_gather)")
        try:
            return "model", batches.label_param(self.template)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _micro(self, batch) -> list:
        """This rank's batch as micro-batches (:func:`parallel.batch.prepare`; collective over dp for dict
        batches and loss=model: the global count of scored tokens)."""
        try:
            if isinstance(batch, dict):
                batches.check_keys(batch, self.template)
                batches.check_labels(batch)
        except ValueError as e:
            raise ValueError(f"{e} (data.factory={self.cfg.data.factory!r})") from None
        micro = batches.prepare(batch, self.cfg.data.micro_batch_size, self._to, self.dp, self.loss_mode,
                                self.label_name, weigh_tuples=self.context is None)
        y = micro[0].y if micro else None
        self._scored = y if isinstance(y, batches.Targets) and self.loss_mode != "plain" else None
        return micro

    @property
    def last_scored(self):
        """N of the last batch, for token-weighted evaluation (or None); read lazily: N's all-reduce overlaps
        the forward (:class:`parallel.batch.GlobalCount`)."""
        y = getattr(self, "_scored", None)
        return None if y is None else y.total

    def _kwargs(self, mb, last: bool = True) -> dict:
        """The forward's keyword inputs of micro-batch ``mb``; the labels only where the loss is computed."""
        if self.loss_mode == "model" and last:
            return {**mb.kwargs, self.label_name: mb.y.labels}
        return mb.kwargs

    def _forward(self, mb):
        return self.module(mb.x, **self._kwargs(mb))

    def _stage_inputs(self, action) -> None:
        """Before each pipeline action: the stage gets its micro-batch's masks / position ids (and, on the
        last stage with loss=model, the labels); the hidden state comes from the previous stage."""
        st = self.executor.stages.get(action.stage)
        if st is not None and hasattr(st, "stage_info") and action.microbatch < len(self._current):
            st.stage_info.batch_kwargs = self._kwargs(self._current[action.microbatch],
                                                      action.stage == self.executor.last)

    def _clear_stage_inputs(self) -> None:
        for st in self.stages:
            if hasattr(st, "stage_info"):
                st.stage_info.batch_kwargs = {}
