"""Measured vs simulated pipeline idle when action times vary: the simulator run over draws of the
measured per-action costs, and the executor's records saved to / loaded from JSON.

:func:`.measured.predict` with median terms misses the idle that the spread of action times causes
(issue 19: measured ÷ simulated 1.26–2.88 at 5m, pp = 2, m = 8, while replaying each round's own
times gives 1.01–1.35). Two reasons, both in the order statistics of the costs:

* the idle is a sum over actions of overheads (bookkeeping, issuing the exchange) and waits; for
  skewed per-action times, E[Σ X] = n·E[X] > n·median(X), so medians undercount the sum;
* a wait is max(0, producer end + latency − consumer ready): E[max(A, B)] ≥ max(E[A], E[B]) (Jensen),
  so constant costs undercount every wait that a slow producer causes.

:func:`predict_spread` keeps the schedule's dependencies and the executor's cost terms
(:mod:`.measured`: compute, overhead before each exchange, p2p latency, start offsets, tails) and
draws them instead of taking medians: in draw d every action a of rank r takes the compute and
overhead it had in a round k(d, a, r) drawn uniformly (a bootstrap over rounds, per action and
position, so systematic position effects — the first micro-batch's cold caches, the last W's —
stay where they occur); every message takes a latency drawn from all the latency samples
(:func:`.measured.fit` takes them where the receiver already waited) and every receive its completion
(receive done − issued) in the drawn round where its messages were there, else one drawn from all
such samples; each rank takes the start
offset and tail of a drawn round. A draw's simulated idle is end + tail − start − Σ compute, as
in :func:`.measured.predict`; the prediction is its median over draws (with the 10 % / 90 %
quantiles), compared with the median measured idle over rounds. With one round, one latency
sample and one completion value every draw is that round: the prediction equals
:func:`.measured.predict`'s replay (tested). The bootstrap is the standard nonparametric estimate
of a statistic's distribution (Efron, "Bootstrap methods", Ann. Statist. 1979); the statistic here
is the idle of the schedule's dependency graph.
"""
from __future__ import annotations

import dataclasses
import random
import statistics

from parallel.pipeline.actions import Action
from parallel.pipeline.measured import _pre, _remote, fit, ready_waits
from parallel.pipeline.runtime import Record
from parallel.pipeline.simulate import execute

__all__ = ["Spread", "dump_runs", "load_runs", "predict_spread"]


@dataclasses.dataclass
class Spread:
    """Per rank: median simulated idle over draws, and its 10 % and 90 % quantiles (seconds)."""
    idle: list
    low: list
    high: list
    draws: int


def _quantile(xs: list, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def predict_spread(schedule, runs: list, draws: int = 200, seed: int = 0, by: str = "position",
                   latency: str = "median") -> Spread:
    """``runs``: one entry per round, each a list over pp ranks of (records, span) — what
    :func:`.measured.fit` takes. Returns the :class:`Spread` of the simulated idle per rank.
    ``by="position"``: a draw picks one round per action position j (the j-th action of every rank,
    and rank starts from position 0's round, tails from the last's), so actions that run at the
    same time on different ranks share a round, as they share the machine's load; ``"action"``:
    a round per action, independently. ``latency``: "median" (:func:`.measured.fit`'s) or "drawn"
    (per message, from all the samples)."""
    if not runs or any(len(r) != schedule.p for r in runs):
        raise ValueError(f"predict_spread: runs must be rounds of {schedule.p} (records, span) pairs, one per pp rank")
    if by not in ("position", "action") or latency not in ("median", "drawn"):
        raise ValueError(f"predict_spread: by={by!r} must be 'position' or 'action', latency={latency!r} "
                         "'median' or 'drawn'")
    terms = fit(schedule, runs)
    n = len(runs)
    costs = {}                                   # action → [(compute, overhead, completion or None)] per round
    ends = [[] for _ in range(schedule.p)]       # per rank: [(start offset, tail)] per round
    for ranks in runs:
        t_first = min(span[0] for _, span in ranks)
        ready = ready_waits(schedule, ranks)
        for r, (recs, span) in enumerate(ranks):
            for rec, pre in zip(recs, _pre(recs, span)):
                costs.setdefault(rec.action, []).append((rec.compute_s, pre, ready.get((r, rec.action))))
            last = recs[-1].start + recs[-1].wait_s + recs[-1].compute_s if recs else span[0]
            ends[r].append((span[0] - t_first, span[1] - last))
    if any(len(c) != n for c in costs.values()):
        raise ValueError("predict_spread: every round must run every action of the schedule once")
    pos = {a: j for acts in schedule.actions for j, a in enumerate(acts)}
    n_pos = max(map(len, schedule.actions))
    rng = random.Random(seed)
    sched = dataclasses.replace(schedule, overlap=frozenset())
    per_rank = [[] for _ in range(schedule.p)]
    recv = {a for r, acts in enumerate(schedule.actions) for a in acts if _remote(schedule, a, r)}
    pool = terms.completion_all or (terms.completion,)
    for _ in range(draws):
        rounds = [rng.randrange(n) for _ in range(n_pos)]
        pick = {}
        for a, c in costs.items():
            comp, pre, done = c[rounds[pos[a]] if by == "position" else rng.randrange(n)]
            if a in recv:                        # its own completion where the messages were there, else a drawn one
                pre += done if done is not None else rng.choice(pool)
            pick[a] = (comp, pre)
        if by == "position":
            se = [(e[rounds[0]][0], e[rounds[len(acts) - 1]][1]) for e, acts in zip(ends, schedule.actions)]
        else:
            se = [(e[rng.randrange(n)][0], e[rng.randrange(n)][1]) for e in ends]
        start = [s for s, _ in se]
        msgs: dict = {}                          # each message's latency, drawn once from the samples
        lat = (lambda key, r, msgs=msgs: msgs.setdefault((key, r), rng.choice(terms.latency_all))) \
            if latency == "drawn" and terms.latency_all else terms.latency
        sim = execute(sched, lambda a, pick=pick: pick[a][0], overhead=lambda a, pick=pick: pick[a][1],
                      latency=lat, start=start)
        for r, ev in enumerate(sim.timelines):
            end = (ev[-1].end if ev else start[r]) + se[r][1]
            per_rank[r].append(end - start[r] - sim.busy[r])
    return Spread([statistics.median(x) for x in per_rank], [_quantile(x, 0.1) for x in per_rank],
                  [_quantile(x, 0.9) for x in per_rank], draws)


def dump_runs(runs: list) -> list:
    """``runs`` (rounds × ranks × (records, span)) as JSON-ready lists: per record
    [kind, micro-batch, stage, wait_s, compute_s, start, issue_s]."""
    return [[{"span": list(span), "records": [[r.action.kind, r.action.microbatch, r.action.stage, r.wait_s,
                                                r.compute_s, r.start, r.issue_s] for r in recs]}
             for recs, span in ranks] for ranks in runs]


def load_runs(data: list) -> list:
    """The inverse of :func:`dump_runs`."""
    return [[([Record(Action(k, i, s), w, c, t, iss) for k, i, s, w, c, t, iss in rank["records"]],
              tuple(rank["span"])) for rank in ranks] for ranks in data]
