"""The schedule simulator fed with costs measured on the executor: predicted idle per rank.

A run of :class:`.runtime.PipelineExecutor` leaves, per rank, ``records`` (per action: the exchange's
start, the seconds spent issuing it, waiting in it, then computing) and ``span`` (the run's start
and end), all on perf_counter — one clock for every process on a machine. :func:`fit` turns the
runs of several rounds into the simulator's terms (:func:`.simulate.execute`):

* ``compute[(kind, stage)]``: median compute seconds of that action kind on that stage (the loss
  and head sit in the last stage's F and B/I, so they are in its costs);
* ``overhead[(kind, stage)]``: median seconds from the previous compute's end (or the run's start)
  until the rank has issued this action's exchange (the executor's bookkeeping, then the previous
  action's sends and this one's receives) — spent whether or not the rank then waits;
* ``latency``: median over the messages whose receiver was already waiting when the producer's
  compute ended (its issuing done before that end) of receive-complete − producer end: the p2p
  time of one message, sender and receiver side together;
* ``completion``: median over the receives whose messages had all been sent (the sender's exchange
  issued) before the receiver issued its exchange of receive-complete − issued: what a receive costs
  when there is nothing to wait for (gloo's thread handing the data over; on a loaded machine the
  waiting thread's wake-up). The simulator adds it to the overhead of every action that receives
  from another rank: start = max(ready + overhead + completion, producer end + latency);
* ``start[r]``: median offset of rank r's run start from the earliest rank's;
* ``tail[r]``: median seconds from rank r's last compute end to its run's end (the last sends'
  exchange and waiting for every send to complete).

:func:`predict` runs the simulator with those terms: rank r's simulated idle is its last end +
tail − start − Σ compute, to compare with the measured idle, span − Σ compute (the same quantity:
exchanges, overheads and waits). The optimizer step and the gradient reduction run outside the
executor's span; benchmarks/pp_idle.py reports them next to it.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass

from parallel.pipeline.simulate import _needs, execute

__all__ = ["Measured", "fit", "measured_idle", "predict"]


@dataclass
class Measured:
    compute: dict
    overhead: dict
    latency: float
    start: list
    tail: list
    latency_samples: int = 0
    latency_all: tuple = ()         # every latency sample (what :mod:`.measured_spread` draws from)
    completion: float = 0.0
    completion_all: tuple = ()


def measured_idle(records: list, span: tuple) -> float:
    """A rank's idle in one run: its span minus the compute of its actions."""
    return (span[1] - span[0]) - sum(r.compute_s for r in records)


def _pre(recs: list, span: tuple) -> list:
    """Per record: seconds the rank spent between the previous compute's end (or the run's start)
    and the point where it could wait for this action's input: the executor's bookkeeping after the
    previous action plus issuing this exchange."""
    out, prev = [], span[0]
    for rec in recs:
        out.append(rec.start - prev + rec.issue_s)
        prev = rec.start + rec.wait_s + rec.compute_s
    return out


def _key(a):
    return ("G" if a.kind in ("B", "I") else a.kind, a.microbatch, a.stage)


def _remote(schedule, a, r: int) -> list:
    """The keys of the results action ``a`` on rank ``r`` receives from another rank."""
    return [k for k in _needs(a, schedule.n_stages - 1) if k[0] != "I" and schedule.rank_of(k[2]) != r]


def _sent(ranks: list) -> tuple[dict, dict]:
    """One round's (producer end, send issued) per result key: a result goes out in the exchange
    before the producer's next action (the run's end after the last)."""
    ends, sent = {}, {}
    for recs, span in ranks:
        for j, rec in enumerate(recs):
            ends[_key(rec.action)] = rec.start + rec.wait_s + rec.compute_s
            sent[_key(rec.action)] = recs[j + 1].start + recs[j + 1].issue_s if j + 1 < len(recs) else span[1]
    return ends, sent


