"""Does a layout fit in N bytes per device, and if not, the smallest change that makes it fit.

:func:`fit` predicts the layout (:func:`parallel.planning.planner.predict`: per-rank peak, the
largest over ranks) and compares it with the budget. When it does not fit, it tries one knob at a
time, then pairs of knobs:

  activation_checkpointing.policy   selective, every k (k = L/2 … 2), full, offload (CUDA only)
  zero.stage                        each higher stage
  data.micro_batch_size             each smaller size dividing the per-dp batch (more micro-batches)

and answers the change that fits with the smallest predicted step time (the cost model of
:mod:`parallel.planning.cost`, which charges full recompute one more forward of each recomputed
block (once under the zero-bubble split too); selective recomputes only elementwise ops, counted as
free), ties broken by the lower peak. Optimizer offload (``zero.offload.optimizer``) is not among
the knobs: the planner does not model its memory.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from parallel.planning.planner import Hardware, Layout, ModelSpec, Prediction, TrainSpec, check_layout, predict

__all__ = ["FitAnswer", "Change", "fit", "knobs"]


@dataclass
class Change:
    overrides: list               # config overrides, e.g. ["activation_checkpointing.policy=selective"]
    layout: Layout
    train: TrainSpec
    prediction: Prediction

    def __str__(self):
        p = self.prediction
        return f"{' '.join(self.overrides)} (peak {p.peak_bytes / 2 ** 20:.2f} MiB, step {p.step_s * 1e3:.3g} ms)"


@dataclass
class FitAnswer:
    memory_bytes: float
    prediction: Prediction
    fits: bool
    peak_bytes: float
    rank: int                     # the rank with the highest peak
    headroom: float               # memory_bytes − peak (negative: over)
    changes: list = field(default_factory=list)     # fitting changes, best first (empty when it fits)

    @property
    def best(self) -> Change | None:
        return self.changes[0] if self.changes else None

    def describe(self) -> str:
        mib = 2 ** 20
        budget = (f"{self.memory_bytes / 2 ** 30:.4g} GiB" if self.memory_bytes >= 2 ** 30
                  else f"{self.memory_bytes / mib:.4g} MiB")
        head = (f"fits in {budget} per device: "
                f"{'yes' if self.fits else 'no'}, peak {self.peak_bytes / mib:.3f} MiB on rank {self.rank}, "
                f"headroom {self.headroom / mib:+.3f} MiB ({100 * self.headroom / self.memory_bytes:+.1f}%)")
        if self.fits:
            return head
        if not self.changes:
            return head + "\nno change of activation checkpointing, ZeRO stage or micro-batch size (or two) fits"
        lines = [head, f"smallest change that fits: {self.best}"]
        lines += [f"  also fits: {c}" for c in self.changes[1:4]]
        return "\n".join(lines)


def knobs(spec: ModelSpec, lay: Layout, tr: TrainSpec) -> dict:
    """{knob: [(override, layout, train spec)]}: the single changes :func:`fit` tries."""
    pol = []
    for name in ("selective",) + tuple(f"every:{k}" for k in range(spec.n_layer // 2, 1, -1)) + ("full", "offload"):
        p, _, k = name.partition(":")
        if p == "offload" and tr.device != "cuda" or p == tr.activation and (p != "every" or int(k) == tr.every):
            continue
        over = [f"activation_checkpointing.policy={p}"] + ([f"activation_checkpointing.every={k}"] if k else [])
        pol.append((over, lay, replace(tr, activation=p, every=int(k) if k else tr.every)))
    zero = [([f"zero.stage={z}"], replace(lay, zero=z), tr) for z in range(lay.zero + 1, 4)]
    per = tr.global_batch // lay.dp
    size = per // lay.micro_batches
    micro = [([f"data.micro_batch_size={b}"], replace(lay, micro_batches=per // b), tr)
             for b in range(size - 1, 0, -1) if per % b == 0]
    return {"policy": pol, "zero": zero, "micro": micro}


def _merge(a, b, tr: TrainSpec):
    """Two changes of different knobs applied together (at most one of them changes ``tr``)."""
    (oa, la, ta), (ob, lb, tb) = a, b
    lay = replace(la, zero=max(la.zero, lb.zero), micro_batches=max(la.micro_batches, lb.micro_batches))
    return oa + ob, lay, tb if ta == tr else ta


def fit(spec: ModelSpec, lay: Layout, tr: TrainSpec, memory_bytes: float, hw: Hardware | None = None) -> FitAnswer:
    """The answer for ``lay`` under ``memory_bytes`` per device (see the module docstring)."""
    hw = replace(hw or Hardware(), memory_bytes=memory_bytes)
    pred = predict(spec, lay, tr, hw)
    rank = max(pred.memory, key=lambda r: pred.memory[r]["peak"])
    ans = FitAnswer(memory_bytes, pred, pred.fits, pred.peak_bytes, rank, memory_bytes - pred.peak_bytes)
    if ans.fits:
        return ans
    options = knobs(spec, lay, tr)
    singles = [c for cs in options.values() for c in cs]
    for candidates in (singles, [_merge(a, b, tr) for ka, kb in itertools.combinations(options, 2)
                                 for a in options[ka] for b in options[kb]]):
        found = []
        for over, la, t in candidates:
            if check_layout(spec, la, t) is not None:
                continue
            p = predict(spec, la, t, hw, ranks="worst")
            if p.fits:
                found.append(Change(over, la, t, p))
        if found:
            ans.changes = sorted(found, key=lambda c: (c.prediction.step_s, -c.prediction.peak_bytes))
            break
    return ans
