"""Deadlock freedom of the executor's messages on NCCL, with one process group per direction.

The model (NCCL's worst case, no buffering anywhere): every process group has one stream per rank
on which its point-to-point ops run in issue order; a send or receive completes only together with
its peer's matching op, and a ``batch_isend_irecv`` group (one ``ncclGroupStart/End``) completes
when all its ops have — they progress together, so two ranks sending to each other inside one group
do not block. Each rank's compute runs its actions in order. The edges:

* a group issued before action k (the sends of action k−1, the receives action k drains) starts
  after action k−1's compute (the comm stream waits for the compute stream when an op is issued)
  and after the previous group on its own process group (stream order);
* action k's compute starts after action k−1's and after every group of that exchange that holds a
  receive (``work.wait()``: a stream wait); a group of sends only is not waited for;
* ``grouped=False`` models the first step, where headers travel and every message is issued alone:
  each message is its own group and a receive blocks the host (``.tolist()`` of its header), so
  everything the rank issues later starts after it.

Messages are matched per (process group, sender, receiver) in issue order — the executor's order
(:mod:`.p2p_order`), the same at both ends. Every node only waits for others (a monotone system),
so the set of nodes that can ever finish is the least fixpoint computed below; with fewer edges
(per-pair streams, buffered small messages, host-free receives) it can only grow, so a schedule
proven free here is free on NCCL.

With a single process group for the whole pp axis (``channels=None``), gpipe, 1f1b and zero_bubble
are free but interleaved, zb_v and dualpipe_v can deadlock. One group per direction of travel
(:data:`DIRECTION`) is not enough either: at p ≥ 4 a rank's "up" stream carries its sends to r+1
and its receives from r−1 in one order, and ZB-V and DualPipeV can tie them into a cycle. With
:data:`PAIRS` — four groups, by direction and by the sender's parity ("up0": from an even rank to a
higher one, "up1", "down0", "down1"; the executor's ``p2p_groups``, built once by
:meth:`parallel.mesh.Mesh.pp_p2p_groups`) — each rank's stream on each group carries messages to
one neighbour or from one neighbour only (ranks r and r±1 differ in parity), so for a placement
without wrap-around (every one but interleaved's stage p−1 → p) it is the per-ordered-pair model,
which is free exactly when the buffered run of the validator is; the check below also proves the
wrap-around case: every schedule is free for p ∈ {2, ..., 8}, m ≤ 16, v ≤ 2, in both the grouped and
the first-step mode (tests/test_schedules_v.py).
"""
from __future__ import annotations

from collections import deque

from parallel.pipeline.p2p_order import _per_action
from parallel.pipeline.schedules import Schedule

__all__ = ["PAIRS", "CHANNELS", "DIRECTION", "channel_of", "stream_problems"]

PAIRS = "pairs"                  # "up0" | "up1" | "down0" | "down1": direction + the sender's parity
CHANNELS = ("up0", "up1", "down0", "down1")
DIRECTION = "direction"          # "up" (to a higher pp rank) | "down": not enough (kept to show it)


def channel_of(mode, src: int, dst: int, key: tuple) -> str:
    """The channel (process group) of message ``key`` from pp rank ``src`` to ``dst``."""
    if mode is None:
        return "pp"
    if mode == PAIRS:
        return ("up" if dst > src else "down") + str(src % 2)
    if mode == DIRECTION:
        return "up" if dst > src else "down"
    return mode(src, dst, key)


class _Node:
    __slots__ = ("rank", "what", "deps", "dependents", "msgs", "pending", "started", "done")

    def __init__(self, rank, what):
        self.rank, self.what = rank, what
        self.deps, self.dependents, self.msgs = 0, [], []
        self.pending, self.started, self.done = 0, False, False


def _build(schedule: Schedule, channels, grouped: bool):
    """The nodes of every rank (groups and computes) with their edges; message ends by id."""
    nodes, ends = [], {}

    def node(rank, what, after):
        n = _Node(rank, what)
        for d in dict.fromkeys(a for a in after if a is not None):
            d.dependents.append(n)
            n.deps += 1
        nodes.append(n)
        return n

    for r in range(schedule.p):
        count: dict = {}
        last_on: dict = {}                           # channel -> its latest group on this rank
        compute = host = None                        # host: the latest blocking receive
        per = _per_action(schedule, r)
        acts = schedule.actions[r]
        for k in range(len(per) + 1):
            ops = (per[k - 1][1] if k else []) + (per[k][0] if k < len(per) else [])
            if grouped:
                by: dict = {}
                for op in ops:
                    q = op[1]
                    src, dst = (r, q) if op[0] == "send" else (q, r)
                    by.setdefault(channel_of(channels, src, dst, op[2]), []).append(op)
                batches = list(by.items())
            else:
                batches = []
                for op in ops:
                    q = op[1]
                    src, dst = (r, q) if op[0] == "send" else (q, r)
                    batches.append((channel_of(channels, src, dst, op[2]), [op]))
            waited = []
            for ch, batch in batches:
                g = node(r, f"group {batch} before action {k}", [compute, last_on.get(ch), host])
                last_on[ch] = g
                for op, q, _ in batch:
                    src, dst = (r, q) if op == "send" else (q, r)
                    pair = (ch, src, dst)
                    count[(op,) + pair] = j = count.get((op,) + pair, -1) + 1
                    mid = pair + (j,)
                    ends[(mid, op)] = g
                    g.msgs.append(mid)
                if any(op == "recv" for op, _, _ in batch):
                    waited.append(g)
                    if not grouped:
                        host = g
            if k < len(per):
                compute = node(r, f"action {k} ({acts[k].label(2)})", [compute] + waited)
    return nodes, ends


def stream_problems(schedule: Schedule, channels=PAIRS, grouped: bool = True) -> list[str]:
    """Run the executor's messages for ``schedule`` under the model above with process groups
    chosen by ``channels`` (None: the pp group alone; :data:`PAIRS`; :data:`DIRECTION`; a function
    (src, dst, key) -> name). Returns one line per rank that cannot finish (its first stuck node), or []."""
    nodes, ends = _build(schedule, channels, grouped)
    for mid, op in ends:
        if (mid, "recv" if op == "send" else "send") not in ends:
            return [f"message {mid} is sent but never received (or the reverse)"]
    started_ends: set = set()
    work = deque(n for n in nodes if n.deps == 0)

    def finish(n):
        n.done = True
        for d in n.dependents:
            d.deps -= 1
            if d.deps == 0:
                work.append(d)

    while work:
        n = work.popleft()
        n.started = True
        n.pending = len(n.msgs)
        if not n.msgs:
            finish(n)
            continue
        for mid in n.msgs:
            op = "send" if ends.get((mid, "send")) is n else "recv"
            started_ends.add((mid, op))
            other = (mid, "recv" if op == "send" else "send")
            if other in started_ends:
                for g in (n, ends[other]):
                    g.pending -= 1
                    if g.pending == 0 and g.started:
                        finish(g)
    stuck = {}
    for n in nodes:
        if not n.done and n.rank not in stuck:
            stuck[n.rank] = n.what
    return [f"rank {r} stuck at {w}" for r, w in sorted(stuck.items())]
