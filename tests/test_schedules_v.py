"""V-placement schedules (ZB-V, DualPipeV) in the validator and simulator, exact bubbles, and the
per-pair message order the executor issues for every schedule. Pure Python, no processes."""
from fractions import Fraction

import pytest

from parallel.pipeline import Action, ScheduleError, format_grid, get_schedule, max_in_flight, simulate, validate
from parallel.pipeline.p2p_order import issue_groups, issue_order, pair_order_problems, rendezvous_problems
from parallel.pipeline.p2p_streams import DIRECTION, PAIRS, stream_problems
from parallel.pipeline.schedules import forward_only

ALL = ("gpipe", "1f1b", "interleaved", "zero_bubble", "zb_v", "dualpipe_v")


def _grid(name, ms=range(1, 17)):
    for p in (2, 4, 8):
        for m in ms:
            for v in (1, 2):
                try:
                    yield get_schedule(name, p, m, v)
                except ValueError:
                    continue


def test_v_placement():
    sc = get_schedule("zb_v", 4, 8)
    assert [sc.stages_of(r) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [sc.rank_of(s) for s in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]


@pytest.mark.parametrize("name", ALL)
def test_every_schedule_issues_messages_in_the_same_order_at_both_ends(name):
    """Per ordered rank pair, the j-th send is the j-th receive in the executor's issue order."""
    n = 0
    for sc in _grid(name):
        validate(sc, fifo=False)
        assert pair_order_problems(sc) == [], (name, sc.p, sc.m, sc.v)
        n += 1
    assert n >= 9


def test_drain_is_needed_for_zb_v():
    """In ZB-V rank 0 sends activations (stage 0→1) and gradients (stage 3→2) to rank 1, which
    consumes them in another order: action order alone is not FIFO; the issue order is."""
    sc = get_schedule("zb_v", 2, 3)
    with pytest.raises(ScheduleError, match=r"rank 0 -> 1: message 2 is sent as \('act', 2, 0, 1\) but "
                                            r"received as \('grad', 0, 3, 2\)"):
        validate(sc)
    recv = [k for op, q, k in issue_order(sc, 1) if op == "recv" and q == 0]
    assert recv[:4] == [("act", 0, 0, 1), ("act", 1, 0, 1), ("act", 2, 0, 1), ("grad", 0, 3, 2)]


def test_zb_v_bubble():
    """F = I = W = 1 per chunk (default costs, 1/v of a stage). p=4, m=16: every rank busy 96 of
    a 99-step makespan, bubble 3/99 = 1/33; 1F1B 3/19: ZB-V's is 19/99 of it, under a quarter."""
    zbv, ofob = simulate(get_schedule("zb_v", 4, 16)), simulate(get_schedule("1f1b", 4, 16))
    assert zbv.bubble == Fraction(1, 33) and ofob.bubble == Fraction(3, 19)
    assert zbv.bubble <= ofob.bubble / 4
    assert simulate(get_schedule("zb_v", 4, 16), {"F": 1, "I": 1, "W": 1, "B": 2}).makespan == 99
    for p in (2, 4, 8):
        for m in (2 * p, 4 * p):                # ZB-V's bubble below ZB-H1's, below 1F1B's
            b = [simulate(get_schedule(n, p, m)).bubble for n in ("zb_v", "zero_bubble", "1f1b")]
            assert b[0] < b[1] < b[2], (p, m, b)


def test_zb_v_memory():
    """A rank holds at most 2p chunks (of half a stage each) = p stages: 1F1B's rank-0 peak."""
    for sc in _grid("zb_v"):
        for r in range(sc.p):
            got = max_in_flight(sc, r)
            assert got <= 2 * sc.p and (got == 2 * sc.p or sc.m < 2 * sc.p), (sc.p, sc.m, r, got)


@pytest.mark.parametrize("p", [2, 4, 8])
def test_dualpipe_v_bubble_formula(p):
    """DeepSeek's bubble (S/2 − 1)(F&B + B − 3W), S = 2p stages, at F = W = 1, B = 2 and F&B ∈
    {2, 5/2, 3}: the largest per-rank idle time equals it exactly; with no overlap gain
    (F&B = F + B = 3) every rank idles exactly that much."""
    for m in (2 * p, 2 * p + 2, 4 * p):
        sc = validate(get_schedule("dualpipe_v", p, m), fifo=False)
        for fb in (2, Fraction(5, 2), 3):
            res = simulate(sc, {"F": 1, "I": 1, "W": 1, "B": 2, "F&B": fb})
            want = (p - 1) * (fb + 2 - 3)
            assert max(res.idle) == want, (m, fb, res.idle)
            if fb == 3:
                assert res.idle == [want] * p
            # units per rank: 2 per steady round (m − 2p + r + 1 rounds; the last rank's first
            # F and B are not overlapped) + p − r − 1 in the drain; each saves F + B − F&B
            units = [2 * (m - 2 * p + r + 1) + (p - r - 1) - (r == p - 1) for r in range(p)]
            assert units == [sum(1 for q, _ in sc.overlap if q == r) for r in range(p)]
            assert res.busy == [6 * m - u * (3 - fb) for u in units]


def test_dualpipe_v_structure_and_grid():
    sc = get_schedule("dualpipe_v", 2, 4)
    for r, j in sc.overlap:                     # each unit: an F, then a B of the other chunk
        f, b = sc.actions[r][j], sc.actions[r][j + 1]
        assert f.kind == "F" and b.kind == "B" and f.stage != b.stage
    assert len(sc.overlap) == 6                 # 3 per rank (test_dualpipe_v_bubble_formula)
    assert format_grid(sc).splitlines()[2].startswith("rank 0  F0.0 F1.0 F2.0 F0.3 I0.3 W0.3 F1.3 F3.0 B1.3")
    assert sc.actions[0][-2:] == [Action("I", 3, 0), Action("W", 3, 0)]


@pytest.mark.parametrize("args,phrase", [
    (("zb_v", 2, 4, 1), "two stages on each rank (v=2"),
    (("dualpipe_v", 2, 4, 3), "set parallel.pp_virtual_stages=2"),
    (("dualpipe_v", 4, 6, 2), "m >= 2p = 8"),
])
def test_v_rejects(args, phrase):
    with pytest.raises(ValueError, match=None) as err:
        get_schedule(*args)
    assert phrase in str(err.value)


def test_rendezvous_order():
    """With no buffering at all (NCCL: a send blocks its stream until the peer's receive runs),
    the executor's groups (sends of action k−1 with the receives of action k, one
    batch_isend_irecv) never deadlock GPipe, 1F1B and ZB-H1; issued one message at a time 1F1B
    does (p=2, m=2: rank 0 sends act 1 while rank 1 sends grad 0, each waiting for the other).
    Interleaved, ZB-V and DualPipeV can deadlock in this model (the executor warns on NCCL)."""
    for name in ("gpipe", "1f1b", "zero_bubble"):
        for sc in _grid(name, ms=(1, 2, 3, 4, 7, 8, 16)):
            assert rendezvous_problems(sc) == [], (name, sc.p, sc.m)
            for r in range(sc.p):
                assert [op for g in issue_groups(sc, r) for op in g] == issue_order(sc, r)
    assert issue_groups(get_schedule("1f1b", 2, 2), 0) == [
        [("send", 1, ("act", 0, 0, 1))], [("send", 1, ("act", 1, 0, 1)), ("recv", 1, ("grad", 0, 1, 0))],
        [("recv", 1, ("grad", 1, 1, 0))]]
    assert rendezvous_problems(get_schedule("1f1b", 2, 2), grouped=False) == [
        "rank 0 stuck at group 1: [('send', 1, ('act', 1, 0, 1))]",
        "rank 1 stuck at group 1: [('send', 0, ('grad', 0, 1, 0))]"]
    for name in ("interleaved", "zb_v", "dualpipe_v"):
        assert rendezvous_problems(get_schedule(name, 2, 4, 2)) != []



def _every(name, ps=(2, 4, 8), ms=range(1, 17)):
    for p in ps:
        for m in ms:
            if name == "forward":
                yield from (forward_only(p, m, v, pl) for v, pl in ((1, "loop"), (2, "loop"), (2, "v")))
                continue
            for v in (1, 2):
                try:
                    yield get_schedule(name, p, m, v)
                except ValueError:
                    continue


def _free_with_p2p_groups(name, ps, ms):
    n = 0
    for sc in _every(name, ps, ms):
        validate(sc, fifo=False)
        for grouped in (True, False):
            assert stream_problems(sc, PAIRS, grouped) == [], (name, sc.p, sc.m, sc.v, grouped)
        n += 1
    assert n >= 6


@pytest.mark.parametrize("name", ALL + ("forward",))
def test_p2p_groups_make_every_schedule_deadlock_free_on_nccl(name):
    """NCCL's no-buffering stream model (:mod:`parallel.pipeline.p2p_streams`) with the four p2p
    groups the engine builds (direction × sender parity): the schedules can always finish, batched
    per process group (every step after the first) and one message at a time with blocking header
    receives (the first step). Default suite: p ∈ {2, 4, 8}, m ∈ {1, 4, 8, 16}; the slow test below
    covers every m ≤ 16 and p up to 8."""
    _free_with_p2p_groups(name, (2, 4, 8), (1, 4, 8, 16))


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL + ("forward",))
def test_p2p_groups_every_schedule_full_grid(name):
    """p ∈ {2, ..., 8}, every m ≤ 16, v ≤ 2 (the issue's grid and the odd p)."""
    _free_with_p2p_groups(name, range(2, 9), range(1, 17))


def test_one_group_or_one_per_direction_is_not_enough():
    """The same model with every message on the pp group: the interleaved and V schedules can
    deadlock (as the rendezvous model of p2p_order found), and the first step's one-at-a-time order
    deadlocks even 1F1B. One group per direction fixes p = 2 but not ZB-V / DualPipeV at p = 4: rank
    r's "up" stream holds its sends to r+1 and its receives from r−1 in one order."""
    for name in ("interleaved", "zb_v", "dualpipe_v"):
        assert stream_problems(get_schedule(name, 2, 4, 2), None) != [], name
        assert stream_problems(get_schedule(name, 2, 4, 2), DIRECTION) == [], name
    assert stream_problems(get_schedule("1f1b", 2, 2), None) == []
    assert stream_problems(get_schedule("1f1b", 2, 2), None, grouped=False) != []
    assert stream_problems(get_schedule("1f1b", 2, 2), PAIRS, grouped=False) == []
    for name in ("zb_v", "dualpipe_v"):
        assert stream_problems(get_schedule(name, 4, 8), DIRECTION) != [], name
        assert stream_problems(get_schedule(name, 4, 8), PAIRS) == [], name
