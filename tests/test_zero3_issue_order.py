"""ZeRO-3 issue order (parallel/zero/stage3.py): a hook issues its module's gathers and the prefetch of the next
module's before it waits, so a wait leaves the link idle behind it only where there is nothing left to prefetch.

Counted on 2 gloo ranks, GPT of L blocks with block units, keep = 2, one step after the traced ones: of the 2L
waits on a gather (forward: the root and every block; backward: every block but the kept last one), exactly two
are *lone* (no other gather in flight): the last block's in forward and the first block's in backward. Before
(wait, then prefetch) every wait was lone (2L; the test model has L = 2, so 4 against 2). At the step's start
the first block's gather is on the wire before the wait on the root's. Losses are bitwise those of
prefetch = False (the issue order moves no arithmetic).
"""
from harness import run_ranks
from test_zero import train, zero_run

G, STEPS = 8, 2          # the first step traces; the third is counted


def _counted_step(zero, model, g):
    """One more step; returns (losses, the ("issue" | "wait", unit index) events of its gathers)."""
    from parallel.zero import stage3
    events = []
    gather, landed = stage3.Stage3Params._gather, stage3.Stage3Params._landed

    def spy_gather(self, u, wait=True):
        if u.state == stage3.SHARDED:
            events.append(("issue", u.index))
        return gather(self, u, wait)

    def spy_landed(self, u):
        if u.work is not None:
            events.append(("wait", u.index))
        return landed(self, u)
    stage3.Stage3Params._gather, stage3.Stage3Params._landed = spy_gather, spy_landed
    try:
        more, _ = train(zero, model, g, G, 1, start=STEPS)
    finally:
        stage3.Stage3Params._gather, stage3.Stage3Params._landed = gather, landed
    return more, events


def _run(rank, world):
    from parallel.mesh import Mesh
    g = Mesh(dp=world).group("dp")
    out = {}
    for prefetch in (True, False):
        losses, _, zero, model = zero_run(g, "gpt", "adamw", STEPS, G, 3, units="block", keep=2, prefetch=prefetch)
        s3 = zero.stage3
        lone0, gathers0 = s3.lone_waits, s3.gathers
        more, events = _counted_step(zero, model, g)
        out[prefetch] = dict(losses=losses + more, lone=s3.lone_waits - lone0, gathers=s3.gathers - gathers0,
                             events=events, n=len(s3.units))
    return out


def test_prefetch_is_issued_before_the_wait():
    for r in run_ranks(_run, 2):
        got, off = r[True], r[False]
        L = got["n"] - 1                                          # block units; unit 0 is the root's
        assert got["gathers"] == 2 * L, got                        # forward: root + L blocks; backward: L − 1
        waits = [e for e in got["events"] if e[0] == "wait"]
        assert len(waits) == got["gathers"], got["events"]
        assert got["lone"] == 2, got["events"]                     # before this change: all 2L (4)
        assert got["events"][:3] == [("issue", 0), ("issue", 1), ("wait", 0)], got["events"]
        assert off["lone"] == off["gathers"]                       # no prefetch: every wait is lone
        assert got["losses"] == off["losses"]                      # bitwise
