"""parallel.pipeline.measured_spread and the completion term of parallel.pipeline.measured, on
executor records recorded once (tests/data/pp_records_5m_loaded.json: benchmarks/pp_idle.py --size 5m
--rounds 6 --save, pp = 2, m = 8, a loaded machine — a fixture, not live timing) and on records
synthesised from a known model (exact Fractions)."""
import json
import os
import statistics
from fractions import Fraction as Fr

import pytest
from test_pipeline_measured import LAT, START, TAIL, _comp, _ovh

from parallel.pipeline.measured import _remote, fit, measured_idle, predict
from parallel.pipeline.measured_spread import dump_runs, load_runs, predict_spread
from parallel.pipeline.runtime import Record
from parallel.pipeline.schedules import get_schedule
from parallel.pipeline.simulate import execute

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "pp_records_5m_loaded.json")
DONE = Fr(1, 7)                       # a receive's completion when its message is already there


def _recorded():
    with open(FIXTURE) as f:
        d = json.load(f)
    for name, e in d["schedules"].items():
        yield name, get_schedule(name, d["p"], d["m"], e["v"] if e["v"] > 1 else None), load_runs(e["runs"])


def _ratios(sc, runs, idle):
    meas = [statistics.median(measured_idle(*ranks[r]) for ranks in runs) for r in range(sc.p)]
    return [a / b for a, b in zip(meas, idle)]


def test_recorded_idle_within_15_percent_of_the_drawn_simulation():
    """Issue 19: measured idle per rank vs the simulator's with measured costs, within 15 %. On the
    recorded rounds (1F1B, ZB-H1, ZB-V; 2 ranks each): every one of the 6 rank-schedules is within
    15 % under the drawn costs (by position, 200 draws, seed 0), and within 6 % when each round is
    replayed with its own action times; the median costs alone leave both ZB-H1 and both ZB-V
    ranks outside (1.86, 1.15, 1.29, 1.31: the spread of action times is idle the medians miss)."""
    worst, replay_worst, median_out = 0.0, 0.0, []
    for name, sc, runs in _recorded():
        m = fit(sc, runs)
        drawn = _ratios(sc, runs, predict_spread(sc, runs).idle)
        worst = max([worst] + [abs(x - 1) for x in drawn])
        replay = [statistics.median(predict(sc, m, ranks)[0][r] for ranks in runs) for r in range(sc.p)]
        replay_worst = max([replay_worst] + [abs(x - 1) for x in _ratios(sc, runs, replay)])
        median_out += [(name, r) for r, x in enumerate(_ratios(sc, runs, predict(sc, m)[0])) if abs(x - 1) > 0.15]
    assert worst <= 0.15 and replay_worst <= 0.06, (worst, replay_worst)
    assert median_out == [("zero_bubble", 0), ("zero_bubble", 1), ("zb_v", 0), ("zb_v", 1)]


def test_completion_is_fitted_and_needed_for_the_replay():
    """Without the completion term (receive done − issued when the message was there) the replay
    of the recorded rounds undercounts the idle: it is what closes the gap (mean ratio > 1.05 → ≤ 1.03)."""
    with_c, without = [], []
    for _, sc, runs in _recorded():
        m = fit(sc, runs)
        assert m.completion > 0 and len(m.completion_all) > 10
        for ranks in runs[:2]:
            meas = [measured_idle(*ranks[r]) for r in range(sc.p)]
            with_c += [a / b for a, b in zip(meas, predict(sc, m, ranks)[0])]
            no = _replay_without_completion(sc, m, ranks)
            without += [a / b for a, b in zip(meas, no)]
    assert statistics.mean(without) > 1.05 and abs(statistics.mean(with_c) - 1) <= 0.03


def _replay_without_completion(sc, m, ranks):
    from parallel.pipeline.measured import _pre
    by = {rec.action: (rec.compute_s, pre) for recs, span in ranks for rec, pre in zip(recs, _pre(recs, span))}
    t_first = min(span[0] for _, span in ranks)
    start = [span[0] - t_first for _, span in ranks]
    sim = execute(sc, lambda a: by[a][0], overhead=lambda a: by[a][1], latency=m.latency, start=start)
    return [ev[-1].end + (span[1] - (recs[-1].start + recs[-1].wait_s + recs[-1].compute_s)) - start[r] - sim.busy[r]
            for r, (ev, (recs, span)) in enumerate(zip(sim.timelines, ranks))]


def _records_with_completion(sc):
    """As test_pipeline_measured._records, with every receive taking DONE after its issue when its
    message is already there (the simulator: start = max(ready + overhead + DONE, arrival))."""
    recv = {a for r, acts in enumerate(sc.actions) for a in acts if _remote(sc, a, r)}
    ovh = lambda a: _ovh(a) + (DONE if a in recv else 0)                          # noqa: E731
    sim = execute(sc, lambda a: _comp(a, True), overhead=ovh, latency=LAT, start=START)
    ranks = []
    for r, events in enumerate(sim.timelines):
        prev, recs = START[r], []
        for e in events:
            book = _ovh(e.action) / 3
            start = prev + book
            recs.append(Record(e.action, e.start - start, e.end - e.start, start, _ovh(e.action) - book))
            prev = e.end
        ranks.append((recs, (START[r], prev + TAIL[r])))
    return ranks


@pytest.mark.parametrize("name,v", [("1f1b", 1), ("zero_bubble", 1), ("zb_v", 2)])
def test_completion_recovered_and_one_round_drawn_equals_replay(name, v):
    """Synthetic records with a completion term: fit() recovers it exactly, predict() replays the
    idle exactly, predict_spread over one round (every draw is that round) equals it, and the JSON
    round trip keeps every record."""
    sc = get_schedule(name, 2, 4, v)
    ranks = _records_with_completion(sc)
    m = fit(sc, [ranks])
    assert m.completion == DONE and m.latency == LAT
    want = [measured_idle(recs, span) for recs, span in ranks]
    assert predict(sc, m, ranks)[0] == want
    assert predict_spread(sc, [ranks], draws=3).idle == want
    assert load_runs(dump_runs([ranks])) == [[(recs, tuple(span)) for recs, span in ranks]]


def test_spread_refuses_bad_input():
    sc = get_schedule("1f1b", 2, 4)
    with pytest.raises(ValueError, match="rounds of 2"):
        predict_spread(sc, [[([], (0, 1))]])
    with pytest.raises(ValueError, match="by="):
        predict_spread(sc, [_records_with_completion(sc)], by="rank")