def ready_waits(schedule, ranks: list) -> dict:
    """One round's completion samples: {(rank, action): receive-complete − issued} for the actions
    whose remote inputs had all been sent before the rank issued its exchange."""
    _, sent = _sent(ranks)
    out = {}
    for r, (recs, _) in enumerate(ranks):
        for rec in recs:
            keys = _remote(schedule, rec.action, r)
            issued = rec.start + rec.issue_s
            if keys and all(k in sent and sent[k] <= issued for k in keys):
                out[(r, rec.action)] = rec.wait_s - rec.issue_s
    return out


def fit(schedule, runs: list) -> Measured:
    """``runs``: one entry per round, each a list over pp ranks of (records, span)."""
    comp, ovh, lat, start, tail = {}, {}, [], [[] for _ in runs[0]], [[] for _ in runs[0]]
    last, done = schedule.n_stages - 1, []
    for ranks in runs:
        t_first = min(span[0] for _, span in ranks)
        ends, _ = _sent(ranks)
        done += ready_waits(schedule, ranks).values()
        for r, (recs, span) in enumerate(ranks):
            start[r].append(span[0] - t_first)
            if recs:
                tail[r].append(span[1] - (recs[-1].start + recs[-1].wait_s + recs[-1].compute_s))
            for rec, pre in zip(recs, _pre(recs, span)):
                a = rec.action
                comp.setdefault((a.kind, a.stage), []).append(rec.compute_s)
                ovh.setdefault((a.kind, a.stage), []).append(pre)
                issued, got = rec.start + rec.issue_s, rec.start + rec.wait_s
                for k in _needs(a, last):
                    if k[0] != "I" and schedule.rank_of(k[2]) != r and k in ends and issued <= ends[k]:
                        lat.append(got - ends[k])
    med = statistics.median
    return Measured({k: med(v) for k, v in comp.items()}, {k: med(v) for k, v in ovh.items()},
                    med(lat) if lat else 0.0, [med(v) for v in start], [med(v) if v else 0.0 for v in tail],
                    len(lat), tuple(lat), med(done) if done else 0.0, tuple(done))


def predict(schedule, m: Measured, ranks: list | None = None) -> tuple[list, object]:
    """(simulated idle per rank, the :class:`.simulate.SimResult`) under the measured terms. F&B
    units (DualPipeV) run as the executor runs them on one device: one action after the other.
    ``ranks`` (one round's [(records, span)] per rank): replay that round instead — every action's
    own compute and issuing seconds (and completion where its messages were there), that round's
    start offsets and tails, ``m``'s latency — which
    tests the model (dependencies, latency, overheads) without the spread of per-action times that
    medians leave out (on a loaded machine the medians' sum falls short of the span's compute)."""
    rank = {a: r for r, acts in enumerate(schedule.actions) for a in acts}
    recv = {a: bool(_remote(schedule, a, r)) for a, r in rank.items()}
    comp = lambda a: m.compute[(a.kind, a.stage)]                       # noqa: E731
    ovh = lambda a: m.overhead[(a.kind, a.stage)] + (m.completion if recv[a] else 0)   # noqa: E731
    if ranks is not None:
        by = {rec.action: (rec.compute_s, pre) for recs, span in ranks for rec, pre in zip(recs, _pre(recs, span))}
        own = {a: w for (_, a), w in ready_waits(schedule, ranks).items()}
        t_first = min(span[0] for _, span in ranks)
        comp = lambda a: by[a][0]                                       # noqa: E731
        ovh = lambda a: by[a][1] + (own.get(a, m.completion) if recv[a] else 0)   # noqa: E731
        m = dataclasses.replace(m, start=[span[0] - t_first for _, span in ranks],
                                tail=[span[1] - (recs[-1].start + recs[-1].wait_s + recs[-1].compute_s)
                                      if recs else 0.0 for recs, span in ranks])
    sim = execute(dataclasses.replace(schedule, overlap=frozenset()), comp, overhead=ovh, latency=m.latency,
                  start=m.start)
    idle = []
    for r, ev in enumerate(sim.timelines):
        end = (ev[-1].end if ev else m.start[r]) + m.tail[r]
        idle.append(end - m.start[r] - sim.busy[r])
    return idle, sim
