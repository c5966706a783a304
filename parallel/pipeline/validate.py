"""The validator of pipeline schedules: structure, coverage, stage order, message order, and a
process-free run (:mod:`parallel.pipeline.simulate`) that must not deadlock. A failure raises
:class:`~parallel.pipeline.schedules.ScheduleError` with the step × rank grid."""
from __future__ import annotations

from collections import Counter

from parallel.pipeline.actions import KINDS, Action, ScheduleError
from parallel.pipeline.schedules import Schedule, comm_ops
from parallel.pipeline.simulate import execute, format_grid, unit_cost

__all__ = ["validate"]


def _fail(schedule: Schedule, problems: list[str]) -> None:
    shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
    raise ScheduleError(
        f"invalid {schedule.name} schedule (p={schedule.p}, m={schedule.m}, v={schedule.v}):\n  "
        + "\n  ".join(shown) + "\n" + format_grid(schedule))


def _check_structure(sc: Schedule) -> list[str]:
    if len(sc.actions) != sc.p:
        return [f"expected action lists for {sc.p} ranks, got {len(sc.actions)}"]
    bad = []
    for r, acts in enumerate(sc.actions):
        for a in acts:
            if not isinstance(a, Action) or a.kind not in KINDS:
                bad.append(f"rank {r}: {a!r} is not an Action of kind {'/'.join(KINDS)}")
            elif not (0 <= a.microbatch < sc.m and 0 <= a.stage < sc.n_stages):
                bad.append(f"rank {r}: {a.label(2)} out of range (m={sc.m}, stages={sc.n_stages})")
            elif sc.rank_of(a.stage) != r:
                bad.append(f"rank {r}: {a.label(2)} but stage {a.stage} lives on rank "
                           f"{sc.rank_of(a.stage)}")
    return bad


def _check_coverage(sc: Schedule) -> list[str]:
    count = Counter(a for acts in sc.actions for a in acts)
    bad = []
    for s in range(sc.n_stages):
        for i in range(sc.m):
            n = {k: count[Action(k, i, s)] for k in KINDS}
            where = f"micro-batch {i} stage {s} (rank {sc.rank_of(s)})"
            if n["F"] != 1:
                bad.append(f"{where}: {n['F']} F actions, need exactly 1")
            if sc.forward_only:
                if n["B"] + n["I"] + n["W"]:
                    bad.append(f"{where}: a backward action in a forward-only schedule")
            elif (n["B"], n["I"], n["W"]) not in ((1, 0, 0), (0, 1, 1)):
                bad.append(f"{where}: B×{n['B']} I×{n['I']} W×{n['W']}, need one B or one I "
                           "and one W")
    return bad


def _check_order(sc: Schedule) -> list[str]:
    bad = []
    for r, acts in enumerate(sc.actions):
        pos = {a: j for j, a in enumerate(acts)}
        for j, a in enumerate(acts):
            need = {"B": "F", "I": "F", "W": "I"}.get(a.kind)
            before = Action(need, a.microbatch, a.stage) if need else None
            if before in pos and pos[before] > j:
                bad.append(f"rank {r}: {a.label(2)} at position {j} comes before "
                           f"{before.label(2)} at position {pos[before]}")
    return bad


def _check_messages(sc: Schedule, fifo: bool) -> list[str]:
    sends: dict[tuple[int, int], list] = {}
    recvs: dict[tuple[int, int], list] = {}
    for r in range(sc.p):
        for step in comm_ops(sc, r):
            for op in step.send:
                sends.setdefault((r, op.peer), []).append(op.key)
            for op in step.recv:
                recvs.setdefault((op.peer, r), []).append(op.key)
    bad = []
    for pair in sorted(set(sends) | set(recvs)):
        sent, got = sends.get(pair, []), recvs.get(pair, [])
        extra_s, extra_r = Counter(sent) - Counter(got), Counter(got) - Counter(sent)
        for key in extra_s:
            bad.append(f"rank {pair[0]} sends {key} to rank {pair[1]}, which never receives it")
        for key in extra_r:
            bad.append(f"rank {pair[1]} waits for {key} from rank {pair[0]}, which never sends it")
        if fifo and not extra_s and not extra_r and sent != got:
            j = next(k for k, (a, b) in enumerate(zip(sent, got)) if a != b)
            bad.append(f"rank {pair[0]} -> {pair[1]}: message {j} is sent as {sent[j]} but "
                       f"received as {got[j]} (order differs)")
    return bad


def validate(schedule: Schedule, fifo: bool = True) -> Schedule:
    """Check ``schedule`` and return it; raise :class:`ScheduleError` (with the grid) if:
    an action is malformed or on the wrong rank; a (micro-batch, stage) lacks exactly one F and
    one B (or one I and one W); on a rank a B/I precedes its F or a W its I; a send has no
    matching receive — with ``fifo`` (default) also in the same order on each (sender,
    receiver) pair, so a runtime may match messages by arrival; ``fifo=False`` if it matches
    by :attr:`P2P.key` — or execution with blocking receives and buffered sends
    deadlocks (some rank waits forever for a message — this also enforces the stage order:
    F of stage s after F of s−1, B of s after B of s+1)."""
    for check in (_check_structure, _check_coverage, _check_order):
        problems = check(schedule)
        if problems:
            _fail(schedule, problems)
    problems = _check_messages(schedule, fifo=False)
    if problems:
        _fail(schedule, problems)
    run = execute(schedule, unit_cost)
    if run.blocked:
        _fail(schedule, [run.deadlock_message()])
    problems = _check_messages(schedule, fifo) if fifo else []
    if problems:
        _fail(schedule, problems)
    return schedule
