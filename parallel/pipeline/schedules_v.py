"""V-placement schedules: two stages per rank, stage r and stage 2p−1−r on rank r (S = 2p stages).

The V places the first and the last stage on rank 0, so the loss's gradient starts its way back on
the rank that started the forward, and the second chunk's forward (stages p..2p−1) runs back down
the ranks. Both schedules split backward into I and W (:mod:`.backward_split`).

* **ZB-V** (Qi et al., "Zero Bubble Pipeline Parallelism", arXiv 2401.10241, §6): warm-up
  2(p−r)−1 forwards of chunk 0, then r (F chunk 1, F chunk 0) pairs, then p−r (F, I, W) on
  chunk 1, a steady state of (F, I, W) alternating chunks, and a cool-down that fills the tail
  with W's. With T_F = T_I = T_W (each 1/2 of a full stage's F) and m ≥ 2p the bubble is ~0:
  simulated at p = 4, m = 16 it is 1/33 of the step against 1F1B's 3/19 (under a quarter);
  a rank holds at most 2p chunk activations, i.e. p full stages: 1F1B's peak.
  Order as in torch.distributed.pipelining's ``ScheduleZBVZeroBubble`` (its action generator,
  re-expressed here; micro-batches beyond m are dropped).
* **DualPipeV** (DeepSeek-V3, arXiv 2412.19437 §3.2.1; the "cut-in-half" DualPipe of
  github.com/deepseek-ai/DualPipe): the steady state runs F of one chunk overlapped with B of the
  other (an F&B unit, :attr:`.schedules.Schedule.overlap`), whose cost F&B < F + B when compute
  of one hides the other's communication (on GPUs; the CPU runtime runs them one after the
  other). Bubble per rank (DeepSeek's table, S = 2p stages): (S/2 − 1)(F&B + B − 3W), with F, B, W
  the costs of one chunk; it needs m ≥ S. Order as in torch's ``ScheduleDualPipeV``.
"""
from __future__ import annotations

from parallel.pipeline.actions import Action
from parallel.pipeline.schedules import _BUILDERS, Schedule
from parallel.pipeline.split import split_model

__all__ = ["zb_v", "dualpipe_v", "split_model_v", "split_for", "V_SCHEDULES"]


def _check(name: str, p: int, m: int, v: int) -> None:
    for arg, val in (("p", p), ("m", m), ("v", v)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name}: {arg} must be a positive int, got {val!r}")
    if v != 2:
        raise ValueError(f"{name} places exactly two stages on each rank (v=2, stages r and 2p-1-r), got v={v}; "
                         "set parallel.pp_virtual_stages=2")


def zb_v(p: int, m: int, v: int = 2) -> Schedule:
    """ZB-V for ``p`` ranks, ``m`` micro-batches (see the module docstring)."""
    _check("zb_v", p, m, v)
    n = max(2 * p - 1, m)
    acts = []
    for r in range(p):
        s0, s1 = r, 2 * p - 1 - r
        a: list[Action] = []
        cnt = {"f0": 0, "f1": 0, "b0": 0, "b1": 0}

        def op(kind, chunk, key=None, a=a, cnt=cnt, s0=s0, s1=s1):
            key = key or {"F": "f", "I": "b", "W": "w"}[kind] + str(chunk)
            a.append(Action(kind, cnt[key], s0 if chunk == 0 else s1))
            cnt[key] += 1

        for _ in range(2 * (p - r) - 1):
            op("F", 0)
        for _ in range(r):
            op("F", 1)
            op("F", 0)
        for _ in range(p - r):
            op("F", 1)
            op("I", 1, "b1")
            a.append(Action("W", cnt["b1"] - 1, s1))
        while cnt["f1"] < cnt["f0"] or cnt["f0"] < n:
            if cnt["f0"] < n:
                op("F", 0)
            op("I", 0)
            a.append(Action("W", cnt["b0"] - 1, s0))
            op("F", 1)
            op("I", 1)
            a.append(Action("W", cnt["b1"] - 1, s1))
        cnt["w0"], cnt["w1"] = cnt["b0"], cnt["b1"]
        for _ in range(r):
            op("I", 0)
            op("I", 1)
        for _ in range(p - r):
            op("I", 0)
            op("W", 0)
        while cnt["w1"] < cnt["b1"]:
            op("W", 1)
        while cnt["w0"] < cnt["b0"]:
            op("W", 0)
        acts.append([x for x in a if x.microbatch < m])
    return Schedule("zb_v", p, m, 2, acts, placement="v")


