"""Process-free execution of a pipeline schedule: timelines, makespan, bubble, grid.

Model: each rank runs its actions in list order; an action starts when the rank is free and
its inputs exist — F(i, s) needs F(i, s−1); B/I(i, s) needs its own F(i, s) and B/I(i, s+1)
(on the last stage only its F); W(i, s) needs I(i, s). Communication costs nothing and sends
are buffered, so a receive blocks only until the matching send's compute has finished. A
rank whose next input can never arrive is blocked; if any rank ends blocked, it is a deadlock.

Overlapped F&B units (:attr:`~.schedules.Schedule.overlap`, DualPipeV) start when the inputs of
both actions exist and take ``cost["F&B"]`` (default: F + B, no overlap gain); both results
appear at the unit's end.

Cost convention (default, :func:`default_costs`): per full stage F = I = W = 1 and B = I + W
= 2 — the zero-bubble paper's T_F = T_B = T_W (arXiv 2401.10241) — and a virtual stage of an
interleaved schedule costs 1/v of that, so a rank's total work is 3m whatever v. All numbers
are :class:`fractions.Fraction`, so the theory holds exactly:

* GPipe, 1F1B: bubble = (p−1)/(m+p−1) (for any constant F and B costs);
* interleaved: (p−1)/(v·m+p−1);
* ZB-H1: makespan 3m+p−1 and bubble (p−1)/(3m+p−1) for m ≥ p; for m < p still below 1F1B
  (e.g. p=4, m=1: makespan 9 = F chain 4 + I chain 4 + W 1, bubble 2/3 vs 1F1B's 3/4).

``bubble`` is total idle rank-time over total rank-time: Σ_r (makespan − busy_r) / (p·makespan).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from numbers import Rational
from typing import TYPE_CHECKING, Callable, Mapping, NamedTuple, Union

from parallel.pipeline.actions import Action, ScheduleError

if TYPE_CHECKING:
    from parallel.pipeline.schedules import Schedule

Cost = Union[None, Mapping[str, object], Callable[[Action], object]]


class Event(NamedTuple):
    start: object
    end: object
    action: Action


@dataclass
class SimResult:
    """``timelines[r]``: rank r's (start, end, action) events in run order. ``blocked[r]``:
    (action, reason) where rank r stopped forever; empty when the schedule ran to the end."""

    p: int
    timelines: list[list[Event]]
    busy: list
    makespan: object
    blocked: dict[int, tuple[Action, str]] = field(default_factory=dict)

    @property
    def idle(self) -> list:
        """Per-rank idle time within [0, makespan]."""
        return [self.makespan - b for b in self.busy]

    @property
    def bubble(self):
        """Σ idle / (p · makespan), a Fraction when the costs are ints or Fractions."""
        idle, total = sum(self.idle), self.p * self.makespan
        if not total:
            return Fraction(0)
        if isinstance(idle, Rational) and isinstance(total, Rational):
            return Fraction(idle) / Fraction(total)
        return idle / total

    def deadlock_message(self) -> str:
        ranks = ", ".join(map(str, sorted(self.blocked)))
        who = "every rank waits forever" if len(self.blocked) == self.p else \
            f"rank(s) {ranks} wait forever (the others finished)"
        lines = [f"deadlock: {who}"]
        for r, (a, why) in sorted(self.blocked.items()):
            lines.append(f"    rank {r} at {a.label(2)}: {why}")
        return "\n".join(lines)


def default_costs(v: int = 1) -> dict[str, Fraction]:
    """Per-action durations: F = I = W = 1/v, B = 2/v (see the module docstring)."""
    return {"F": Fraction(1, v), "B": Fraction(2, v), "I": Fraction(1, v), "W": Fraction(1, v)}


def unit_cost(action: Action) -> int:
    """Every action takes one step: the grid's time axis."""
    return 1


def _cost_fn(cost: Cost, v: int) -> Callable[[Action], object]:
    if cost is None:
        cost = default_costs(v)
    if callable(cost):
        return cost
    missing = [k for k in "FBIW" if k not in cost]

    def lookup(a: Action):
        if a.kind not in cost:
            raise KeyError(f"cost has no duration for kind {a.kind!r} (has {sorted(cost)}); "
                           f"missing {missing}")
        return cost[a.kind]
    return lookup


def _needs(a: Action, last: int) -> list[tuple[str, int, int]]:
    """Keys of the results ``a`` waits for: ("F"|"G"|"I", microbatch, stage); G = grad out."""
    i, s = a.microbatch, a.stage
    if a.kind == "F":
        return [("F", i, s - 1)] if s > 0 else []
    if a.kind in ("B", "I"):
        return [("F", i, s)] + ([("G", i, s + 1)] if s < last else [])
    if a.kind == "W":
        return [("I", i, s)]
    return [("?", i, s)]  # unknown kind: never runs


def _why(key: tuple[str, int, int], schedule: Schedule) -> str:
    kind, i, s = key
    src = f"stage {s} (rank {schedule.rank_of(s)})"
    return {"F": f"needs activation of micro-batch {i} from F on {src}",
            "G": f"needs grad of micro-batch {i} from B/I on {src}",
            "I": f"needs I of micro-batch {i} on stage {s} first",
            "?": "unknown action kind"}[kind]


