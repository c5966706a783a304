"""parallel.pipeline.measured: the simulator fed with measured terms (issue 19: measured idle per rank
vs the simulator's prediction). Records are synthesised from a known model — per-action compute,
bookkeeping + issuing overhead, p2p latency, start offsets, tails — exactly as the executor writes
them (exchange start, issue, wait, compute; the run's span). Asserted, in exact Fractions: fit()
recovers every term, predict() gives back the measured idle of every rank (and replaying a round
with per-micro-batch costs does too), and a model without the latency does not."""
import dataclasses
from fractions import Fraction as Fr

import pytest

from parallel.pipeline.measured import fit, measured_idle, predict
from parallel.pipeline.runtime import Record
from parallel.pipeline.schedules import get_schedule
from parallel.pipeline.simulate import execute

LAT = Fr(3, 10)
START = [Fr(0), Fr(1, 5)]
TAIL = [Fr(1, 10), Fr(2, 5)]
KIND = {"F": Fr(1), "B": Fr(2), "I": Fr(6, 5), "W": Fr(4, 5)}


def _comp(a, jitter):
    base = KIND[a.kind] * (1 + Fr(a.stage, 4))                  # per kind and stage: the last stage costs more
    return base + (Fr(a.microbatch, 50) if jitter else 0)


def _ovh(a):
    return Fr(1, 20) if a.kind in "FBI" else Fr(1, 40)         # actions with messages issue more


def _records(sc, jitter):
    """What the executor would record on each rank under the model, as (records, span) per rank."""
    sim = execute(sc, lambda a: _comp(a, jitter), overhead=_ovh, latency=LAT, start=START)
    ranks = []
    for r, events in enumerate(sim.timelines):
        prev, recs = START[r], []
        for e in events:
            book = _ovh(e.action) / 3                            # bookkeeping before the exchange starts
            start = prev + book
            recs.append(Record(e.action, e.start - start, e.end - e.start, start, _ovh(e.action) - book))
            prev = e.end
        ranks.append((recs, (START[r], prev + TAIL[r])))
    return ranks


@pytest.mark.parametrize("name,v", [("1f1b", 1), ("zero_bubble", 1), ("zb_v", 2), ("interleaved", 2)])
def test_fit_recovers_the_terms_and_predict_the_idle(name, v):
    sc = get_schedule(name, 2, 4, v)
    ranks = _records(sc, jitter=False)
    m = fit(sc, [ranks, ranks])
    assert m.latency == LAT and m.latency_samples > 0
    assert m.start == START and m.tail == TAIL
    assert m.compute == {(a.kind, a.stage): _comp(a, False) for acts in sc.actions for a in acts}
    assert m.overhead == {(a.kind, a.stage): _ovh(a) for acts in sc.actions for a in acts}
    idle, _ = predict(sc, m)
    want = [measured_idle(recs, span) for recs, span in ranks]
    assert idle == want and all(x > 0 for x in want)
    no_latency, _ = predict(sc, dataclasses.replace(m, latency=0))
    assert no_latency != want                                    # the latency is part of the idle


@pytest.mark.parametrize("name,v", [("1f1b", 1), ("zb_v", 2)])
def test_replay_uses_each_actions_own_costs(name, v):
    """Per-micro-batch costs: the medians' prediction drifts, a replay of the round is exact."""
    sc = get_schedule(name, 2, 8, v)
    ranks = _records(sc, jitter=True)
    m = fit(sc, [ranks])
    want = [measured_idle(recs, span) for recs, span in ranks]
    assert predict(sc, m, ranks)[0] == want
    assert predict(sc, m)[0] != want