def dualpipe_v(p: int, m: int, v: int = 2) -> Schedule:
    """DualPipeV for ``p`` ranks, ``m ≥ 2p`` micro-batches (see the module docstring)."""
    _check("dualpipe_v", p, m, v)
    if m < 2 * p:
        raise ValueError(f"dualpipe_v needs at least as many micro-batches as stages (m >= 2p = {2 * p}), "
                         f"got m={m}; raise the number of micro-batches or use 'zb_v'")
    acts, overlap = [], set()
    for r in range(p):
        stage = (r, 2 * p - 1 - r)
        a: list[Action] = []
        cnt: dict = {}
        wq: list = []

        def add(chunk, kind, a=a, cnt=cnt, wq=wq, stage=stage):
            s = stage[chunk]
            key = (s, "F" if kind == "F" else "I")
            i = cnt.get(key, 0)
            a.append(Action(kind, i, s))
            cnt[key] = i + 1
            if kind == "I":
                wq.append(Action("W", i, s))

        def fb(f_chunk, b_chunk, a=a, r=r):
            overlap.add((r, len(a)))
            add(f_chunk, "F")
            add(b_chunk, "B")

        def w(a=a, wq=wq):
            if wq:
                a.append(wq.pop(0))

        for _ in range(2 * (p - r - 1)):
            add(0, "F")
        for _ in range(r + 1):
            add(0, "F")
            add(1, "F")
        for _ in range(p - r - 1):
            add(1, "I")
            w()
            add(1, "F")
        for i in range(m - 2 * p + r + 1):
            if i == 0 and r == p - 1:            # not overlapped: shortens the bubble
                add(0, "F")
                add(1, "B")
            else:
                fb(0, 1)
            fb(1, 0)
        for _ in range(p - r - 1):
            add(1, "B")
            fb(1, 0)
        zb = False
        for i in range(r + 1):
            if i == (r + 1) // 2 and r % 2 == 1:
                zb = True
            add(1, "I" if zb else "B")
            if i == (r + 1) // 2 and r % 2 == 0:
                zb = True
            add(0, "I" if zb else "B")
        for _ in range(p - r - 1):
            w()
            add(0, "I" if zb else "B")
        for _ in range(r + 1):
            w()
        acts.append(a)
    return Schedule("dualpipe_v", p, m, 2, acts, placement="v", overlap=frozenset(overlap))


def split_model_v(model, pp_rank: int, pp_size: int, **split_kw) -> list:
    """The two stage modules of rank ``pp_rank`` under the V placement: stages ``pp_rank`` and
    ``2·pp_size − 1 − pp_rank`` of a split into 2·pp_size stages (same keywords as
    :func:`.split.split_model`)."""
    S = 2 * pp_size
    return [split_model(model, s, S, 1, **split_kw)[0] for s in (pp_rank, S - 1 - pp_rank)]


def split_for(schedule: str, model, pp_rank: int, pp_size: int, virtual_stages: int = 1, **split_kw) -> list:
    """The stage modules of ``pp_rank`` for the named schedule: the V placement for :data:`V_SCHEDULES`,
    else the loop placement of :func:`.split.split_model` (``parallel.pp_schedule`` → the engine's split)."""
    if schedule in V_SCHEDULES:
        return split_model_v(model, pp_rank, pp_size, **split_kw)
    return split_model(model, pp_rank, pp_size, virtual_stages, **split_kw)


V_SCHEDULES = ("zb_v", "dualpipe_v")
_BUILDERS.update(zb_v=zb_v, dualpipe_v=dualpipe_v)
