"""Evaluation during training: ``data.eval`` and ``train.eval_every``.

``data.eval = {factory: "pkg.module:function", kwargs: {...}, batches: k}`` builds a held-out dataset
the way ``data.factory`` builds the training one. Every ``train.eval_every`` steps (and after the last
step) the engine runs k global batches of it forward only (:meth:`Engine.eval_step`, any layout;
batches: default, every whole global batch of the set, at most 100), eval batch j holding the eval
positions [j·G, (j+1)·G) split over dp as in training (no shuffle). ``eval_loss`` is the mean over
every scored token of the k batches, Σ_j N_j·L_j / Σ_j N_j, where L_j is batch j's loss (the mean over
its N_j scored tokens: dict batches, and (x, y) batches with integer targets under cross-entropy;
N_j is counted over dp for the loss anyway, :mod:`parallel.batch`) — not a mean of batch means, which
differs when padding makes the batches' counts differ. Batches without a token count (float targets,
other losses) average with weight 1. ``eval_ppl`` = exp(eval_loss), ``eval_tokens`` = Σ_j N_j; they
go into that step's metrics record, the console line and the report.
"""
from __future__ import annotations

import math

from parallel.config import ConfigError, import_object
from parallel.data import check_dataset, rank_batch

__all__ = ["Evaluator"]


class Evaluator:
    def __init__(self, cfg):
        ev, every = cfg.data.eval, cfg.train.eval_every
        self.cfg, self.every, self.ds = cfg, every, None
        if not ev:
            if every:
                raise ConfigError(f"train.eval_every={every} but data.eval is not set: give data.eval = "
                                  f"{{factory: 'pkg.module:function', kwargs: {{...}}}} or set train.eval_every=0")
            return
        if not isinstance(ev, dict) or not ev.get("factory"):
            raise ConfigError(f"data.eval={ev!r} must be a mapping with a factory ('pkg.module:function'), "
                              f"optional kwargs and batches")
        unknown = set(ev) - {"factory", "kwargs", "batches"}
        if unknown:
            raise ConfigError(f"data.eval has unknown keys {sorted(unknown)}; allowed: factory, kwargs, batches")
        factory = import_object(ev["factory"], "data.eval.factory")
        try:
            self.ds = factory(**(ev.get("kwargs") or {}))
        except Exception as e:
            raise RuntimeError(f"data.eval.factory {ev['factory']!r} raised {type(e).__name__}: {e} "
                               f"(check data.eval.kwargs={ev.get('kwargs')})") from e
        G = cfg.data.global_batch_size
        n = check_dataset(self.ds, G)
        self.batches = int(ev.get("batches") or min(n // G, 100))
        if self.batches < 1 or self.batches * G > n:
            raise ConfigError(f"data.eval.batches={self.batches}: the eval set has {n} samples, room for {n // G} "
                              f"global batches of {G}; lower data.eval.batches")
        if not every:
            self.every = cfg.train.steps                 # data.eval alone: evaluate after the last step

    def due(self, step: int) -> bool:
        """After step ``step`` (0-based) is done."""
        return self.ds is not None and ((step + 1) % self.every == 0 or step + 1 == self.cfg.train.steps)

    def run(self, engine, dp: int, dp_rank: int) -> dict:
        """{eval_loss, eval_ppl, eval_batches} (collective over every rank)."""
        G = self.cfg.data.global_batch_size
        losses, counts = [], []
        for j in range(self.batches):
            losses.append(engine.eval_step(rank_batch(self.ds, j, G, dp, dp_rank)))
            counts.append(getattr(engine, "last_scored", None))
        out = {"eval_batches": self.batches}
        if all(c is not None for c in counts) and sum(counts) > 0:
            loss = sum(n * x for n, x in zip(counts, losses)) / sum(counts)
            out["eval_tokens"] = int(sum(counts))
        else:
            loss = sum(losses) / len(losses)
        return {"eval_loss": loss, "eval_ppl": math.exp(loss) if loss < 700 else float("inf"), **out}
