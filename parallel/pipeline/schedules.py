"""Pipeline schedules as data: pure action lists, a validator, and the p2p they imply.

Notation: ``p`` pipeline ranks, ``m`` micro-batches per step, ``v`` virtual stages (model
chunks) per rank, ``S = p·v`` stages. Stage ``s`` lives on rank ``s mod p`` (Megatron-LM's
round-robin: rank r holds stages r, r+p, r+2p, ...); for v = 1 stage == rank.

A schedule is, for every rank, the ordered list of compute actions it runs:
``F`` forward, ``B`` full backward, or backward split into ``I`` (input-grad, ∂L/∂x, on the
critical path) and ``W`` (weight-grad, ∂L/∂w, deferrable) — of micro-batch ``i`` on stage ``s``.
Idle time is implicit: a rank idles while it waits for an input. Communication is implied by the
compute actions (:func:`comm_ops`): F on stage s>0 receives the activation of stage s−1 first and
F on a non-last stage sends its output to stage s+1; B/I on a non-last stage receives the output
grad from stage s+1 first and B/I on stage s>0 sends the input grad to stage s−1; W talks to
no one. Messages are identified by :attr:`P2P.key` (microbatch, stages, act/grad); the loop-placed
schedules keep the same message order at both ends of every rank pair in action order
(``validate`` checks it), ZB-V does not — the executor receives in the sender's order
(:mod:`.p2p_order`), which is FIFO per pair for every schedule.

Theory (equal costs per stage: t_f forward, t_b backward; :mod:`.simulate` checks it exactly):

* GPipe (Huang et al., arXiv 1811.06965): all F, then all B. Bubble time (p−1)(t_f+t_b) on a
  step of (m+p−1)(t_f+t_b), so the bubble fraction is (p−1)/(m+p−1); every rank holds the
  activations of all m micro-batches.
* 1F1B / PipeDream-Flush (Narayanan et al., arXiv 2104.04473, §2.2.1): rank r runs p−r−1
  warm-up forwards, then alternates one F and one B, then drains. Same bubble (p−1)/(m+p−1),
  but rank r holds at most min(p−r, m) micro-batches.
* Interleaved 1F1B (same paper, §2.2.2): each rank holds v chunks, each costing 1/v of a stage,
  so the bubble time shrinks to (p−1)(t_f+t_b)/v and the fraction to (p−1)/(v·m+p−1).
  Megatron-LM's order: micro-batches go in groups of p per chunk, warm-up is
  2(p−r−1) + (v−1)p forwards; it needs m to be a multiple of p (and p ≥ 2, v ≥ 2).
* ZB-V and DualPipeV (two stages per rank in a V): :mod:`.schedules_v`.
* ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", arXiv 2401.10241, §2.2): 1F1B with B
  split into I and W; rank r defers its W's by r slots so they fill the bubbles. Bubble time
  (p−1)(T_F+T_I−T_W); with T_F = T_I = T_W = 1 that is (p−1) against 1F1B's 3(p−1), i.e. a
  fraction (p−1)/(3m+p−1) for m ≥ p — about a third of 1F1B's (p−1)/(m+p−1). Activations live
  until W, and rank r holds at most min(p, m) micro-batches: 1F1B's peak (rank 0's), on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from parallel.pipeline.actions import Action
from parallel.pipeline.simulate import format_grid

NAMES = ("gpipe", "1f1b", "interleaved", "zero_bubble", "zb_v", "dualpipe_v")


@dataclass
class Schedule:
    """``actions[r]`` is rank r's ordered list of compute actions. ``placement``: "loop" (stage s
    on rank s mod p) or "v" (v = 2: stages r and 2p−1−r on rank r, :mod:`.schedules_v`).
    ``overlap``: the (rank, j) where actions j (an F) and j+1 (a B) of that rank run overlapped as
    one F&B unit (DualPipeV); the simulator costs them as ``F&B``."""

    name: str
    p: int
    m: int
    v: int
    actions: list[list[Action]] = field(default_factory=list)
    placement: str = "loop"
    overlap: frozenset = frozenset()
    forward_only: bool = False          # evaluation: F actions only (:func:`forward_only`)

    @property
    def n_stages(self) -> int:
        return self.p * self.v

    def rank_of(self, stage: int) -> int:
        if self.placement == "v":
            return stage if stage < self.p else 2 * self.p - 1 - stage
        return stage % self.p

    def stages_of(self, rank: int) -> list[int]:
        """The stages rank ``rank`` holds, in increasing order."""
        return [s for s in range(self.n_stages) if self.rank_of(s) == rank]

    def __str__(self) -> str:
        return format_grid(self)


@dataclass(frozen=True)
class P2P:
    """A point-to-point message: ``op`` "send"/"recv" with ``peer``; the tensor is the
    activation ("act", src_stage = dst_stage − 1) or gradient ("grad", src_stage = dst_stage + 1)
    of ``microbatch``."""

    op: str
    peer: int
    tensor: str
    microbatch: int
    src_stage: int
    dst_stage: int

    @property
    def key(self) -> tuple[str, int, int, int]:
        """Identifies the message on both ends (use it as the tag/header)."""
        return (self.tensor, self.microbatch, self.src_stage, self.dst_stage)


@dataclass(frozen=True)
class Step:
    """An action with its communication: receive ``recv``, compute, then send ``send``."""

    action: Action
    recv: tuple[P2P, ...]
    send: tuple[P2P, ...]


# ---------------------------------------------------------------------------------- schedules
def _check_args(name: str, p: int, m: int, v: int) -> None:
    for arg, val in (("p", p), ("m", m), ("v", v)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name}: {arg} must be a positive int, got {val!r}")
    if name != "interleaved" and v != 1:
        raise ValueError(
            f"{name} runs one stage per rank (v=1), got v={v}; "
            "use 'interleaved' for virtual stages"
        )


def gpipe(p: int, m: int, v: int = 1) -> Schedule:
    """GPipe: every rank runs F0..F(m−1), then B0..B(m−1). Bubble (p−1)/(m+p−1); holds m."""
    _check_args("gpipe", p, m, v)
    acts = [[Action("F", i, r) for i in range(m)] + [Action("B", i, r) for i in range(m)]
            for r in range(p)]
    return Schedule("gpipe", p, m, v, acts)


def one_f_one_b(p: int, m: int, v: int = 1) -> Schedule:
    """1F1B (PipeDream-Flush): w = min(p−r−1, m) warm-up F's, then m−w (F, B) pairs, then w B's.
    Bubble (p−1)/(m+p−1); rank r holds at most min(p−r, m) micro-batches."""
    _check_args("1f1b", p, m, v)
    acts = []
    for r in range(p):
        w = min(p - r - 1, m)
        a = [Action("F", i, r) for i in range(w)]
        for i in range(m - w):
            a += [Action("F", w + i, r), Action("B", i, r)]
        acts.append(a + [Action("B", i, r) for i in range(m - w, m)])
    return Schedule("1f1b", p, m, v, acts)


def interleaved_1f1b(p: int, m: int, v: int) -> Schedule:
    """Interleaved 1F1B, Megatron-LM's order (arXiv 2104.04473 §2.2.2).

    Rank r runs k = 0..v·m−1 forwards; the k-th is micro-batch ⌊k/pv⌋·p + k mod p on chunk
    ⌊(k mod pv)/p⌋ (stage chunk·p + r); the k-th backward uses chunk v−1−that. Warm-up is
    min(v·m, 2(p−r−1) + (v−1)p) forwards, then (F, B) pairs, then the remaining B's.
    Bubble (p−1)/(v·m+p−1) when each chunk costs 1/v of a full stage.
    """
    _check_args("interleaved", p, m, v)
    if v < 2:
        raise ValueError(f"interleaved needs v >= 2 virtual stages per rank, got v={v}; "
                         "for v=1 use '1f1b'")
    if p < 2:
        raise ValueError("interleaved needs p >= 2 pipeline ranks (with p=1 there is no "
                         "pipeline to interleave); use v=1")
    if m % p:
        lo, hi = (m // p) * p, (m // p + 1) * p
        hint = f"m={lo} or m={hi}" if lo else f"m={hi}"
        raise ValueError(
            f"interleaved needs the number of micro-batches m to be a multiple of p, as "
            f"Megatron-LM's interleaved schedule does (it runs micro-batches in groups of p per "
            f"virtual stage); got m={m}, p={p}: use {hint}, or the '1f1b' schedule")
    total = v * m

    def pick(kind: str, k: int, r: int) -> Action:
        group, within = divmod(k, p * v)
        chunk = within // p if kind == "F" else v - 1 - within // p
        return Action(kind, group * p + within % p, chunk * p + r)

    acts = []
    for r in range(p):
        warm = min(total, 2 * (p - r - 1) + (v - 1) * p)
        a = [pick("F", k, r) for k in range(warm)]
        for k in range(total - warm):
            a += [pick("F", warm + k, r), pick("B", k, r)]
        acts.append(a + [pick("B", k, r) for k in range(total - warm, total)])
    return Schedule("interleaved", p, m, v, acts)


def zero_bubble_h1(p: int, m: int, v: int = 1) -> Schedule:
    """ZB-H1 (arXiv 2401.10241 §2.2): 1F1B's order with B → I, and rank r runs W_j right after
    I_{j+r} (the rest at the end). With F = I = W = 1 the step is 3m+p−1 for m ≥ p, bubble
    (p−1)/(3m+p−1); activations are held until W, at most min(p, m) per rank."""
    _check_args("zero_bubble", p, m, v)
    acts = []
    for r in range(p):
        w = min(p - r - 1, m)
        a = [Action("F", i, r) for i in range(w)]
        for i in range(m):
            if i < m - w:
                a.append(Action("F", w + i, r))
            a.append(Action("I", i, r))
            if i >= r:
                a.append(Action("W", i - r, r))
        acts.append(a + [Action("W", j, r) for j in range(max(0, m - r), m)])
    return Schedule("zero_bubble", p, m, v, acts)


def forward_only(p: int, m: int, v: int = 1, placement: str = "loop") -> Schedule:
    """Evaluation (no backward): each rank runs F of every micro-batch on its stages, lowest stage
    first — GPipe's forward half over the training schedule's placement ("loop" or "v")."""
    _check_args("forward", p, m, 1)
    if v < 1 or (placement == "v" and v != 2):
        raise ValueError(f"forward_only: v={v} does not fit the {placement!r} placement")
    sc = Schedule("forward", p, m, v, placement=placement, forward_only=True)
    sc.actions = [[Action("F", i, s) for s in sc.stages_of(r) for i in range(m)] for r in range(p)]
    return sc


_BUILDERS = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved_1f1b,
             "zero_bubble": zero_bubble_h1}


def get_schedule(name: str, p: int, m: int, v: int | None = None) -> Schedule:
    """Build schedule ``name`` ∈ :data:`NAMES` (zb_v, dualpipe_v: v = 2, V placement); ValueError if the
    name is unknown or (p, m, v) is a combination that schedule does not allow."""
    if name not in NAMES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {', '.join(NAMES)}")
    if name in ("zb_v", "dualpipe_v"):      # registered by :mod:`.schedules_v` (imported by the package)
        return _BUILDERS[name](p, m, 2 if v is None else v)
    return _BUILDERS[name](p, m, 1 if v is None else v)


# ------------------------------------------------------------------------- communication
def comm_ops(schedule: Schedule, rank: int) -> list[Step]:
    """Rank ``rank``'s actions in order, each with the receives to post before computing it
    and the sends to issue after (peer ranks from the round-robin stage placement)."""
    last = schedule.n_stages - 1
    steps = []
    for a in schedule.actions[rank]:
        recv, send = [], []
        s, i = a.stage, a.microbatch
        if a.kind == "F":
            if s > 0:
                recv.append(P2P("recv", schedule.rank_of(s - 1), "act", i, s - 1, s))
            if s < last:
                send.append(P2P("send", schedule.rank_of(s + 1), "act", i, s, s + 1))
        elif a.kind in ("B", "I"):
            if s < last:
                recv.append(P2P("recv", schedule.rank_of(s + 1), "grad", i, s + 1, s))
            if s > 0:
                send.append(P2P("send", schedule.rank_of(s - 1), "grad", i, s, s - 1))
        steps.append(Step(a, tuple(recv), tuple(send)))
    return steps


def max_in_flight(schedule: Schedule, rank: int) -> int:
    """Peak number of (micro-batch, stage) pairs whose activations ``rank`` holds: counted from
    F until B, or until W when backward is split (W still needs the layer inputs).
    GPipe: m; 1F1B: min(p−rank, m); ZB-H1: min(p, m); interleaved: min(v·m, warm-up + 1)
    chunks of 1/v of a stage each."""
    held = peak = 0
    for a in schedule.actions[rank]:
        held += {"F": 1, "B": -1, "W": -1}.get(a.kind, 0)
        peak = max(peak, held)
    return peak