def execute(schedule: Schedule, cost: Cost = None, overhead: Callable[[Action], object] | None = None,
            latency=0, start: list | None = None) -> SimResult:
    """Run ``schedule`` under the model above; never raises on deadlock (see ``blocked``).
    ``overhead``, ``latency``, ``start``: the measured-cost terms of the module docstring (default 0);
    ``latency`` may be a callable (key, receiving rank) → seconds, asked once per message
    (:mod:`.measured_spread` draws it)."""
    dur = _cost_fn(cost, schedule.v)
    ovh = overhead or (lambda a: 0)
    lat = latency if callable(latency) else (lambda key, r: latency)

    def arrival(key, r):
        kind, _, s = key
        return done[key] + (lat(key, r) if kind != "I" and schedule.rank_of(s) != r else 0)
    pairs = getattr(schedule, "overlap", frozenset())
    fb = cost.get("F&B") if isinstance(cost, Mapping) else None

    def pair_cost(a, b):
        return fb if fb is not None else dur(a) + dur(b)
    last = schedule.n_stages - 1
    p = len(schedule.actions)
    done: dict[tuple[str, int, int], object] = {}
    free = list(start) if start is not None else [0] * p
    busy = [0] * p
    ptr = [0] * p
    timelines: list[list[Event]] = [[] for _ in range(p)]
    progress = True
    while progress:
        progress = False
        for r in range(p):
            acts = schedule.actions[r]
            while ptr[r] < len(acts):
                unit = acts[ptr[r]:ptr[r] + 2] if (r, ptr[r]) in pairs else acts[ptr[r]:ptr[r] + 1]
                needs = [k for a in unit for k in _needs(a, last)]
                if any(k not in done for k in needs):
                    break
                t0 = max([free[r] + ovh(unit[0])] + [arrival(k, r) for k in needs])
                d = pair_cost(*unit) if len(unit) == 2 else dur(unit[0])
                end = t0 + d
                part = Fraction(d) / len(unit) if isinstance(d, Rational) else d / len(unit)
                for j, a in enumerate(unit):            # an F&B unit: two events sharing its time
                    timelines[r].append(Event(t0 + j * part, t0 + (j + 1) * part, a))
                    done[("G" if a.kind in ("B", "I") else a.kind, a.microbatch, a.stage)] = end
                    if a.kind == "I":
                        done[("I", a.microbatch, a.stage)] = end
                free[r], busy[r] = end, busy[r] + d
                ptr[r] += len(unit)
                progress = True
    blocked = {}
    for r in range(p):
        if ptr[r] < len(schedule.actions[r]):
            a = schedule.actions[r][ptr[r]]
            key = next(k for k in _needs(a, last) if k not in done)
            blocked[r] = (a, _why(key, schedule))
    return SimResult(p, timelines, busy, max(free, default=0), blocked)


def simulate(schedule: Schedule, cost: Cost = None) -> SimResult:
    """Timelines, makespan and bubble of ``schedule``.

    ``cost``: None for :func:`default_costs` (scaled by 1/v), a mapping kind → duration used
    as given, or a callable action → duration. Raises :class:`ScheduleError` on deadlock.
    """
    result = execute(schedule, cost)
    if result.blocked:
        raise ScheduleError(result.deadlock_message() + "\n" + format_grid(schedule))
    return result


def format_grid(schedule: Schedule) -> str:
    """Step × rank grid from a unit-cost run: rows are ranks, columns time steps, cells
    ``F3``/``B3``/``I3``/``W3`` (``F3.1`` = stage 1 when v > 1) or ``.`` when idle. Actions a
    blocked rank never reaches are listed after ``| stuck:``."""
    v = schedule.v
    if not all(isinstance(a, Action) for acts in schedule.actions for a in acts):
        return "\n".join([f"{schedule.name} p={schedule.p} m={schedule.m} v={v} (not runnable)"]
                         + [f"rank {r}: " + " ".join(a.label(v) if isinstance(a, Action)
                                                     else repr(a) for a in acts)
                            for r, acts in enumerate(schedule.actions)])
    run = execute(schedule, unit_cost)
    width = max([2] + [len(a.label(v)) for acts in schedule.actions for a in acts])
    steps = run.makespan
    head = f"{schedule.name} p={schedule.p} m={schedule.m} v={v}"
    cols = " ".join(str(t % 100).ljust(width) for t in range(steps))
    lines = [head, ("step".ljust(8) + cols).rstrip()]
    for r, events in enumerate(run.timelines):
        cells = ["."] * steps
        for e in events:
            cells[int(e.start)] = e.action.label(v)
        row = f"rank {r}".ljust(8) + " ".join(c.ljust(width) for c in cells)
        rest = schedule.actions[r][len(events):]
        if rest:
            row += " | stuck: " + " ".join(a.label(v) for a in rest)
        lines.append(row.rstrip())
    return "\n".join(lines)
